package pipeline

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
)

// stepSource emits the batches it is handed, one Emit each, in order.
type stepSource struct{ in chan *flow.Batch }

func (s *stepSource) Run(ctx context.Context, out component.Emitter) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case b, ok := <-s.in:
			if !ok {
				return nil
			}
			if err := out.Emit(ctx, b); err != nil {
				return nil
			}
		}
	}
}

// gatedPipeliner is a component.Pipeliner whose finish waits for gate (a plugin that is slow
// with the batches in flight).
type gatedPipeliner struct {
	gate    chan struct{}
	started chan struct{}
}

func (g *gatedPipeliner) Enrich(ctx context.Context, b *flow.Batch) error {
	return g.StartEnrich(ctx, b)()
}

func (g *gatedPipeliner) StartEnrich(_ context.Context, b *flow.Batch) func() error {
	g.started <- struct{}{}
	return func() error { <-g.gate; return nil }
}

type orderSink struct {
	mu  sync.Mutex
	got []uint64
}

func (s *orderSink) Write(_ context.Context, b *flow.Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range b.Events {
		s.got = append(s.got, e.TxPackets)
	}
	return nil
}

func (s *orderSink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.got)
}

// A reload that removes an enricher that works elsewhere while a batch of a source is in it:
// the source's next batch, which no longer goes through it, still reaches the sinks after
// the one in flight (the source's order), and both exactly once.
func TestPipelinedBatchesKeepOrderAcrossReload(t *testing.T) {
	h := newReloadHarness()
	src := &stepSource{in: make(chan *flow.Batch)}
	gp := &gatedPipeliner{gate: make(chan struct{}), started: make(chan struct{}, 16)}
	sink := &orderSink{}
	h.reg.Register(component.NewSourceFactory("step", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Source, error) { return src, nil }))
	h.reg.Register(component.NewEnricherFactory("gated", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Enricher, error) { return gp, nil }))
	h.reg.Register(component.NewSinkFactory("order", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Sink, error) { return sink, nil }))
	dataDir := t.TempDir()
	p, cancel, done := h.start(t, h.doc(t, dataDir, "sources:\n  s: {type: step}\nenrichers:\n  - {type: gated}\nsinks:\n  out: {type: order}\n"))
	acks := make(chan error, 2)
	batch := func(id uint64) *flow.Batch {
		return flow.NewBatch([]flow.Event{{TxPackets: id}}, func(err error) { acks <- err })
	}
	src.in <- batch(1)
	<-gp.started // batch 1 is in the enricher, its finish waits for the gate
	t1 := p.topo.Load()
	reloaded := make(chan error, 1)
	go func() {
		_, err := p.Reload(context.Background(), h.doc(t, dataDir, "sources:\n  s: {type: step}\nsinks:\n  out: {type: order}\n"))
		reloaded <- err
	}()
	waitFor(t, "the reload to switch topology", func() bool { return p.topo.Load() != t1 })
	src.in <- batch(2)
	// Batch 2 goes no further than the sinks' queue while batch 1 is held: give it the
	// chance to overtake, then let batch 1 go.
	deadline := time.Now().Add(2 * time.Second)
	for sink.count() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	close(gp.gate)
	if err := <-reloaded; err != nil {
		t.Fatalf("reload: %v", err)
	}
	waitFor(t, "both batches written", func() bool { return sink.count() >= 2 })
	for range 2 {
		if err := <-acks; err != nil {
			t.Errorf("ack: %v", err)
		}
	}
	cancel()
	<-done
	sink.mu.Lock()
	defer sink.mu.Unlock()
	if !slices.Equal(sink.got, []uint64{1, 2}) {
		t.Fatalf("sink wrote %v, want [1 2]: the source's order", sink.got)
	}
}
