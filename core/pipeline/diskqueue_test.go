package pipeline

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/flowpipe/flowpipe/core/config"
)

// gauge reads one sample of a metric family from a registry.
func gauge(t *testing.T, reg *prometheus.Registry, name, component string) float64 {
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
				if l.GetName() == "component" && l.GetValue() == component {
					switch {
					case m.Gauge != nil:
						return m.Gauge.GetValue()
					case m.Counter != nil:
						return m.Counter.GetValue()
					case m.Histogram != nil:
						return float64(m.Histogram.GetSampleCount())
					}
				}
			}
		}
	}
	t.Fatalf("no %s for %s", name, component)
	return 0
}

// TestDiskQueueAcceptsWhenWrittenAndDeliversAfterRestart: with a disk queue a batch is
// accepted (the source acknowledged) once it is on disk, even while the sink cannot write;
// a stop keeps it there, uncounted as lost; the next pipeline on the same queue delivers it
// first, in order.
func TestDiskQueueAcceptsWhenWrittenAndDeliversAfterRestart(t *testing.T) {
	dir := t.TempDir()
	h := newHarness()
	src := &testSource{batches: 10, size: 10, done: make(chan struct{}), holdOpen: true}
	h.sources["src"] = src
	h.sinks["out"] = &testSink{gate: make(chan struct{})} // never opened: the sink is down
	cfg := fmt.Sprintf(`
runtime: {shutdown_timeout: 100ms}
sources: {src: {type: test}}
sinks:
  out: {type: test, queue: {type: disk, path: %q, max_size: 8MiB}}
`, dir)
	p := h.build(t, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := runAsync(p, ctx)
	waitFor(t, "every batch acknowledged while the sink is down", func() bool { ok, _, _ := src.ackCount(); return ok == 10 })
	reg := p.Metrics().Registry
	if n := gauge(t, reg, "flowpipe_sink_queue_events", "out"); n != 100 {
		t.Fatalf("queue events = %v, want 100", n)
	}
	if n := gauge(t, reg, "flowpipe_sink_queue_bytes", "out"); n <= 0 {
		t.Fatalf("queue bytes = %v", n)
	}
	if n := gauge(t, reg, "flowpipe_sink_queue_oldest_seconds", "out"); n <= 0 {
		t.Fatalf("oldest pending age = %v, want > 0", n)
	}
	// Batches written while an fsync runs share the next one (group commit).
	if n := gauge(t, reg, "flowpipe_sink_queue_fsync_seconds", "out"); n < 1 || n > 10 {
		t.Fatalf("%v fsyncs observed for 10 batches with sync: batch, want 1 to 10", n)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := testutil.ToFloat64(p.Metrics().Component("out", "sink").DropCounter("shutdown")); n != 0 {
		t.Fatalf("%v events counted as lost at shutdown; they are on disk", n)
	}

	h2 := newHarness()
	h2.sources["src"] = &testSource{batches: 2, size: 10, done: make(chan struct{})}
	sink := &testSink{}
	h2.sinks["out"] = sink
	p2 := h2.build(t, cfg)
	if err := p2.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	sink.mu.Lock()
	defer sink.mu.Unlock()
	if len(sink.got) != 120 {
		t.Fatalf("the restarted pipeline delivered %d events, want the 100 kept and 20 new", len(sink.got))
	}
	for i := range 100 {
		if sink.got[i] != uint64(i) {
			t.Fatalf("event %d is %d: what the queue held must come first, in order", i, sink.got[i])
		}
	}
}

func TestDiskQueueOptionsAreChecked(t *testing.T) {
	h := newHarness()
	h.sinks["out"] = &testSink{}
	doc := `
sources: {src: {type: test}}
sinks:
  out:
    type: test
    queue:
      type: disk
      max_events: 5
      sync: sometimes
  mem:
    type: test
    queue: {path: /tmp/x}
`
	d, err := config.Load("pipeline.yaml", []byte(doc), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(context.Background(), d, Options{Registry: h.reg})
	if err == nil {
		t.Fatal("built a pipeline with wrong queue options")
	}
	for _, want := range []string{
		"pipeline.yaml:8: sinks.out.queue.max_events: applies only to queue.type: memory",
		"pipeline.yaml:9: sinks.out.queue.sync: unknown mode",
		"pipeline.yaml:12: sinks.mem.queue.path: applies only to queue.type: disk",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("want %q in:\n%v", want, err)
		}
	}
}
