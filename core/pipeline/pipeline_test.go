package pipeline

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/backoff"
)

// The runtime is real in these tests; the components are small test components whose
// behaviour (fail, stall, record) is what each test is about.

// testSource emits `batches` batches of `size` events and records every ack.
type testSource struct {
	batches, size int
	emitted       atomic.Int64 // batches handed to Emit (returned)
	mu            sync.Mutex
	acks          []error
	ackedAt       []time.Time
	done          chan struct{} // closed when Run returns
	holdOpen      bool          // keep running after emitting until cancelled
}

func (s *testSource) Run(ctx context.Context, out component.Emitter) error {
	defer close(s.done)
	seq := 0
	for i := 0; i < s.batches && ctx.Err() == nil; i++ { // a source stops when told to
		evs := make([]flow.Event, s.size)
		for j := range evs {
			evs[j].TxPackets = uint64(seq)
			seq++
		}
		b := flow.NewBatch(evs, func(err error) {
			s.mu.Lock()
			s.acks = append(s.acks, err)
			s.ackedAt = append(s.ackedAt, time.Now())
			s.mu.Unlock()
		})
		if err := out.Emit(ctx, b); err != nil {
			return nil
		}
		s.emitted.Add(1)
	}
	if s.holdOpen {
		<-ctx.Done()
	}
	return nil
}

func (s *testSource) ackCount() (ok, drop, other int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.acks {
		switch {
		case e == nil:
			ok++
		case flow.IsDrop(e):
			drop++
		default:
			other++
		}
	}
	return
}

// testSink records what it accepted; gate (if set) must be received from before each write
// returns; failFirst fails that many writes first; failAlways never succeeds.
type testSink struct {
	mu         sync.Mutex
	got        []uint64 // TxPackets of accepted events, in order
	writes     atomic.Int64
	gate       chan struct{}
	failFirst  atomic.Int64
	failAlways bool
	reject     bool // every write fails with a permanent error
}

func (s *testSink) Write(ctx context.Context, b *flow.Batch) error {
	s.writes.Add(1)
	if s.gate != nil {
		select {
		case <-s.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if s.failAlways {
		return errors.New("collector unreachable")
	}
	if s.reject {
		return fmt.Errorf("POST: %w", flow.Permanent(errors.New("400 Bad Request: malformed batch")))
	}
	if s.failFirst.Add(-1) >= 0 {
		return errors.New("transient failure")
	}
	s.mu.Lock()
	for _, e := range b.Events {
		s.got = append(s.got, e.TxPackets)
	}
	s.mu.Unlock()
	return nil
}

func (s *testSink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.got)
}

// oddFilter removes events with odd TxPackets.
type oddFilter struct{ env component.Env }

func (f *oddFilter) Enrich(_ context.Context, b *flow.Batch) error {
	kept := b.Events[:0]
	for _, e := range b.Events {
		if e.TxPackets%2 == 0 {
			kept = append(kept, e)
		}
	}
	f.env.Metrics.Filtered("odd", len(b.Events)-len(kept))
	b.Events = kept
	return nil
}

type empty struct{}

type harness struct {
	reg     *component.Registry
	sources map[string]*testSource
	sinks   map[string]*testSink
}

func newHarness() *harness {
	h := &harness{reg: component.NewRegistry(), sources: map[string]*testSource{}, sinks: map[string]*testSink{}}
	h.reg.Register(component.NewSourceFactory("test", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Source, error) { return h.sources[env.Name], nil }))
	h.reg.Register(component.NewSinkFactory("test", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Sink, error) { return h.sinks[env.Name], nil }))
	odd := component.NewEnricherFactory("odd", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Enricher, error) { return &oddFilter{env: env}, nil })
	odd.Reasons.Filtered = []string{"odd"}
	h.reg.Register(odd)
	return h
}

func (h *harness) build(t *testing.T, yaml string) *Pipeline {
	t.Helper()
	doc, err := config.Load("pipeline.yaml", []byte(yaml), nil)
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	p, err := New(context.Background(), doc, Options{Registry: h.reg})
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	return p
}

func runAsync(p *Pipeline, ctx context.Context) chan error {
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	return done
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestAckOnlyAfterEverySinkAccepted(t *testing.T) {
	h := newHarness()
	h.sources["src"] = &testSource{batches: 5, size: 10, done: make(chan struct{})}
	h.sinks["fast"] = &testSink{}
	h.sinks["slow"] = &testSink{gate: make(chan struct{})}
	p := h.build(t, `
sources: {src: {type: test}}
sinks:
  fast: {type: test}
  slow: {type: test}
`)
	done := runAsync(p, context.Background())
	<-h.sources["src"].done
	waitFor(t, "the fast sink to take every event", func() bool { return h.sinks["fast"].count() == 50 })
	if ok, drop, other := h.sources["src"].ackCount(); ok+drop+other != 0 {
		t.Fatalf("batches were acknowledged before the slow sink accepted them: %d", ok+drop+other)
	}
	for i := 0; i < 5; i++ {
		h.sinks["slow"].gate <- struct{}{}
		want := i + 1
		waitFor(t, "an ack after the slow sink accepted a batch", func() bool { ok, _, _ := h.sources["src"].ackCount(); return ok == want })
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if ok, drop, other := h.sources["src"].ackCount(); ok != 5 || drop+other != 0 {
		t.Fatalf("acks ok=%d drop=%d other=%d, want 5 ok", ok, drop, other)
	}
}

func TestBlockPolicyAppliesBackpressure(t *testing.T) {
	h := newHarness()
	src := &testSource{batches: 20, size: 10, done: make(chan struct{})}
	h.sources["src"] = src
	h.sinks["slow"] = &testSink{gate: make(chan struct{})}
	p := h.build(t, `
sources: {src: {type: test}}
sinks:
  slow:
    type: test
    queue: {max_batches: 3, when_full: block}
`)
	done := runAsync(p, context.Background())
	// One batch in the writer, three queued: the fifth Emit blocks.
	waitFor(t, "the queue to fill", func() bool { return src.emitted.Load() == 4 })
	time.Sleep(50 * time.Millisecond)
	if n := src.emitted.Load(); n != 4 {
		t.Fatalf("source emitted %d batches past a full queue under block", n)
	}
	go func() {
		for range 20 {
			h.sinks["slow"].gate <- struct{}{}
		}
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := h.sinks["slow"].count(); got != 200 {
		t.Fatalf("sink got %d events, want 200", got)
	}
	for i, v := range h.sinks["slow"].got {
		if v != uint64(i) {
			t.Fatalf("event %d out of order: %d", i, v)
		}
	}
	if ok, _, _ := src.ackCount(); ok != 20 {
		t.Fatalf("%d batches acked ok, want 20", ok)
	}
}

// A failing sink under a drop policy must not stall the healthy sink, and every event it
// could not take must be counted with a reason.
func TestDropPoliciesIsolateAFailingSink(t *testing.T) {
	for _, policy := range []string{WhenFullDropNewest, WhenFullDropOldest} {
		t.Run(policy, func(t *testing.T) {
			h := newHarness()
			src := &testSource{batches: 200, size: 10, done: make(chan struct{})}
			h.sources["src"] = src
			h.sinks["good"] = &testSink{}
			h.sinks["bad"] = &testSink{failAlways: true}
			p := h.build(t, fmt.Sprintf(`
runtime: {shutdown_timeout: 200ms}
sources: {src: {type: test}}
sinks:
  good: {type: test}
  bad:
    type: test
    queue: {max_batches: 4, when_full: %s}
    retry: {initial_interval: 1ms, max_interval: 2ms}
`, policy))
			ctx, cancel := context.WithCancel(context.Background())
			done := runAsync(p, ctx)
			<-src.done
			waitFor(t, "the good sink to get everything", func() bool { return h.sinks["good"].count() == 2000 })
			cancel()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			m := p.Metrics()
			dropped := testutil.ToFloat64(m.Component("bad", "sink").DropCounter("queue_full"))
			shutdown := testutil.ToFloat64(m.Component("bad", "sink").DropCounter("shutdown"))
			if dropped == 0 {
				t.Error("no queue_full drops counted for the failing sink")
			}
			if dropped+shutdown != 2000 {
				t.Errorf("failing sink: %v dropped (queue_full) + %v dropped (shutdown) = %v, want every one of 2000 events counted", dropped, shutdown, dropped+shutdown)
			}
			ok, drop, other := src.ackCount()
			if ok != 0 || drop+other != 200 {
				t.Errorf("acks ok=%d drop=%d other=%d; every batch must be acked, none as delivered", ok, drop, other)
			}
			if testutil.ToFloat64(m.Component("bad", "sink").Retries) == 0 {
				t.Error("no retries counted")
			}
		})
	}
}

func TestRetriesThenDelivers(t *testing.T) {
	h := newHarness()
	h.sources["src"] = &testSource{batches: 3, size: 5, done: make(chan struct{})}
	s := &testSink{}
	s.failFirst.Store(4)
	h.sinks["flaky"] = s
	p := h.build(t, `
sources: {src: {type: test}}
sinks:
  flaky:
    type: test
    retry: {initial_interval: 1ms, max_interval: 4ms}
`)
	if err := p.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s.count() != 15 {
		t.Fatalf("delivered %d events, want 15 exactly once", s.count())
	}
	if r := testutil.ToFloat64(p.Metrics().Component("flaky", "sink").Retries); r != 4 {
		t.Errorf("retries = %v, want 4", r)
	}
	if ok, _, _ := h.sources["src"].ackCount(); ok != 3 {
		t.Errorf("acked %d, want 3", ok)
	}
}

func TestRetryLimitDropsWithReason(t *testing.T) {
	h := newHarness()
	h.sources["src"] = &testSource{batches: 2, size: 5, done: make(chan struct{})}
	h.sinks["dead"] = &testSink{failAlways: true}
	p := h.build(t, `
sources: {src: {type: test}}
sinks:
  dead:
    type: test
    retry: {initial_interval: 1ms, max_interval: 1ms, max_attempts: 3}
`)
	if err := p.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := testutil.ToFloat64(p.Metrics().Component("dead", "sink").DropCounter("retries_exhausted")); n != 10 {
		t.Errorf("retries_exhausted drops = %v, want 10", n)
	}
	if _, drop, _ := h.sources["src"].ackCount(); drop != 2 {
		t.Errorf("%d batches acked as drops, want 2", drop)
	}
}

// A batch the sink rejects as permanent is dropped at once, without a retry, counted as
// rejected, and acknowledged to its source as a drop with the sink's message.
func TestPermanentErrorDropsWithoutRetry(t *testing.T) {
	h := newHarness()
	h.sources["src"] = &testSource{batches: 2, size: 5, done: make(chan struct{})}
	h.sinks["picky"] = &testSink{reject: true}
	p := h.build(t, `
sources: {src: {type: test}}
sinks:
  picky:
    type: test
    retry: {initial_interval: 1h, max_interval: 1h}
`)
	if err := p.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	m := p.Metrics().Component("picky", "sink")
	if n := testutil.ToFloat64(m.DropCounter("rejected")); n != 10 {
		t.Errorf("rejected drops = %v, want 10", n)
	}
	if n := h.sinks["picky"].writes.Load(); n != 2 {
		t.Errorf("%d writes, want 2 (one per batch, no retry)", n)
	}
	if n := testutil.ToFloat64(m.Retries); n != 0 {
		t.Errorf("%v retries of a permanent error", n)
	}
	src := h.sources["src"]
	src.mu.Lock()
	defer src.mu.Unlock()
	for _, err := range src.acks {
		var d *flow.DropError
		if !errors.As(err, &d) || d.Component != "picky" || d.Reason != "rejected" || !strings.Contains(d.Message, "400 Bad Request: malformed batch") {
			t.Errorf("ack %v, want a rejected drop with the sink's message", err)
		}
	}
}

func TestShutdownDrainsInFlight(t *testing.T) {
	h := newHarness()
	src := &testSource{batches: 30, size: 100, done: make(chan struct{}), holdOpen: true}
	h.sources["src"] = src
	gate := make(chan struct{})
	h.sinks["slow"] = &testSink{gate: gate}
	p := h.build(t, `
runtime: {shutdown_timeout: 1m}
sources: {src: {type: test}}
sinks:
  slow: {type: test, queue: {max_batches: 100}}
`)
	ctx, cancel := context.WithCancel(context.Background())
	done := runAsync(p, ctx)
	waitFor(t, "all batches emitted", func() bool { return src.emitted.Load() == 30 })
	cancel() // SIGINT: sources stop, the 30 batches still have to reach the sink
	go func() {
		for range 30 {
			gate <- struct{}{}
		}
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := h.sinks["slow"].count(); got != 3000 {
		t.Fatalf("after shutdown the sink has %d events, want all 3000", got)
	}
	if ok, _, _ := src.ackCount(); ok != 30 {
		t.Fatalf("%d batches acked ok, want 30", ok)
	}
}

func TestShutdownTimeoutGivesUpAndCounts(t *testing.T) {
	h := newHarness()
	src := &testSource{batches: 10, size: 10, done: make(chan struct{}), holdOpen: true}
	h.sources["src"] = src
	h.sinks["stuck"] = &testSink{gate: make(chan struct{})} // never opened
	p := h.build(t, `
runtime: {shutdown_timeout: 100ms}
sources: {src: {type: test}}
sinks:
  stuck: {type: test}
`)
	ctx, cancel := context.WithCancel(context.Background())
	done := runAsync(p, ctx)
	waitFor(t, "all batches emitted", func() bool { return src.emitted.Load() == 10 })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	_, _, other := src.ackCount()
	if other != 10 {
		t.Fatalf("%d batches acked with an error, want all 10", other)
	}
	src.mu.Lock()
	for _, e := range src.acks {
		if !errors.Is(e, flow.ErrShutdown) {
			t.Errorf("ack %v, want ErrShutdown", e)
		}
	}
	src.mu.Unlock()
	if n := testutil.ToFloat64(p.Metrics().Component("stuck", "sink").DropCounter("shutdown")); n != 100 {
		t.Errorf("shutdown drops = %v, want 100", n)
	}
}

func TestEnricherFiltersAndCounts(t *testing.T) {
	h := newHarness()
	h.sources["src"] = &testSource{batches: 4, size: 25, done: make(chan struct{})}
	h.sinks["out"] = &testSink{}
	p := h.build(t, `
sources: {src: {type: test}}
enrichers: [{type: odd}]
sinks: {out: {type: test}}
`)
	if err := p.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := h.sinks["out"].count(); got != 50 {
		t.Fatalf("sink got %d events, want the 50 even ones", got)
	}
	if n := testutil.ToFloat64(p.Metrics().Component("odd", "enricher").FilterCounter("odd")); n != 50 {
		t.Errorf("filtered = %v, want 50", n)
	}
	if ok, _, _ := h.sources["src"].ackCount(); ok != 4 {
		t.Errorf("acked %d, want 4 (filtered events are done, not lost)", ok)
	}
}

func TestBuildReportsComponentProblemsWithLines(t *testing.T) {
	h := newHarness()
	doc, err := config.Load("pipeline.yaml", []byte(`
sources:
  src: {type: nosuch}
sinks:
  out:
    type: test
    surplus: 1
    queue:
      max_events: -1
      when_full: explode
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(context.Background(), doc, Options{Registry: h.reg})
	var ps config.Problems
	if !errors.As(err, &ps) {
		t.Fatalf("want Problems, got %v", err)
	}
	text := ps.Error()
	for _, want := range []string{
		"pipeline.yaml:3: sources.src.type: unknown source type \"nosuch\"",
		"pipeline.yaml:7: sinks.out.surplus: unknown key",
		"pipeline.yaml:9: sinks.out.queue.max_events: must be at least 1",
		"pipeline.yaml:10: sinks.out.queue.when_full: unknown policy \"explode\"",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("missing %q in:\n%s", want, text)
		}
	}
}

func TestFactoryInFlightIsTheSinksDefault(t *testing.T) {
	h := newHarness()
	f := component.NewSinkFactory("wide", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Sink, error) { return &testSink{}, nil })
	f.InFlight = 8
	h.reg.Register(f)
	h.sources["src"] = &testSource{done: make(chan struct{})}
	p := h.build(t, `
sources: {src: {type: test}}
sinks:
  a: {type: wide}
  b: {type: wide, in_flight: 2}
  c: {type: test}
`)
	got := map[string]int{}
	for _, s := range p.topo.Load().sinks {
		got[s.name] = s.settings.InFlight
	}
	if got["a"] != 8 || got["b"] != 2 || got["c"] != 1 {
		t.Fatalf("in_flight = %v, want a:8 (factory default) b:2 (set) c:1 (runtime default)", got)
	}
	p.Close(context.Background())
}

func TestReadyReportsAFailingSink(t *testing.T) {
	h := newHarness()
	h.sources["src"] = &testSource{batches: 1, size: 1, done: make(chan struct{}), holdOpen: true}
	bad := &testSink{}
	bad.failFirst.Store(1 << 30)
	h.sinks["bad"] = bad
	p := h.build(t, `
runtime: {shutdown_timeout: 50ms}
sources: {src: {type: test}}
sinks:
  bad:
    type: test
    retry: {initial_interval: 1ms, max_interval: 1ms}
`)
	if err := p.Ready(); err == nil {
		t.Fatal("ready before running")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := runAsync(p, ctx)
	waitFor(t, "three failed writes", func() bool { return bad.writes.Load() >= backoff.FailingAfter })
	err := p.Ready()
	if err == nil || !strings.Contains(err.Error(), "sink bad") || !strings.Contains(err.Error(), "transient failure") {
		t.Errorf("Ready() = %v, want the failing sink and its error", err)
	}
	bad.failFirst.Store(0) // the collector is back
	waitFor(t, "recovery", func() bool { return p.Ready() == nil })
	cancel()
	<-done
}

func TestProcessSettingsInProcessAreAnError(t *testing.T) {
	h := newHarness()
	h.sources["src"] = &testSource{done: make(chan struct{})}
	doc, err := config.Load("pipeline.yaml", []byte(`
sources: {src: {type: test}}
sinks:
  out:
    type: test
    isolation: inproc
    process: {call_timeout: 5s}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(context.Background(), doc, Options{Registry: h.reg})
	if err == nil || !strings.Contains(err.Error(), "pipeline.yaml:7: sinks.out.process: process: settings apply only to a component run out of process") {
		t.Fatalf("got %v", err)
	}
}

// clockHolder is a Holder with a goroutine of its own from Start to Close, like the
// aggregate enricher's window clock; it counts its Closes.
type clockHolder struct {
	next   component.Emitter
	stop   chan struct{}
	done   chan struct{}
	closes *atomic.Int64
}

func (h *clockHolder) Attach(next component.Emitter)             { h.next = next }
func (h *clockHolder) Enrich(context.Context, *flow.Batch) error { return nil }
func (h *clockHolder) Start(context.Context) error {
	h.stop, h.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(h.done)
		<-h.stop
	}()
	return nil
}
func (h *clockHolder) Close(context.Context) error {
	h.closes.Add(1)
	if h.stop != nil {
		close(h.stop)
		<-h.done
	}
	return nil
}

// closeCounter is a sink or source that counts its Closes; failStart makes Start fail.
type closeCounter struct {
	testSink
	closes    *atomic.Int64
	failStart bool
}

func (c *closeCounter) Start(context.Context) error {
	if c.failStart {
		return errors.New("no such device")
	}
	return nil
}
func (c *closeCounter) Close(context.Context) error { c.closes.Add(1); return nil }
func (c *closeCounter) Run(ctx context.Context, _ component.Emitter) error {
	<-ctx.Done()
	return nil
}

// When a source fails to start after the other components started, every component that
// was built is closed exactly once, the holder included, and no goroutine is left behind.
func TestStartFailureClosesEverythingOnce(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	closes := map[string]*atomic.Int64{"out": {}, "hold": {}, "ok": {}, "broken": {}}
	reg := component.NewRegistry()
	reg.Register(component.NewSinkFactory("counted", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Sink, error) {
			return &closeCounter{closes: closes[env.Name]}, nil
		}))
	reg.Register(component.NewSourceFactory("counted", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Source, error) {
			return &closeCounter{closes: closes[env.Name], failStart: env.Name == "broken"}, nil
		}))
	f := component.NewEnricherFactory("clock", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Enricher, error) {
			return &clockHolder{closes: closes[env.Name]}, nil
		})
	f.Holds = true
	reg.Register(f)
	doc, err := config.Load("pipeline.yaml", []byte(`
sources:
  ok: {type: counted}
  broken: {type: counted}
enrichers:
  - {type: clock, name: hold}
sinks:
  out: {type: counted}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(context.Background(), doc, Options{Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	err = p.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "start source broken: no such device") {
		t.Fatalf("Run: %v, want the source's start error", err)
	}
	for name, n := range closes {
		if n.Load() != 1 {
			t.Errorf("%s closed %d times, want once", name, n.Load())
		}
	}
}

// Every drop and error reason the runtime counts is published at 0 for each component as
// soon as the pipeline is built, before anything happened.
func TestCountersPublishedAtZero(t *testing.T) {
	h := newHarness()
	h.sources["src"] = &testSource{done: make(chan struct{})}
	h.sinks["out"] = &testSink{}
	p := h.build(t, "sources: {src: {type: test}}\nenrichers: [{type: odd, name: filter}]\nsinks: {out: {type: test}}\n")
	defer p.Close(context.Background())
	mfs, err := p.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, mf := range mfs {
		for _, m := range mf.Metric {
			l := map[string]string{}
			for _, lp := range m.Label {
				l[lp.GetName()] = lp.GetValue()
			}
			if m.GetCounter().GetValue() == 0 {
				got[mf.GetName()+"/"+l["component"]+"/"+l["reason"]] = true
			}
		}
	}
	for _, want := range []string{
		"flowpipe_events_dropped_total/out/queue_full", "flowpipe_events_dropped_total/out/retries_exhausted",
		"flowpipe_events_dropped_total/out/rejected", "flowpipe_events_dropped_total/out/shutdown",
		"flowpipe_errors_total/out/write", "flowpipe_events_dropped_total/filter/enrich_error",
		"flowpipe_errors_total/filter/enrich", "flowpipe_errors_total/src/run",
		"flowpipe_events_in_total/out/", "flowpipe_events_out_total/src/",
		"flowpipe_events_filtered_total/filter/odd", // the factory's own reason
	} {
		if !got[want] {
			t.Errorf("%s is not published at 0", want)
		}
	}
}

// remoteLike is a component.Pipeliner: StartEnrich hands the batch to a worker of its own
// (as a plugin process works beside the host) and finish waits for it; the worker finishes
// batches in no particular order, and fails every failEvery-th.
type remoteLike struct {
	env       component.Env
	failEvery int
	started   atomic.Int64
	inFlight  atomic.Int64
	maxFlight atomic.Int64
}

func (r *remoteLike) Enrich(ctx context.Context, b *flow.Batch) error { return r.StartEnrich(ctx, b)() }

func (r *remoteLike) StartEnrich(_ context.Context, b *flow.Batch) func() error {
	n := r.started.Add(1)
	if f := r.inFlight.Add(1); f > r.maxFlight.Load() {
		r.maxFlight.Store(f)
	}
	done := make(chan error, 1)
	go func() {
		time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
		if r.failEvery > 0 && n%int64(r.failEvery) == 0 {
			done <- errors.New("the plugin failed this one")
			return
		}
		for i := range b.Events {
			b.Events[i].RuleID = "enriched"
		}
		done <- nil
	}()
	return func() error { defer r.inFlight.Add(-1); return <-done }
}

// An enricher that works elsewhere has more than one batch of a source in flight, and the
// batches still reach the sinks in the order the source emitted them, enriched, each
// acknowledged once; one it fails is dropped and counted, as from Enrich.
func TestPipelinedEnricherKeepsOrder(t *testing.T) {
	h := newHarness()
	rl := &remoteLike{failEvery: 7}
	f := component.NewEnricherFactory("remote", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Enricher, error) { rl.env = env; return rl, nil })
	h.reg.Register(f)
	h.sources["src"] = &testSource{batches: 200, size: 5, done: make(chan struct{})}
	sink := &enrichedSink{}
	h.reg.Register(component.NewSinkFactory("enriched", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Sink, error) { return sink, nil }))
	p := h.build(t, `
sources: {src: {type: test}}
enrichers: [{type: remote}, {type: odd}]
sinks: {out: {type: enriched}}
`)
	if err := p.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	failed := 200 / 7
	ok, drop, other := h.sources["src"].ackCount()
	if ok != 200-failed || drop+other != failed {
		t.Fatalf("acks: %d ok, %d dropped, %d other; want %d ok and %d failed", ok, drop, other, 200-failed, failed)
	}
	if rl.maxFlight.Load() < 2 {
		t.Errorf("at most %d batch in flight at once: nothing was pipelined", rl.maxFlight.Load())
	}
	if rl.maxFlight.Load() > pipedDepth {
		t.Errorf("%d batches in flight at once, more than %d", rl.maxFlight.Load(), pipedDepth)
	}
	sink.mu.Lock()
	defer sink.mu.Unlock()
	var want []uint64 // the even events of the batches not failed
	for k := 1; k <= 200; k++ {
		for seq := uint64((k - 1) * 5); seq < uint64(k*5); seq++ {
			if k%7 != 0 && seq%2 == 0 {
				want = append(want, seq)
			}
		}
	}
	if !slices.Equal(sink.got, want) {
		t.Fatalf("sink got %d events, want %d, in order", len(sink.got), len(want))
	}
	if !sink.allEnriched {
		t.Fatal("an event reached the sink without the enricher's change")
	}
	if n := testutil.ToFloat64(p.Metrics().Component("remote", "enricher").DropCounter("enrich_error")); n != float64(failed*5) {
		t.Errorf("enrich_error drops = %v, want %d", n, failed*5)
	}
}

type enrichedSink struct {
	mu          sync.Mutex
	got         []uint64
	allEnriched bool
	seen        bool
}

func (s *enrichedSink) Write(_ context.Context, b *flow.Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.seen {
		s.seen, s.allEnriched = true, true
	}
	for _, e := range b.Events {
		s.got = append(s.got, e.TxPackets)
		s.allEnriched = s.allEnriched && e.RuleID == "enriched"
	}
	return nil
}
