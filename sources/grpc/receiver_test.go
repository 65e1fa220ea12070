package grpcsource_test

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/flowwire"
	pb "github.com/flowpipe/flowpipe/proto/flow"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

const secret = "test-secret-0123456789"

// sinkEmitter stands in for the pipeline behind the receiver: it records events and
// acknowledges each batch with ackErr (nil: delivered).
type sinkEmitter struct {
	mu     sync.Mutex
	events []flow.Event
	ackErr error
}

func (s *sinkEmitter) Emit(_ context.Context, b *flow.Batch) error {
	s.mu.Lock()
	if s.ackErr == nil {
		s.events = append(s.events, b.Events...)
	}
	err := s.ackErr
	s.mu.Unlock()
	b.Release(err)
	return nil
}

func (s *sinkEmitter) got() []flow.Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]flow.Event(nil), s.events...)
}

type receiverT struct {
	*grpcsrc.Receiver
	reg *prometheus.Registry
}

func start(t *testing.T, mutate func(*grpcsrc.Config), out component.Emitter) receiverT {
	t.Helper()
	cfg := grpcsrc.Factory().NewConfig().(*grpcsrc.Config)
	cfg.Listen, cfg.Auth, cfg.Secrets = "127.0.0.1:0", "hmac", []string{secret}
	if mutate != nil {
		mutate(cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	r, err := grpcsrc.New(component.Env{Name: "collector", Registerer: reg}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	componenttest.RunSource(t, r, out)
	return receiverT{r, reg}
}

// netbirdClient is a client written from the protocol description, with the generated code
// and the standard codec, as NetBird's client is: initiator first, headers required, then one
// event per message.
type netbirdClient struct {
	stream pb.FlowService_EventsClient
	conn   *grpc.ClientConn
}

func dial(t *testing.T, addr, authorization string) *netbirdClient {
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
	stream, err := pb.NewFlowServiceClient(conn).Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &netbirdClient{stream: stream, conn: conn}
}

// handshake sends the initiator and checks the receiver's side of the handshake.
func (c *netbirdClient) handshake() error {
	// A refused stream ends with a status and no headers; Recv reveals the status.
	if err := c.stream.Send(&pb.FlowEvent{IsInitiator: true}); err != nil {
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
	ack, err := c.stream.Recv()
	if err != nil {
		return err
	}
	if !ack.IsInitiator {
		return errors.New("first message from the receiver is not the initiator ACK")
	}
	return nil
}

func token(expiry time.Time) string {
	return flowwire.MintToken([]byte(secret), expiry).Authorization()
}

func validToken() string { return token(time.Now().Add(time.Hour)) }

func protoEvent(id uuid.UUID) *pb.FlowEvent {
	return &pb.FlowEvent{
		EventId:   id[:],
		Timestamp: timestamppb.Now(),
		PublicKey: []byte("peer-key"),
		FlowFields: &pb.FlowFields{
			FlowId: id[:], Type: pb.Type_TYPE_START, Direction: pb.Direction_EGRESS, Protocol: 6,
			SourceIp: []byte{100, 64, 0, 1}, DestIp: []byte{100, 64, 0, 2}, RuleId: []byte("rule"),
			ConnectionInfo: &pb.FlowFields_PortInfo{PortInfo: &pb.PortInfo{SourcePort: 1234, DestPort: 443}},
			RxPackets:      1, TxBytes: 99,
		},
	}
}

// TestNetBirdStyleClient: a client built from the protocol description, one event per
// message, gets every event ACKed, and the events reach the pipeline intact.
func TestNetBirdStyleClient(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, nil, out)
	c := dial(t, r.Addr().String(), validToken())
	if err := c.handshake(); err != nil {
		t.Fatal(err)
	}
	const n = 2000
	want := map[uuid.UUID]bool{}
	for range n {
		id := uuid.New()
		want[id] = true
		if err := c.stream.Send(protoEvent(id)); err != nil {
			t.Fatal(err)
		}
	}
	acked := map[uuid.UUID]bool{}
	for len(acked) < n {
		ack, err := c.stream.Recv()
		if err != nil {
			t.Fatalf("after %d ACKs: %v", len(acked), err)
		}
		id, err := uuid.FromBytes(ack.EventId)
		if err != nil || !want[id] {
			t.Fatalf("ACK for unknown event %x", ack.EventId)
		}
		acked[id] = true
	}
	got := out.got()
	if len(got) != n {
		t.Fatalf("pipeline got %d events, want %d", len(got), n)
	}
	for _, e := range got {
		if !want[e.EventID] || e.SrcAddr != netip.MustParseAddr("100.64.0.1") || e.DstPort != 443 ||
			e.Type != flow.TypeStart || e.Direction != flow.Egress || e.RuleID != "rule" || e.Source != "collector" {
			t.Fatalf("event arrived changed: %+v", e)
		}
	}
	// Half-closing ends the stream cleanly once everything is ACKed.
	if err := c.stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.stream.Recv(); err != io.EOF {
		t.Fatalf("after CloseSend: %v, want io.EOF", err)
	}
}

func TestTokensRefused(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, func(c *grpcsrc.Config) { c.Secrets = []string{"another-secret-for-rotation", secret} }, out)
	cases := map[string]string{
		"missing":      "",
		"wrong secret": flowwire.MintToken([]byte("not-the-secret-at-all"), time.Now().Add(time.Hour)).Authorization(),
		"expired":      token(time.Now().Add(-time.Minute)),
		"malformed":    "Bearer nonsense",
		"tampered":     strings.Replace(validToken(), "Bearer ", "Bearer x", 1),
	}
	for name, auth := range cases {
		c := dial(t, r.Addr().String(), auth)
		err := c.handshake()
		if !isCode(err, codes.Unauthenticated) {
			t.Errorf("%s token: %v, want Unauthenticated", name, err)
		}
		// Whatever it sends next goes nowhere.
		c.stream.Send(protoEvent(uuid.New()))
	}
	// A token signed with the other configured secret (rotation) is accepted.
	c := dial(t, r.Addr().String(), flowwire.MintToken([]byte("another-secret-for-rotation"), time.Now().Add(time.Hour)).Authorization())
	if err := c.handshake(); err != nil {
		t.Fatalf("token signed with the second secret: %v", err)
	}
	if got := out.got(); len(got) != 0 {
		t.Fatalf("%d events reached the pipeline from refused streams", len(got))
	}
	for _, reason := range []string{"token_missing", "token_invalid", "token_expired"} {
		if v := testutil.ToFloat64(counterVec(t, r.reg, "flowpipe_grpc_source_streams_refused_total", reason)); v == 0 {
			t.Errorf("refusals for %s not counted", reason)
		}
	}
}

func counterVec(t *testing.T, reg *prometheus.Registry, name, reason string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "x"}, func() float64 { return m.GetCounter().GetValue() })
				}
			}
		}
	}
	return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "x"}, func() float64 { return 0 })
}

// TestBadStreamsEndAlone: a stream without the initiator, a malformed message and an
// oversized message each end their own stream with an error; the receiver goes on serving.
func TestBadStreamsEndAlone(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, func(c *grpcsrc.Config) { c.MaxMessageSize = 1024 }, out)
	addr := r.Addr().String()

	c := dial(t, addr, validToken())
	c.stream.Send(protoEvent(uuid.New())) // no initiator first
	if _, err := c.stream.Recv(); err == nil {
		// the initiator ACK may come first; the error follows
		_, err = c.stream.Recv()
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("missing initiator: %v, want InvalidArgument", err)
		}
	}

	c = dial(t, addr, validToken())
	if err := c.handshake(); err != nil {
		t.Fatal(err)
	}
	bad := protoEvent(uuid.New())
	bad.FlowFields.SourceIp = []byte{1, 2, 3} // neither IPv4 nor IPv6
	c.stream.Send(bad)
	if _, err := c.stream.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Errorf("malformed event: %v, want InvalidArgument", err)
	}

	c = dial(t, addr, validToken())
	if err := c.handshake(); err != nil {
		t.Fatal(err)
	}
	big := protoEvent(uuid.New())
	big.FlowFields.RuleId = make([]byte, 4096)
	c.stream.Send(big)
	if _, err := c.stream.Recv(); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("oversized event: %v, want ResourceExhausted", err)
	}

	// Still serving.
	c = dial(t, addr, validToken())
	if err := c.handshake(); err != nil {
		t.Fatal(err)
	}
	id := uuid.New()
	c.stream.Send(protoEvent(id))
	ack, err := c.stream.Recv()
	if err != nil || uuid.UUID(ack.EventId) != id {
		t.Fatalf("good stream after bad ones: %v %x", err, ack.GetEventId())
	}
	for _, reason := range []string{"missing_initiator", "malformed", "oversized"} {
		if v := testutil.ToFloat64(counterVec(t, r.reg, "flowpipe_grpc_source_streams_refused_total", reason)); v != 1 {
			t.Errorf("%s counted %v times, want 1", reason, v)
		}
	}
	if n := len(out.got()); n != 1 {
		t.Errorf("%d events delivered, want 1", n)
	}
}

// TestDuplicatesDeliveredOnce: an event sent again (after a lost ACK, on another stream) is
// ACKed again but reaches the pipeline once.
func TestDuplicatesDeliveredOnce(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, nil, out)
	id := uuid.New()
	for round := range 3 {
		c := dial(t, r.Addr().String(), validToken())
		if err := c.handshake(); err != nil {
			t.Fatal(err)
		}
		if err := c.stream.Send(protoEvent(id)); err != nil {
			t.Fatal(err)
		}
		ack, err := c.stream.Recv()
		if err != nil || uuid.UUID(ack.EventId) != id {
			t.Fatalf("round %d: %v %x", round, err, ack.GetEventId())
		}
	}
	if n := len(out.got()); n != 1 {
		t.Fatalf("event delivered %d times, want once", n)
	}
	mfs, _ := r.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "flowpipe_grpc_source_duplicates_total" {
			if v := mf.GetMetric()[0].GetCounter().GetValue(); v != 2 {
				t.Errorf("duplicates counted %v, want 2", v)
			}
		}
	}
}

// TestNoAckWhenNotDelivered: when the pipeline stops before a batch is delivered, its events
// are not ACKed, and the client's resend is accepted (not taken for a duplicate).
func TestNoAckWhenNotDelivered(t *testing.T) {
	out := &sinkEmitter{ackErr: flow.ErrShutdown}
	r := start(t, nil, out)
	c := dial(t, r.Addr().String(), validToken())
	if err := c.handshake(); err != nil {
		t.Fatal(err)
	}
	id := uuid.New()
	c.stream.Send(protoEvent(id))
	got := make(chan error, 1)
	go func() { _, err := c.stream.Recv(); got <- err }()
	select {
	case err := <-got:
		t.Fatalf("got an ACK (or error %v) for an event the pipeline did not deliver", err)
	case <-time.After(300 * time.Millisecond):
		// Absence of an ACK cannot be proven by waiting; this only catches an early one. The
		// resend below is the real check.
	}
	out.mu.Lock()
	out.ackErr = nil
	out.mu.Unlock()
	c.stream.Send(protoEvent(id))
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if n := len(out.got()); n != 1 {
		t.Fatalf("resent event delivered %d times, want once", n)
	}
}

// TestDropPolicyAcks: a batch dropped by a sink's drop policy is ACKed (the user chose to
// drop rather than block) and counted.
func TestDropPolicyAcks(t *testing.T) {
	out := &sinkEmitter{ackErr: &flow.DropError{Component: "file", Reason: "queue_full"}}
	r := start(t, nil, out)
	c := dial(t, r.Addr().String(), validToken())
	if err := c.handshake(); err != nil {
		t.Fatal(err)
	}
	id := uuid.New()
	c.stream.Send(protoEvent(id))
	ack, err := c.stream.Recv()
	if err != nil || uuid.UUID(ack.EventId) != id {
		t.Fatalf("%v %x", err, ack.GetEventId())
	}
	mfs, _ := r.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "flowpipe_grpc_source_acked_dropped_total" {
			if v := mf.GetMetric()[0].GetCounter().GetValue(); v != 1 {
				t.Errorf("acked_dropped %v, want 1", v)
			}
		}
	}
}

func TestConfigValidate(t *testing.T) {
	cases := map[string]struct {
		mutate func(*grpcsrc.Config)
		want   string
	}{
		"auth unset":       {func(c *grpcsrc.Config) { c.Auth = "" }, "auth:"},
		"hmac, no secrets": {func(c *grpcsrc.Config) { c.Secrets = nil }, "secrets:"},
		"short secret":     {func(c *grpcsrc.Config) { c.Secrets = []string{"x"} }, "secrets[0]:"},
		"mtls without tls": {func(c *grpcsrc.Config) { c.ClientCAFile = "ca.pem" }, "client_ca_file:"},
		"bad listen":       {func(c *grpcsrc.Config) { c.Listen = "7000" }, "listen:"},
	}
	for name, tc := range cases {
		cfg := grpcsrc.Factory().NewConfig().(*grpcsrc.Config)
		cfg.Listen, cfg.Auth, cfg.Secrets = "127.0.0.1:0", "hmac", []string{secret}
		tc.mutate(cfg)
		err := cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error at %q", name, err, tc.want)
		}
	}
}

// isCode reports whether err, or an error joined into it, is a gRPC status with code.
func isCode(err error, code codes.Code) bool {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			if isCode(e, code) {
				return true
			}
		}
		return false
	}
	return err != nil && status.Code(err) == code
}

// TestDedupWindowBounded: the de-duplication window keeps at most max_events IDs; an event
// older than that is delivered again (and the ring wraps without losing newer IDs).
func TestDedupWindowBounded(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, func(c *grpcsrc.Config) { c.Dedup.MaxEvents = 1500; c.BatchSize = 100 }, out)
	c := dial(t, r.Addr().String(), validToken())
	if err := c.handshake(); err != nil {
		t.Fatal(err)
	}
	send := func(ids []uuid.UUID) {
		t.Helper()
		for _, id := range ids {
			if err := c.stream.Send(protoEvent(id)); err != nil {
				t.Fatal(err)
			}
		}
		for range ids {
			if _, err := c.stream.Recv(); err != nil {
				t.Fatal(err)
			}
		}
	}
	ids := make([]uuid.UUID, 4000)
	for i := range ids {
		ids[i] = uuid.New()
	}
	send(ids)
	send(ids[len(ids)-1000:]) // within the window: duplicates
	if n := len(out.got()); n != len(ids) {
		t.Fatalf("after resending the newest 1000: %d delivered, want %d", n, len(ids))
	}
	send(ids[:10]) // long gone from the window: delivered again
	if n := len(out.got()); n != len(ids)+10 {
		t.Fatalf("after resending 10 expired: %d delivered, want %d", n, len(ids)+10)
	}
}

// holdEmitter keeps every batch until told to acknowledge them, like sinks still writing.
type holdEmitter struct {
	mu      sync.Mutex
	held    []*flow.Batch
	arrived chan int // events held so far, after each batch
}

func (h *holdEmitter) Emit(_ context.Context, b *flow.Batch) error {
	h.mu.Lock()
	h.held = append(h.held, b)
	n := 0
	for _, b := range h.held {
		n += b.Len()
	}
	h.mu.Unlock()
	h.arrived <- n
	return nil
}

func (h *holdEmitter) releaseAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, b := range h.held {
		b.Release(nil)
	}
	h.held = nil
}

// TestGracefulShutdownSendsAcksInFlight: when the pipeline stops while batches are still
// being written, the receiver takes nothing new but ACKs those batches when they complete,
// and only then ends the streams.
func TestGracefulShutdownSendsAcksInFlight(t *testing.T) {
	h := &holdEmitter{arrived: make(chan int, 100)}
	cfg := grpcsrc.Factory().NewConfig().(*grpcsrc.Config)
	cfg.Listen, cfg.Auth = "127.0.0.1:0", "none"
	r, err := grpcsrc.New(component.Env{Name: "collector"}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan struct{})
	go func() { r.Run(ctx, h); close(runDone) }()
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	c := dial(t, r.Addr().String(), "")
	if err := c.handshake(); err != nil {
		t.Fatal(err)
	}
	const n = 50
	want := map[uuid.UUID]bool{}
	for range n {
		id := uuid.New()
		want[id] = true
		c.stream.Send(protoEvent(id))
	}
	for got := 0; got < n; got = <-h.arrived {
	}
	cancel() // the pipeline stops; the batch is still in its sinks
	<-runDone
	closed := make(chan error, 1)
	go func() {
		cctx, cc := context.WithTimeout(context.Background(), time.Minute)
		defer cc()
		closed <- r.Close(cctx)
	}()
	h.releaseAll() // the sinks finish
	for len(want) > 0 {
		ack, err := c.stream.Recv()
		if err != nil {
			t.Fatalf("stream ended with %d events not ACKed: %v", len(want), err)
		}
		delete(want, uuid.UUID(ack.EventId))
	}
	if _, err := c.stream.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("after the last ACK: %v, want Unavailable", err)
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
}

func TestStreamLimit(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, func(c *grpcsrc.Config) { c.MaxStreams = 1 }, out)
	first := dial(t, r.Addr().String(), validToken())
	if err := first.handshake(); err != nil {
		t.Fatal(err)
	}
	second := dial(t, r.Addr().String(), validToken())
	if err := second.handshake(); !isCode(err, codes.ResourceExhausted) {
		t.Fatalf("second stream over max_streams 1: %v, want ResourceExhausted", err)
	}
	// The first one still works.
	id := uuid.New()
	first.stream.Send(protoEvent(id))
	if ack, err := first.stream.Recv(); err != nil || uuid.UUID(ack.EventId) != id {
		t.Fatalf("first stream: %v", err)
	}
}

// TestUnackedPerStreamLimit: a stream never has more than max_unacked_per_stream events in the
// pipeline; the receiver stops reading it until ACKs go out, and everything arrives.
func TestUnackedPerStreamLimit(t *testing.T) {
	const limit, total = 10, 60
	h := &holdEmitter{arrived: make(chan int, 100)}
	r := start(t, func(c *grpcsrc.Config) { c.MaxUnackedPerStrm = limit; c.BatchSize = 5 }, h)
	c := dial(t, r.Addr().String(), validToken())
	if err := c.handshake(); err != nil {
		t.Fatal(err)
	}
	go func() {
		for range total {
			if err := c.stream.Send(protoEvent(uuid.New())); err != nil {
				return
			}
		}
	}()
	acks := make(chan error, total)
	go func() {
		for range total {
			_, err := c.stream.Recv()
			acks <- err
		}
	}()
	delivered := 0
	for delivered < total {
		held := <-h.arrived
		if held > limit {
			t.Fatalf("%d events of one stream in the pipeline at once, limit %d", held, limit)
		}
		if held == limit || delivered+held == total {
			h.releaseAll()
			delivered += held
			for range held {
				if err := <-acks; err != nil {
					t.Fatal(err)
				}
			}
		}
	}
}
