package pipeline

import (
	"context"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
)

// gatedEnricher holds each batch until gate gives way, and fails it if its context ends
// first, as a plugin enricher's RPC does.
type gatedEnricher struct {
	entered chan struct{}
	gate    chan struct{}
}

func (e *gatedEnricher) Enrich(ctx context.Context, _ *flow.Batch) error {
	e.entered <- struct{}{}
	select {
	case <-e.gate:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// A batch being enriched when the pipeline is told to stop is finished and delivered: the
// stop cancels the sources, not the calls on batches they already emitted (the drain
// deadline bounds those).
func TestShutdownLetsAnEnricherFinishItsBatch(t *testing.T) {
	h := newHarness()
	en := &gatedEnricher{entered: make(chan struct{}, 1), gate: make(chan struct{})}
	h.reg.Register(component.NewEnricherFactory("gated", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Enricher, error) { return en, nil }))
	src := &testSource{batches: 1, size: 10, done: make(chan struct{}), holdOpen: true}
	h.sources["src"] = src
	h.sinks["out"] = &testSink{}
	p := h.build(t, `
runtime: {shutdown_timeout: 1m}
sources: {src: {type: test}}
enrichers: [{type: gated}]
sinks: {out: {type: test}}
`)
	ctx, cancel := context.WithCancel(context.Background())
	done := runAsync(p, ctx)
	<-en.entered
	cancel() // SIGTERM while the enricher works on the batch: the sources' contexts end now
	close(en.gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := h.sinks["out"].count(); got != 10 {
		t.Fatalf("the sink has %d events, want the batch's 10", got)
	}
	if ok, _, other := src.ackCount(); ok != 1 || other != 0 {
		t.Fatalf("acks: %d ok, %d failed; want the batch acknowledged", ok, other)
	}
	if n := p.Undelivered(); n != 0 {
		t.Fatalf("%d events undelivered", n)
	}
}

// A batch that waits for room in a full queue when the pipeline is told to stop is not
// given up while the drain still has time: it is delivered once the sink catches up.
func TestShutdownDeliversABatchWaitingForRoom(t *testing.T) {
	h := newHarness()
	src := &testSource{batches: 10, size: 10, done: make(chan struct{})}
	h.sources["src"] = src
	h.sinks["slow"] = &testSink{gate: make(chan struct{})}
	p := h.build(t, `
runtime: {shutdown_timeout: 1m}
sources: {src: {type: test}}
sinks:
  slow:
    type: test
    queue: {max_batches: 1, when_full: block}
`)
	ctx, cancel := context.WithCancel(context.Background())
	done := runAsync(p, ctx)
	// One batch in the writer, one queued: the third Emit waits for room.
	waitFor(t, "the queue to fill", func() bool { return src.emitted.Load() == 2 })
	cancel() // SIGTERM while the source's third batch waits at the fan-out
	go func() {
		for range 3 {
			h.sinks["slow"].gate <- struct{}{}
		}
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := h.sinks["slow"].count(); got != 30 {
		t.Fatalf("the sink has %d events, want the 3 batches emitted before and at the stop (30)", got)
	}
	if ok, _, other := src.ackCount(); ok != 3 || other != 0 {
		t.Fatalf("acks: %d ok, %d failed; want 3 ok, none failed", ok, other)
	}
	if n := p.Undelivered(); n != 0 {
		t.Fatalf("%d events undelivered", n)
	}
}
