package pluginhost

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

type countingSink struct {
	mu     sync.Mutex
	writes int
	events []uint16
}

func (s *countingSink) Write(_ context.Context, b *flow.Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	for _, e := range b.Events {
		s.events = append(s.events, e.SrcPort)
	}
	return nil
}

type tagEnricher struct{}

func (tagEnricher) Enrich(_ context.Context, b *flow.Batch) error {
	for i := range b.Events {
		b.Events[i].RuleID = "tagged"
	}
	return nil
}

// A batch whose encoding exceeds the message limit crosses in several calls, in order, and
// arrives whole.
func TestOversizedBatchesAreSplit(t *testing.T) {
	oldSplit := pb.SplitSize
	pb.SplitSize = 7_000 // about 100 events per part (each encodes in about 70 bytes)
	defer func() { pb.SplitSize = oldSplit }()

	cs := &countingSink{}
	sinkF := component.NewSinkFactory("count", "", func() *discardConfig { return &discardConfig{} },
		func(component.Env, *discardConfig) (component.Sink, error) { return cs, nil })
	c, err := ServeInMemory(context.Background(), sinkF, "test", nil, component.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.(component.Closer).Close(context.Background())
	if err := c.(component.Sink).Write(context.Background(), flow.NewBatch(seqEvents(0, 1000), nil)); err != nil {
		t.Fatal(err)
	}
	if cs.writes < 5 || len(cs.events) != 1000 {
		t.Fatalf("%d writes with %d events, want several writes with 1000", cs.writes, len(cs.events))
	}
	for i, p := range cs.events {
		if p != uint16(i) {
			t.Fatalf("event %d out of order", i)
		}
	}

	enF := component.NewEnricherFactory("tag", "", func() *discardConfig { return &discardConfig{} },
		func(component.Env, *discardConfig) (component.Enricher, error) { return tagEnricher{}, nil })
	e, err := ServeInMemory(context.Background(), enF, "test", nil, component.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.(component.Closer).Close(context.Background())
	b := flow.NewBatch(seqEvents(0, 1000), nil)
	if err := e.(component.Enricher).Enrich(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	if len(b.Events) != 1000 || b.Events[999].RuleID != "tagged" || b.Events[999].SrcPort != 999 {
		t.Fatalf("enriched batch: %d events", len(b.Events))
	}
}

type oneBatchSource struct{ n int }

func (s oneBatchSource) Run(ctx context.Context, out component.Emitter) error {
	done := make(chan error, 1)
	if err := out.Emit(ctx, flow.NewBatch(seqEvents(0, s.n), func(err error) { done <- err })); err != nil {
		return err
	}
	return <-done
}

// A source batch too large for one message crosses in parts and reaches the pipeline as
// one batch, acknowledged once.
func TestOversizedSourceBatch(t *testing.T) {
	oldSplit := pb.SplitSize
	pb.SplitSize = 7_000
	defer func() { pb.SplitSize = oldSplit }()
	f := component.NewSourceFactory("one", "", func() *discardConfig { return &discardConfig{} },
		func(component.Env, *discardConfig) (component.Source, error) { return oneBatchSource{1000}, nil })
	c, err := ServeInMemory(context.Background(), f, "test", nil, component.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.(component.Closer).Close(context.Background())
	var batches []int
	kept := false
	out := emitFunc(func(b *flow.Batch) {
		batches = append(batches, len(b.Events))
		kept = kept || b.Encoded() != nil
		b.Release(nil)
	})
	if err := c.(component.Source).Run(context.Background(), out); err != nil {
		t.Fatal(err) // the source returns its batch's acknowledgement
	}
	if len(batches) != 1 || batches[0] != 1000 {
		t.Fatalf("pipeline got batches %v, want one of 1000", batches)
	}
	if kept {
		t.Fatal("a batch that came in parts kept an encoding (one part's) to pass on")
	}
}

type emitFunc func(*flow.Batch)

func (f emitFunc) Emit(_ context.Context, b *flow.Batch) error { f(b); return nil }

type rejectingSink struct{}

func (rejectingSink) Write(context.Context, *flow.Batch) error {
	return flow.Permanent(errors.New("endpoint answered 422 Unprocessable Entity"))
}

// A sink's permanent error crosses the plugin boundary as permanent, with its message, so
// that the runtime drops the batch instead of retrying it.
func TestPermanentErrorCrossesTheBoundary(t *testing.T) {
	f := component.NewSinkFactory("reject", "", func() *discardConfig { return &discardConfig{} },
		func(component.Env, *discardConfig) (component.Sink, error) { return rejectingSink{}, nil })
	c, err := ServeInMemory(context.Background(), f, "test", nil, component.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.(component.Closer).Close(context.Background())
	err = c.(component.Sink).Write(context.Background(), flow.NewBatch(seqEvents(0, 3), nil))
	if !flow.IsPermanent(err) || err.Error() != "endpoint answered 422 Unprocessable Entity" {
		t.Fatalf("Write returned %v (permanent: %v), want the sink's permanent error", err, flow.IsPermanent(err))
	}
}
