package grpcsource_test

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
	"github.com/flowpipe/flowpipe/internal/flowwire"
	streampb "github.com/flowpipe/flowpipe/proto/stream"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

// nativeClient speaks flowpipe's batch stream with the generated code and gRPC's standard
// codec (not the hand-written encoding the sink uses), from proto/stream's description.
type nativeClient struct {
	stream grpc.BidiStreamingClient[streampb.Batch, streampb.BatchAck]
}

func dialNative(t *testing.T, addr, authorization string) *nativeClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx := context.Background()
	if authorization != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", authorization)
	}
	stream, err := streampb.NewCollectorClient(conn).Stream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &nativeClient{stream: stream}
}

// open sends the opening message and waits for the response headers.
func (c *nativeClient) open() error {
	if err := c.stream.Send(&streampb.Batch{}); err != nil {
		_, rerr := c.stream.Recv()
		return errors.Join(err, rerr)
	}
	md, err := c.stream.Header()
	if err != nil {
		return err
	}
	if len(md) == 0 {
		_, rerr := c.stream.Recv()
		return errors.Join(errors.New("no response headers"), rerr)
	}
	return nil
}

func (c *nativeClient) send(seq uint64, events []flow.Event) error {
	return c.stream.Send(&streampb.Batch{Seq: seq, Count: uint32(len(events)), Events: codec.Append(nil, events)})
}

func nativeEvents(n int) []flow.Event {
	ids := flow.NewIDGen()
	now := flow.Now()
	ev := make([]flow.Event, n)
	for i := range ev {
		ev[i] = flow.Event{
			EventID: ids.New(), FlowID: ids.New(), Timestamp: now + flow.Time(i), Start: now - 1000, End: now,
			Type: flow.TypeEnd, Direction: flow.Ingress, Protocol: flow.ProtoUDP,
			SrcAddr: netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), DstAddr: netip.MustParseAddr("fd00::1"),
			SrcPort: uint16(1024 + i), DstPort: 53, RxPackets: 3, RxBytes: 300, TxPackets: 4, TxBytes: uint64(i),
			RuleID: "rule-9", CommunityID: "1:abc", Source: "the-agents-source",
		}
	}
	return ev
}

// TestNativeStream: batches on flowpipe's stream are ACKed once each, by seq, and their
// events reach the pipeline whole (fields NetBird's protocol has no place for included),
// named after the receiver. A NetBird client streams on the same listener at the same time.
func TestNativeStream(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, func(c *grpcsrc.Config) { c.BatchSize = 300 }, out)
	c := dialNative(t, r.Addr().String(), validToken())
	if err := c.open(); err != nil {
		t.Fatal(err)
	}
	nb := dial(t, r.Addr().String(), validToken())
	if err := nb.handshake(); err != nil {
		t.Fatal(err)
	}
	events := nativeEvents(1500)
	for i := range 3 {
		if err := c.send(uint64(i+1), events[i*500:(i+1)*500]); err != nil {
			t.Fatal(err)
		}
	}
	nbID := uuid.New()
	if err := nb.stream.Send(protoEvent(nbID)); err != nil {
		t.Fatal(err)
	}
	acked := map[uint64]int{}
	for len(acked) < 3 {
		ack, err := c.stream.Recv()
		if err != nil {
			t.Fatalf("after %d ACKs: %v", len(acked), err)
		}
		acked[ack.Seq]++
		if ack.Seq < 1 || ack.Seq > 3 || acked[ack.Seq] > 1 {
			t.Fatalf("ACK for batch %d (ACKs so far %v)", ack.Seq, acked)
		}
	}
	if ack, err := nb.stream.Recv(); err != nil || uuid.UUID(ack.EventId) != nbID {
		t.Fatalf("NetBird client's ACK: %v %x", err, ack.GetEventId())
	}
	got := out.got()
	if len(got) != len(events)+1 {
		t.Fatalf("pipeline got %d events, want %d", len(got), len(events)+1)
	}
	byID := map[uuid.UUID]flow.Event{}
	for _, e := range got {
		byID[e.EventID] = e
	}
	for _, e := range events {
		want := e
		want.Source = "collector"
		if g := byID[e.EventID]; g != want {
			t.Fatalf("event arrived changed:\n got %+v\nwant %+v", g, want)
		}
	}
	if err := c.stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.stream.Recv(); err != io.EOF {
		t.Fatalf("after CloseSend: %v, want io.EOF", err)
	}
}

// TestNativeBadStreams: a stream without its opening message, a malformed batch, a batch
// that lies about its count and an oversized batch each end their own stream with a status
// that says what was wrong, counted by reason; the receiver goes on serving both protocols.
func TestNativeBadStreams(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, func(c *grpcsrc.Config) { c.MaxBatchMessageSize = 4096 }, out)
	addr := r.Addr().String()
	expect := func(c *nativeClient, code codes.Code, detail string) {
		t.Helper()
		_, err := c.stream.Recv()
		if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), detail) {
			t.Errorf("got %v, want %s naming %q", err, code, detail)
		}
	}

	c := dialNative(t, addr, validToken())
	c.send(1, nativeEvents(1)) // no opening message first
	expect(c, codes.InvalidArgument, "opening")

	c = dialNative(t, addr, validToken())
	if err := c.open(); err != nil {
		t.Fatal(err)
	}
	packed := codec.Append(nil, nativeEvents(2))
	packed[len(packed)/2] ^= 0xff
	packed = append(packed[:1:1], []byte("garbage")...)
	c.stream.Send(&streampb.Batch{Seq: 1, Count: 2, Events: packed})
	expect(c, codes.InvalidArgument, "malformed Batch: batch 1")

	c = dialNative(t, addr, validToken())
	if err := c.open(); err != nil {
		t.Fatal(err)
	}
	c.stream.Send(&streampb.Batch{Seq: 1, Count: 3, Events: codec.Append(nil, nativeEvents(2))})
	expect(c, codes.InvalidArgument, "malformed Batch: batch 1")

	c = dialNative(t, addr, validToken())
	if err := c.open(); err != nil {
		t.Fatal(err)
	}
	c.send(1, nativeEvents(200)) // about 20 KB
	expect(c, codes.ResourceExhausted, "max_batch_message_size")

	// Still serving, both protocols.
	c = dialNative(t, addr, validToken())
	if err := c.open(); err != nil {
		t.Fatal(err)
	}
	if err := c.send(7, nativeEvents(3)); err != nil {
		t.Fatal(err)
	}
	if ack, err := c.stream.Recv(); err != nil || ack.Seq != 7 {
		t.Fatalf("good stream after bad ones: %v %v", err, ack)
	}
	nb := dial(t, addr, validToken())
	if err := nb.handshake(); err != nil {
		t.Fatal(err)
	}
	for reason, want := range map[string]float64{"missing_initiator": 1, "malformed": 2, "oversized": 1} {
		if v := testutil.ToFloat64(counterVec(t, r.reg, "flowpipe_grpc_source_streams_refused_total", reason)); v != want {
			t.Errorf("%s counted %v times, want %v", reason, v, want)
		}
	}
	if n := len(out.got()); n != 3 {
		t.Errorf("%d events delivered, want 3", n)
	}
}

// TestNativeTokensRefused: flowpipe's stream checks tokens as NetBird's does (the same code):
// missing, wrong, expired and too long-lived tokens are refused and counted.
func TestNativeTokensRefused(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, func(c *grpcsrc.Config) { c.MaxTokenLifetime = 2 * time.Hour }, out)
	cases := map[string]string{
		"missing":      "",
		"wrong secret": flowwire.MintToken([]byte("not-the-secret-at-all"), time.Now().Add(time.Hour)).Authorization(),
		"expired":      token(time.Now().Add(-time.Minute)),
		"too long":     token(time.Now().Add(24 * time.Hour)),
	}
	for name, auth := range cases {
		c := dialNative(t, r.Addr().String(), auth)
		if err := c.open(); !isCode(err, codes.Unauthenticated) {
			t.Errorf("%s token: %v, want Unauthenticated", name, err)
		}
		c.send(1, nativeEvents(1))
	}
	if got := out.got(); len(got) != 0 {
		t.Fatalf("%d events reached the pipeline from refused streams", len(got))
	}
	for _, reason := range []string{"token_missing", "token_invalid", "token_expired", "token_lifetime"} {
		if v := testutil.ToFloat64(counterVec(t, r.reg, "flowpipe_grpc_source_streams_refused_total", reason)); v != 1 {
			t.Errorf("refusals for %s: %v, want 1", reason, v)
		}
	}
}

// TestNativeDuplicatesAndResend: a batch sent again on a new stream (after a lost ACK) is
// ACKed again and its events reach the pipeline once; a batch whose delivery failed is not
// ACKed, and its resend is accepted; the same events from a NetBird client are duplicates too.
func TestNativeDuplicatesAndResend(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, nil, out)
	events := nativeEvents(50)
	for round := range 3 {
		c := dialNative(t, r.Addr().String(), validToken())
		if err := c.open(); err != nil {
			t.Fatal(err)
		}
		if err := c.send(1, events); err != nil {
			t.Fatal(err)
		}
		if ack, err := c.stream.Recv(); err != nil || ack.Seq != 1 {
			t.Fatalf("round %d: %v %v", round, err, ack)
		}
	}
	nb := dial(t, r.Addr().String(), validToken())
	if err := nb.handshake(); err != nil {
		t.Fatal(err)
	}
	nb.stream.Send(protoEvent(events[0].EventID))
	if ack, err := nb.stream.Recv(); err != nil || uuid.UUID(ack.EventId) != events[0].EventID {
		t.Fatalf("NetBird duplicate: %v %v", err, ack)
	}
	if n := len(out.got()); n != len(events) {
		t.Fatalf("%d events delivered, want each of %d once", n, len(events))
	}
	if v := counter(t, r.reg, "flowpipe_grpc_source_duplicates_total"); v != 2*float64(len(events))+1 {
		t.Errorf("duplicates counted %v, want %d", v, 2*len(events)+1)
	}

	// Not delivered: no ACK; the resend is accepted.
	out.mu.Lock()
	out.ackErr = flow.ErrShutdown
	out.mu.Unlock()
	fresh := nativeEvents(10)
	c := dialNative(t, r.Addr().String(), validToken())
	if err := c.open(); err != nil {
		t.Fatal(err)
	}
	c.send(1, fresh)
	got := make(chan *streampb.BatchAck, 2)
	go func() {
		for {
			ack, err := c.stream.Recv()
			if err != nil {
				close(got)
				return
			}
			got <- ack
		}
	}()
	waitUntil(t, "the failed delivery to be counted", func() bool {
		return counter(t, r.reg, "flowpipe_grpc_source_not_acked_total") == float64(len(fresh))
	})
	out.mu.Lock()
	out.ackErr = nil
	out.mu.Unlock()
	c.send(2, fresh)
	if ack := <-got; ack == nil || ack.Seq != 2 {
		t.Fatalf("first ACK after the failed delivery: %v, want batch 2 (batch 1 was not delivered)", ack)
	}
	if n := len(out.got()); n != len(events)+len(fresh) {
		t.Fatalf("%d events delivered, want %d", n, len(events)+len(fresh))
	}
}

// TestNativeSilentStreamClosed: a native stream without its opening message is closed after
// initiator_timeout, as a NetBird one is.
func TestNativeSilentStreamClosed(t *testing.T) {
	r := start(t, func(c *grpcsrc.Config) { c.InitiatorTimeout = 200 * time.Millisecond }, &sinkEmitter{})
	c := dialNative(t, r.Addr().String(), validToken())
	_, err := c.stream.Recv()
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "initiator") {
		t.Errorf("a native stream without opening message ended with %v, want DeadlineExceeded", err)
	}
}
