package grpcsink_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

// outageSink is a sink to url whose log and errors metric the test reads.
func outageSink(t *testing.T, protocol, url, secret string) (*grpcsink.Sink, *componenttest.Metrics, *testenv.SyncBuffer) {
	t.Helper()
	cfg := grpcsink.Factory().NewConfig().(*grpcsink.Config)
	cfg.URL, cfg.HMACSecret, cfg.Protocol = url, secret, protocol
	cfg.ReconnectMin, cfg.ReconnectMax = 20*time.Millisecond, 200*time.Millisecond
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	m := &componenttest.Metrics{}
	log := &testenv.SyncBuffer{}
	s, err := grpcsink.New(component.Env{Name: "agent", Metrics: m, Logger: slog.New(slog.NewTextHandler(log, nil))}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	return s, m, log
}

// A collector that is down is visible at once, while a Write waits: the sink logs it,
// counts flowpipe_errors_total{reason="stream"}, and reports itself not ready with the
// reason (it used to wait on WaitForReady in silence, ready). When the collector comes up,
// the waiting Write is delivered without any other nudge and the sink is healthy again.
func TestCollectorDownIsVisibleAndRecovers(t *testing.T) {
	eachProtocol(t, testCollectorDownIsVisibleAndRecovers)
}

func testCollectorDownIsVisibleAndRecovers(t *testing.T, protocol string) {
	addr := testenv.FreeTCPAddr(t) // nothing listens here yet
	s, m, log := outageSink(t, protocol, "http://"+addr, "outage-test-secret-0123456789")
	written := make(chan error, 1)
	go func() { written <- s.Write(context.Background(), flow.NewBatch(makeEvents(10), nil)) }()

	waitFor(t, "the outage in Health", func() bool { return s.Health() != nil })
	if err := s.Health(); !strings.Contains(err.Error(), addr) {
		t.Errorf("Health() = %v, want the collector's address and the reason", err)
	}
	waitFor(t, "an error counted", func() bool { return m.ErrorCount("stream") > 0 })
	waitFor(t, "the outage logged", func() bool { return strings.Contains(log.String(), "stream to collector failed") })
	select {
	case err := <-written:
		t.Fatalf("Write returned %v while the collector is down", err)
	default:
	}

	out := newMemEmitter()
	startReceiver(t, &grpcsrc.Config{Listen: addr, Auth: "hmac", Secrets: []string{"outage-test-secret-0123456789"}}, out)
	if err := <-written; err != nil {
		t.Fatalf("Write after the collector came up: %v", err)
	}
	if n, _ := out.counts(); n != 10 {
		t.Errorf("collector got %d events, want 10", n)
	}
	waitFor(t, "healthy again", func() bool { return s.Health() == nil })
}

// A collector that refuses the token is visible too: not ready, with the refusal as reason.
func TestRefusedTokenIsVisible(t *testing.T) { eachProtocol(t, testRefusedTokenIsVisible) }

func testRefusedTokenIsVisible(t *testing.T, protocol string) {
	r := startReceiver(t, &grpcsrc.Config{Auth: "hmac", Secrets: []string{"the-collectors-secret"}}, newMemEmitter())
	s, m, _ := outageSink(t, protocol, "http://"+r.Addr().String(), "another-secret")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = s.Write(ctx, flow.NewBatch(makeEvents(3), nil)) }()
	waitFor(t, "the refusal in Health", func() bool { return s.Health() != nil })
	if err := s.Health(); !strings.Contains(err.Error(), "Unauthenticated") {
		t.Errorf("Health() = %v, want the refusal (Unauthenticated)", err)
	}
	waitFor(t, "an error counted", func() bool { return m.ErrorCount("stream") > 0 })
}

// The receiver closes streams that carry nothing for its idle_timeout; the sink takes that
// as what it is, reopens at once, and neither counts an error nor reports itself not ready.
func TestIdleCloseIsNotAnOutage(t *testing.T) { eachProtocol(t, testIdleCloseIsNotAnOutage) }

func testIdleCloseIsNotAnOutage(t *testing.T, protocol string) {
	cfg := &grpcsrc.Config{Listen: "127.0.0.1:0", Auth: "hmac", Secrets: []string{"outage-test-secret-0123456789"}}
	fillSourceDefaults(t, cfg)
	cfg.IdleTimeout = 100 * time.Millisecond
	reg := prometheus.NewRegistry()
	r, err := grpcsrc.New(component.Env{Name: "collector", Registerer: reg}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	out := newMemEmitter()
	componenttest.RunSource(t, r, out)
	s, m, _ := outageSink(t, protocol, "http://"+r.Addr().String(), "outage-test-secret-0123456789")
	if err := s.Write(context.Background(), flow.NewBatch(makeEvents(5), nil)); err != nil {
		t.Fatal(err)
	}
	idleCloses := func() float64 {
		mfs, _ := reg.Gather()
		for _, mf := range mfs {
			if mf.GetName() != "flowpipe_grpc_source_streams_refused_total" {
				continue
			}
			for _, mm := range mf.GetMetric() {
				for _, l := range mm.GetLabel() {
					if l.GetName() == "reason" && l.GetValue() == "idle" {
						return mm.GetCounter().GetValue()
					}
				}
			}
		}
		return 0
	}
	waitFor(t, "two idle closes", func() bool { return idleCloses() >= 2 })
	if n := m.ErrorCount("stream"); n != 0 {
		t.Errorf("idle closes counted as %d stream errors", n)
	}
	if err := s.Health(); err != nil {
		t.Errorf("Health() = %v after an idle close", err)
	}
	if err := s.Write(context.Background(), flow.NewBatch(makeEvents(5), nil)); err != nil {
		t.Fatal(err)
	}
}
