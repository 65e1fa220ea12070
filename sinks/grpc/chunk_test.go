package grpcsink_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
	"github.com/flowpipe/flowpipe/internal/testenv"
	pb "github.com/flowpipe/flowpipe/proto/flow"
	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

// stingyReceiver is a NetBird-only receiver (generated code, no flowpipe stream) that ACKs
// the first `acks` events it receives and none after.
type stingyReceiver struct {
	pb.UnimplementedFlowServiceServer
	mu    sync.Mutex
	acks  int
	acked map[uuid.UUID]bool
}

func (m *stingyReceiver) Events(stream pb.FlowService_EventsServer) error {
	if err := stream.SendHeader(metadata.Pairs("receiver", "stingy")); err != nil {
		return err
	}
	if err := stream.Send(&pb.FlowEventAck{IsInitiator: true}); err != nil {
		return err
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			return err
		}
		if ev.IsInitiator {
			continue
		}
		id, err := uuid.FromBytes(ev.EventId)
		if err != nil {
			return status.Error(codes.InvalidArgument, "bad event_id")
		}
		m.mu.Lock()
		ack := len(m.acked) < m.acks
		if ack {
			m.acked[id] = true
		}
		m.mu.Unlock()
		if ack {
			if err := stream.Send(&pb.FlowEventAck{EventId: ev.EventId}); err != nil {
				return err
			}
		}
	}
}

// A Write's events, part of them ACKed one by one by a NetBird receiver, the rest carried
// over to a flowpipe collector on flowpipe's stream when the NetBird one goes away (urls
// lists both, protocol auto): the flowpipe collector gets exactly the events not ACKed yet,
// and the Write completes.
func TestPartlyAckedChunkMovesToTheBatchStream(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	stingy := &stingyReceiver{acks: 300, acked: map[uuid.UUID]bool{}}
	srv := grpc.NewServer()
	pb.RegisterFlowServiceServer(srv, stingy)
	go srv.Serve(lis)
	defer srv.Stop()
	later := testenv.FreeTCPAddr(t) // the flowpipe collector's, not listening yet: the sink starts on the NetBird one

	cfg := grpcsink.Factory().NewConfig().(*grpcsink.Config)
	cfg.URLs = []string{"http://" + lis.Addr().String(), "http://" + later}
	cfg.MaxInFlight = 4000 // messages of up to 1,000 events: the Write below is one chunk
	cfg.ReconnectMin, cfg.ReconnectMax = 20*time.Millisecond, 200*time.Millisecond
	cfg.AckTimeout = 10 * time.Minute
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	s, err := grpcsink.New(component.Env{Name: "agent", Registerer: reg}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())

	events := makeEvents(1000)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	written := make(chan error, 1)
	go func() { written <- s.Write(ctx, flow.NewBatch(events, nil)) }()
	waitFor(t, "300 events ACKed by the NetBird receiver", func() bool {
		return metric(t, reg, "flowpipe_grpc_sink_events_acked_total") == 300
	})
	if got := metric(t, reg, "flowpipe_grpc_sink_unacked_events"); got != 700 {
		t.Fatalf("%v events unacked, want 700", got)
	}

	m := newMemEmitter()
	startReceiver(t, &grpcsrc.Config{Auth: "none", Listen: later}, m)
	srv.Stop()
	if err := <-written; err != nil {
		t.Fatalf("write: %v", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.seen) != 700 || m.events != 700 {
		t.Fatalf("flowpipe collector got %d events (%d distinct), want the 700 not ACKed", m.events, len(m.seen))
	}
	for id := range m.seen {
		if stingy.acked[id] {
			t.Fatalf("event %s was ACKed by the NetBird receiver and sent again", id)
		}
	}
}

// The same event twice in the input — within one Write and across concurrent Writes — is
// delivered once and every Write completes, on both protocols.
func TestDuplicateEventsInTheInput(t *testing.T) { eachProtocol(t, testDuplicateEventsInTheInput) }

func testDuplicateEventsInTheInput(t *testing.T, protocol string) {
	m := newMemEmitter()
	r := startReceiver(t, &grpcsrc.Config{Auth: "none"}, m)
	s := newSink(t, &grpcsink.Config{Protocol: protocol, URL: "http://" + r.Addr().String(), MaxInFlight: 2000})
	events := makeEvents(3000)
	a := append([]flow.Event(nil), events[:1500]...)
	a[700] = a[3]                                    // twice in one Write
	b := append([]flow.Event(nil), events[1000:]...) // events[1000:1500] in both Writes
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	errs := make(chan error, 2)
	for _, batch := range [][]flow.Event{a, b} {
		go func() { errs <- s.Write(ctx, flow.NewBatch(batch, nil)) }()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	distinct, _ := m.counts()
	if want := 3000 - 1; distinct != want || m.duplicates() != 0 {
		t.Fatalf("collector passed on %d distinct events with %d duplicates, want %d once each", distinct, m.duplicates(), want)
	}
}

// keepEmitter keeps every event it is given, by ID, and acknowledges each batch.
type keepEmitter struct {
	mu     sync.Mutex
	events map[uuid.UUID]flow.Event
}

func (k *keepEmitter) Emit(_ context.Context, b *flow.Batch) error {
	k.mu.Lock()
	for _, e := range b.Events {
		k.events[e.EventID] = e
	}
	k.mu.Unlock()
	b.Release(nil)
	return nil
}

// A batch that carries its packed encoding (flow.Batch.SetEncoded, as the plugin host passes
// it on) goes out as those bytes on flowpipe's stream; a batch too large for one message is
// encoded from its events and cut as usual. To tell the two apart, the encodings given here
// say CommunityID "1:enc" where the events say "1:abc".
func TestBatchWithItsEncodingArrivesIntact(t *testing.T) {
	k := &keepEmitter{events: map[uuid.UUID]flow.Event{}}
	r := startReceiver(t, &grpcsrc.Config{Auth: "none"}, k)
	s := newSink(t, &grpcsink.Config{Protocol: "flowpipe", URL: "http://" + r.Addr().String(), MaxInFlight: 8000})
	events := makeEvents(4000)
	for i := range events {
		events[i].Source = "gen"
		events[i].CommunityID = "1:abc"
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, part := range [][]flow.Event{events[:1000], events[1000:]} { // one message; two (2,000 events at most in one)
		b := flow.NewBatch(part, nil)
		marked := append([]flow.Event(nil), part...)
		for i := range marked {
			marked[i].CommunityID = "1:enc"
		}
		b.SetEncoded(codec.Append(nil, marked))
		if err := s.Write(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.events) != len(events) {
		t.Fatalf("%d events arrived, want %d", len(k.events), len(events))
	}
	for i, e := range events {
		got := k.events[e.EventID]
		got.Source = e.Source // the receiver names itself as the source
		if i < 1000 {
			e.CommunityID = "1:enc" // sent as its encoding
		}
		if got != e {
			t.Fatalf("event arrived as %+v, sent %+v", got, e)
		}
	}
}

// failFirst fails the first batch it is given (its events are not ACKed to the client) and
// keeps and acknowledges the others.
type failFirst struct {
	mu     sync.Mutex
	failed int
	seen   map[uuid.UUID]int
}

func (f *failFirst) Emit(_ context.Context, b *flow.Batch) error {
	f.mu.Lock()
	var err error
	if f.failed == 0 {
		f.failed = len(b.Events)
		err = errors.New("disk full")
	} else {
		for _, e := range b.Events {
			f.seen[e.EventID]++
		}
	}
	f.mu.Unlock()
	b.Release(err)
	return nil
}

// Events whose ACK does not come within ack_timeout are sent again on the same stream, and
// the Write completes once they are ACKed, on both protocols.
func TestAckTimeoutResendsOnTheSameStream(t *testing.T) { eachProtocol(t, testAckTimeoutResends) }

func testAckTimeoutResends(t *testing.T, protocol string) {
	f := &failFirst{seen: map[uuid.UUID]int{}}
	r := startReceiver(t, &grpcsrc.Config{Auth: "none"}, f)
	cfg := grpcsink.Factory().NewConfig().(*grpcsink.Config)
	cfg.URL, cfg.Protocol, cfg.AckTimeout = "http://"+r.Addr().String(), protocol, 300*time.Millisecond
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	log := &testenv.SyncBuffer{}
	s, err := grpcsink.New(component.Env{Name: "agent", Registerer: reg, Logger: slog.New(slog.NewTextHandler(log, nil))}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	events := makeEvents(1500)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.Write(ctx, flow.NewBatch(events, nil)); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failed == 0 || len(f.seen) != len(events) {
		t.Fatalf("collector failed %d events and then got %d of %d", f.failed, len(f.seen), len(events))
	}
	if resent := metric(t, reg, "flowpipe_grpc_sink_events_resent_total"); resent < float64(f.failed) {
		t.Fatalf("%v events resent, want at least the %d not ACKed", resent, f.failed)
	}
	if got := metric(t, reg, "flowpipe_grpc_sink_unacked_events"); got != 0 {
		t.Fatalf("%v events still unacked after the Write", got)
	}
	if n := strings.Count(log.String(), "stream to collector open"); n != 1 {
		t.Fatalf("%d streams opened, want the resend on the first:\n%s", n, log)
	}
}
