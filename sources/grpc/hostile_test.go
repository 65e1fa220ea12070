package grpcsource_test

import (
	"context"
	"log/slog"
	"strings"
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

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/internal/flowwire"
	"github.com/flowpipe/flowpipe/internal/testenv"
	pb "github.com/flowpipe/flowpipe/proto/flow"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

// The clients below are hostile on purpose: they hold streams without reading ACKs, without
// sending an initiator, or without sending anything; the tests assert the receiver's bounds.

func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// hostileDial opens a stream with small, fixed HTTP/2 windows (no BDP growth), so that what
// the transport can hold for a client that never reads is small and known.
func hostileDial(t *testing.T, addr string, ctx context.Context) pb.FlowService_EventsClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", validToken())
	s, err := pb.NewFlowServiceClient(conn).Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A client that sends events and never reads its ACKs is read only as far as
// max_unacked_per_stream (counted until each ACK is actually sent), not for ever; and when it
// goes away, what its stream held is released.
func TestClientThatNeverReadsAcksIsBounded(t *testing.T) {
	const limit = 1000
	const n = 200_000
	out := &sinkEmitter{} // acknowledges every batch at once: ACKs pile up at the client only
	r := start(t, func(c *grpcsrc.Config) { c.MaxUnackedPerStrm = limit }, out)
	ctx, cancel := context.WithCancel(context.Background())
	s := hostileDial(t, r.Addr().String(), ctx)
	if err := s.Send(&pb.FlowEvent{IsInitiator: true}); err != nil {
		t.Fatal(err)
	}
	sent := make(chan int, 1)
	go func() {
		i := 0
		for ; i < n; i++ {
			if s.Send(protoEvent(uuid.New())) != nil {
				break
			}
		}
		sent <- i
	}()
	received := func() float64 { return counter(t, r.reg, "flowpipe_grpc_source_events_received_total") }
	// ACKs that gRPC can hold for a client that does not read: its 64 KiB stream window and
	// the server's per-stream write buffer, at ~20 bytes an ACK, with room to spare.
	const transport = 3 * (64 << 10) / 20
	bound := float64(limit + transport)
	// Wait until the receiver has stopped reading: its unacked count sits at the limit and
	// nothing more comes in. Any moment beyond the bound fails at once.
	last, still := -1.0, 0
	waitUntil(t, "the receiver to stop reading the stream", func() bool {
		got := received()
		if got > bound {
			t.Fatalf("the receiver read %v events from a client that reads no ACKs; want at most %v (max_unacked_per_stream %d + what the transport holds)", got, bound, limit)
		}
		if got == last && gauge(t, r.reg, "flowpipe_grpc_source_unacked_events") == limit {
			still++
		} else {
			last, still = got, 0
		}
		return still >= 50
	})
	t.Logf("the receiver read %v events (bound %v) and stopped", received(), bound)
	if u := gauge(t, r.reg, "flowpipe_grpc_source_unacked_events"); u > limit {
		t.Errorf("unacked events %v, want at most %d", u, limit)
	}
	cancel() // the client goes away
	<-sent
	waitUntil(t, "the gone stream's events to be released", func() bool {
		return gauge(t, r.reg, "flowpipe_grpc_source_unacked_events") == 0 && gauge(t, r.reg, "flowpipe_grpc_source_streams") == 0
	})
}

func counter(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return 0
}

// A stream that never sends its initiator, and one that goes silent after it, are closed
// (initiator_timeout, idle_timeout), so that they give their max_streams slot back.
func TestSilentStreamsAreClosed(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, func(c *grpcsrc.Config) {
		c.MaxStreams = 2
		c.InitiatorTimeout = 200 * time.Millisecond
		c.IdleTimeout = 300 * time.Millisecond
	}, out)

	mute := hostileDial(t, r.Addr().String(), context.Background()) // sends nothing at all
	_, err := mute.Recv()                                           // the headers-and-initiator-ACK handshake
	if err != nil {
		t.Fatal(err)
	}
	_, err = mute.Recv()
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "initiator") {
		t.Errorf("a stream without initiator ended with %v, want DeadlineExceeded naming the initiator", err)
	}

	idle := dial(t, r.Addr().String(), validToken())
	if err := idle.handshake(); err != nil {
		t.Fatal(err)
	}
	if err := idle.stream.Send(protoEvent(uuid.New())); err != nil {
		t.Fatal(err)
	}
	if _, err := idle.stream.Recv(); err != nil { // its ACK
		t.Fatal(err)
	}
	_, err = idle.stream.Recv()
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "idle") {
		t.Errorf("an idle stream ended with %v, want Unavailable naming idle_timeout", err)
	}
	waitUntil(t, "the slots to be free", func() bool { return gauge(t, r.reg, "flowpipe_grpc_source_streams") == 0 })
	for _, reason := range []string{"no_initiator", "idle"} {
		if v := testutil.ToFloat64(counterVec(t, r.reg, "flowpipe_grpc_source_streams_refused_total", reason)); v != 1 {
			t.Errorf("streams closed for %s: %v, want 1", reason, v)
		}
	}
}

// A token that expires further ahead than max_token_lifetime is refused (a token for the
// year 2999 used to be accepted), and the refusal log names the peer and the token's payload;
// a flood of refusals is rate-limited in the log but every one is counted.
func TestTokenLifetimeAndRefusalLogs(t *testing.T) {
	logs := &testenv.SyncBuffer{}
	cfg := grpcsrc.Factory().NewConfig().(*grpcsrc.Config)
	cfg.Listen, cfg.Auth, cfg.Secrets = "127.0.0.1:0", "hmac", []string{secret}
	cfg.MaxTokenLifetime = 24 * time.Hour
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	r, err := grpcsrc.New(component.Env{Name: "collector", Registerer: reg, Logger: slog.New(slog.NewTextHandler(logs, nil))}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	componenttest.RunSource(t, r, &sinkEmitter{})

	y2999 := time.Date(2999, 1, 1, 0, 0, 0, 0, time.UTC)
	const tries = 20
	for range tries {
		c := dial(t, r.Addr().String(), token(y2999))
		err := c.handshake()
		if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "max_token_lifetime") {
			t.Fatalf("a token for 2999: %v, want Unauthenticated naming max_token_lifetime", err)
		}
	}
	if v := testutil.ToFloat64(counterVec(t, reg, "flowpipe_grpc_source_streams_refused_total", "token_lifetime")); v != tries {
		t.Errorf("%v refusals counted, want %d", v, tries)
	}
	lines := strings.Count(logs.String(), "stream refused")
	if lines == 0 || lines >= tries {
		t.Errorf("%d refusal log lines for %d refusals in a burst, want some but rate-limited:\n%s", lines, tries, logs.String())
	}
	payload := flowwireTokenPayload(y2999)
	if !strings.Contains(logs.String(), "peer=127.0.0.1:") || !strings.Contains(logs.String(), "token_payload="+payload) {
		t.Errorf("refusal log does not name the peer and the token payload %s:\n%s", payload, logs.String())
	}

	// Within the lifetime it is accepted.
	c := dial(t, r.Addr().String(), token(time.Now().Add(23*time.Hour)))
	if err := c.handshake(); err != nil {
		t.Errorf("a token for 23h: %v", err)
	}
}

func flowwireTokenPayload(expiry time.Time) string {
	return flowwire.MintToken([]byte(secret), expiry).Payload
}
