package pluginhost

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
)

type discardSink struct{}

func (discardSink) Write(context.Context, *flow.Batch) error { return nil }

type discardConfig struct{}

var discardFactory = component.NewSinkFactory("discard", "", func() *discardConfig { return &discardConfig{} },
	func(component.Env, *discardConfig) (component.Sink, error) { return discardSink{}, nil })

// benchEvents are like the generate source's: addresses, ports, counters, a source name.
func benchEvents(n int) []flow.Event {
	evs := seqEvents(0, n)
	for i := range evs {
		evs[i].SrcAddr = flow.Event{}.SrcAddr
		evs[i].RuleID = "allow-web"
	}
	return evs
}

func benchSink(b *testing.B, sink component.Sink, batch int) {
	evs := benchEvents(batch)
	b.ResetTimer()
	for b.Loop() {
		if err := sink.Write(context.Background(), flow.NewBatch(evs, nil)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkSinkInMemory is the protocol and encoding cost without a process: both sides in
// this process over an in-memory gRPC connection.
func BenchmarkSinkInMemory(b *testing.B) {
	c, err := ServeInMemory(context.Background(), discardFactory, "bench", nil, component.Env{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.(component.Closer).Close(context.Background())
	benchSink(b, c.(component.Sink), 1024)
}

// BenchmarkSinkProcess writes to the test plugin's jsonl sink in another process, writing
// to /dev/null.
func BenchmarkSinkProcess(b *testing.B) {
	h := NewHost(HostOptions{Registry: component.NewRegistry(), PluginDir: pluginDir})
	env := component.Env{Name: "bench", Kind: component.KindSink, ConfigDir: b.TempDir(), Logger: discardLogger(), Metrics: component.NopMetrics{}}
	_ = filepath.Join
	c, err := h.Instantiate(context.Background(), configComponent(component.KindSink, "bench", "jsonl", map[string]any{"path": "/dev/null", "discard": true}), env)
	if err != nil {
		b.Fatal(err)
	}
	defer c.(component.Closer).Close(context.Background())
	if err := c.(component.Starter).Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	for _, n := range []int{256, 1024, 4096} {
		b.Run(fmt.Sprintf("batch=%d", n), func(b *testing.B) { benchSink(b, c.(component.Sink), n) })
	}
}

// releasingEmitter acknowledges every batch at once and keeps nothing.
type releasingEmitter struct{}

func (releasingEmitter) Emit(_ context.Context, b *flow.Batch) error {
	b.Release(nil)
	return nil
}

// BenchmarkSourceProcess streams batches of 1,024 events from the test plugin's seq source
// in another process, through the emit window, to an emitter that takes them at once.
func BenchmarkSourceProcess(b *testing.B) {
	const batch = 1024
	h := NewHost(HostOptions{Registry: component.NewRegistry(), PluginDir: pluginDir})
	env := component.Env{Name: "bench", Kind: component.KindSource, ConfigDir: b.TempDir(), Logger: discardLogger(), Metrics: component.NopMetrics{}}
	c, err := h.Instantiate(context.Background(), configComponent(component.KindSource, "bench", "seq", map[string]any{"count": b.N * batch, "batch": batch}), env)
	if err != nil {
		b.Fatal(err)
	}
	defer c.(component.Closer).Close(context.Background())
	if err := c.(component.Starter).Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	if err := c.(component.Source).Run(context.Background(), releasingEmitter{}); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkEnricherProcess enriches batches of 1,024 events in the test plugin's tag
// enricher in another process.
func BenchmarkEnricherProcess(b *testing.B) {
	h := NewHost(HostOptions{Registry: component.NewRegistry(), PluginDir: pluginDir})
	env := component.Env{Name: "bench", Kind: component.KindEnricher, ConfigDir: b.TempDir(), Logger: discardLogger(), Metrics: component.NopMetrics{}}
	c, err := h.Instantiate(context.Background(), configComponent(component.KindEnricher, "bench", "tag", map[string]any{"rule": "r"}), env)
	if err != nil {
		b.Fatal(err)
	}
	defer c.(component.Closer).Close(context.Background())
	en := c.(component.Enricher)
	const batch = 1024
	evs := benchEvents(batch)
	work := make([]flow.Event, batch)
	for b.Loop() {
		copy(work, evs)
		if err := en.Enrich(context.Background(), flow.NewBatch(work, nil)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "events/s")
}
