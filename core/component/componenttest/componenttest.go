// Package componenttest helps test a component outside a pipeline: an Emitter that collects
// what a source emits, and Metrics that count what a component reports. They stand in for the
// runtime (core/pipeline), which has tests of its own; a test that is about acknowledgements
// or queues should run the real runtime instead.
package componenttest

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Collector is an Emitter that keeps every event it is given and acknowledges each batch at
// once, as delivered. It is safe for concurrent use.
type Collector struct {
	mu      sync.Mutex
	events  []flow.Event
	batches int
}

// Emit keeps a copy of the batch's events and releases it. A batch still encoded
// (flow.NewEncodedBatch) is decoded first; one that does not decode is acknowledged with
// the error, and nothing of it kept.
func (c *Collector) Emit(_ context.Context, b *flow.Batch) error {
	if err := b.Decode(); err != nil {
		b.Release(err)
		return nil
	}
	c.mu.Lock()
	c.events = append(c.events, b.Events...)
	c.batches++
	c.mu.Unlock()
	b.Release(nil)
	return nil
}

// Events returns a copy of every event collected so far, in order.
func (c *Collector) Events() []flow.Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]flow.Event(nil), c.events...)
}

// Batches is the number of batches collected so far.
func (c *Collector) Batches() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.batches
}

// Metrics counts what a component reports through component.Metrics, by reason. The zero
// value is ready to use; it is safe for concurrent use.
type Metrics struct {
	mu                        sync.Mutex
	filtered, dropped, errors map[string]int
}

func (m *Metrics) add(mm *map[string]int, reason string, n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if *mm == nil {
		*mm = map[string]int{}
	}
	(*mm)[reason] += n
}

func (m *Metrics) get(mm *map[string]int, reason string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return (*mm)[reason] // the map itself is read under the lock: add may create it
}

func (m *Metrics) Filtered(reason string, n int) { m.add(&m.filtered, reason, n) }
func (m *Metrics) Dropped(reason string, n int)  { m.add(&m.dropped, reason, n) }
func (m *Metrics) Errors(reason string, n int)   { m.add(&m.errors, reason, n) }

// FilteredCount, DroppedCount and ErrorCount return what was counted for a reason.
func (m *Metrics) FilteredCount(reason string) int { return m.get(&m.filtered, reason) }
func (m *Metrics) DroppedCount(reason string) int  { return m.get(&m.dropped, reason) }
func (m *Metrics) ErrorCount(reason string) int    { return m.get(&m.errors, reason) }

// String lists every count, for failure messages.
func (m *Metrics) String() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return fmt.Sprintf("filtered %v, dropped %v, errors %v", m.filtered, m.dropped, m.errors)
}

// RunSource starts src (component.Starter) and runs it into out until the test ends, then
// cancels it, waits for Run to return and closes it (component.Closer), as the runtime would.
func RunSource(t testing.TB, src component.Source, out component.Emitter) {
	t.Helper()
	if s, ok := src.(component.Starter); ok {
		if err := s.Start(context.Background()); err != nil {
			t.Fatalf("start: %v", err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := src.Run(ctx, out); err != nil && ctx.Err() == nil {
			t.Errorf("run: %v", err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		if c, ok := src.(component.Closer); ok {
			cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer ccancel()
			if err := c.Close(cctx); err != nil {
				t.Errorf("close: %v", err)
			}
		}
	})
}

// ReadJSONLines reads a file of JSON lines written by the file sink, failing t on any line
// that is not a valid event (naming the file and line).
func ReadJSONLines(t testing.TB, path string) []flow.Event {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []flow.Event
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for line := 1; sc.Scan(); line++ {
		var e flow.Event
		if err := flow.ParseJSON(sc.Bytes(), &e); err != nil {
			t.Fatalf("%s:%d: %v", path, line, err)
		}
		out = append(out, e)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return out
}
