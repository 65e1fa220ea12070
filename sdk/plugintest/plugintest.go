// Package plugintest runs a plugin's component against an in-memory flowpipe host, so a
// plugin author tests the code their main serves, through the real plugin protocol, with
// `go test` and no flowpipe binary:
//
//	func TestWebhook(t *testing.T) {
//		sink := plugintest.Sink(t, info, defaults, build, map[string]any{"url": srv.URL})
//		err := sink.Write(ctx, flow.NewBatch(events, nil))
//		...
//	}
package plugintest

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/pluginhost"
	"github.com/flowpipe/flowpipe/sdk"
)

// Metrics records what a component counted; it is safe for concurrent use.
type Metrics struct {
	mu sync.Mutex
	m  map[string]int
}

func (m *Metrics) add(kind, reason string, n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m == nil {
		m.m = map[string]int{}
	}
	m.m[kind+"/"+reason] += n
}

func (m *Metrics) Filtered(reason string, n int) { m.add("filtered", reason, n) }
func (m *Metrics) Dropped(reason string, n int)  { m.add("dropped", reason, n) }
func (m *Metrics) Errors(reason string, n int)   { m.add("errors", reason, n) }

// Count returns what was counted as kind ("filtered", "dropped" or "errors") for reason.
func (m *Metrics) Count(kind, reason string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.m[kind+"/"+reason]
}

// Start serves f in memory, configured with options, and starts it; it is closed (flushed)
// when the test ends. The error is the component's configuration error, as
// options.FieldErrors when it is about options.
func Start(t testing.TB, f component.Factory, options map[string]any, m *Metrics) (any, error) {
	t.Helper()
	env := component.Env{Name: f.Type, ConfigDir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	if m != nil {
		env.Metrics = m
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := pluginhost.ServeInMemory(ctx, f, "test", options, env)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := c.(component.Closer).Close(ctx); err != nil {
			t.Errorf("close %s: %v", f.Type, err)
		}
	})
	if err := c.(component.Starter).Start(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Sink serves the sink that ServeSink(info, defaults, build) would serve, configured with
// options, and fails the test if it cannot be configured or started.
func Sink[C any](t testing.TB, info sdk.Info, defaults func() *C, build func(component.Env, *C) (component.Sink, error), options map[string]any) component.Sink {
	t.Helper()
	c, err := Start(t, component.NewSinkFactory(info.Type, info.Summary, defaults, build), options, nil)
	if err != nil {
		t.Fatalf("start sink %s: %v", info.Type, err)
	}
	return c.(component.Sink)
}

// Enricher is Sink for an enricher; what it filters is counted in m (which may be nil).
func Enricher[C any](t testing.TB, info sdk.Info, defaults func() *C, build func(component.Env, *C) (component.Enricher, error), options map[string]any, m *Metrics) component.Enricher {
	t.Helper()
	c, err := Start(t, component.NewEnricherFactory(info.Type, info.Summary, defaults, build), options, m)
	if err != nil {
		t.Fatalf("start enricher %s: %v", info.Type, err)
	}
	return c.(component.Enricher)
}

// Source is Sink for a source.
func Source[C any](t testing.TB, info sdk.Info, defaults func() *C, build func(component.Env, *C) (component.Source, error), options map[string]any) component.Source {
	t.Helper()
	c, err := Start(t, component.NewSourceFactory(info.Type, info.Summary, defaults, build), options, nil)
	if err != nil {
		t.Fatalf("start source %s: %v", info.Type, err)
	}
	return c.(component.Source)
}

// Collect runs src until it returns or n events arrived, acknowledging each batch with ack
// (nil: delivered), and returns the events.
func Collect(t testing.TB, src component.Source, n int, ack error) []flow.Event {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := &collector{n: n, ack: ack, cancel: cancel}
	if err := src.Run(ctx, c); err != nil && ctx.Err() == nil {
		t.Fatalf("source Run: %v", err)
	}
	return c.events
}

type collector struct {
	mu     sync.Mutex
	events []flow.Event
	n      int
	ack    error
	cancel context.CancelFunc
}

func (c *collector) Emit(_ context.Context, b *flow.Batch) error {
	if err := b.Decode(); err != nil { // a batch still encoded (flow.NewEncodedBatch)
		b.Release(err)
		return nil
	}
	c.mu.Lock()
	c.events = append(c.events, b.Events...)
	if c.n > 0 && len(c.events) >= c.n {
		c.cancel()
	}
	c.mu.Unlock()
	b.Release(c.ack)
	return nil
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
