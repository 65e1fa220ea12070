package pluginhost

import (
	"context"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
)

// TestBusySinkPluginIsNotHung: a sink plugin whose every Write takes ten ping intervals
// while it holds the lock its component's Health takes (a client library whose status waits
// behind a blocked flush, as on a busy collector) is alive: it is never killed as hung, and
// every batch is written once.
func TestBusySinkPluginIsNotHung(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	path := filepath.Join(t.TempDir(), "out.jsonl")
	c, err := f.instantiate(t, "jsonl", map[string]any{
		"path": path, "slow_write": "1s",
		"process": map[string]any{"call_timeout": "200ms", "ping_interval": "100ms"},
	})
	if err != nil {
		t.Fatal(err)
	}
	sink := c.(*remoteSink)
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := sink.Write(context.Background(), flow.NewBatch(seqEvents(i*10, 10), nil)); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r != 0 {
		t.Errorf("a live, busy plugin was restarted %v times", r)
	}
	if r := f.metric(t, "flowpipe_plugin_redelivered_events_total"); r != 0 {
		t.Errorf("redelivered_events_total = %v, want 0", r)
	}
	if strings.Contains(f.logs.String(), "the plugin is hung") {
		t.Error("a live plugin was reported hung")
	}
	if n := len(readLines(t, path)); n != 30 {
		t.Errorf("the output has %d lines, want each batch once (30)", n)
	}
}

// TestStoppedPluginIsRestartedAndRedelivered: a plugin process stopped (SIGSTOP) in the
// middle of a Write answers nothing: it is found hung, killed and restarted, the Write
// fails, and the batch written again goes to the new process and is counted as redelivered:
// nothing is lost.
func TestStoppedPluginIsRestartedAndRedelivered(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	path := filepath.Join(t.TempDir(), "out.jsonl")
	c, err := f.instantiate(t, "jsonl", map[string]any{
		"path": path, "slow_write": "300ms",
		"process": map[string]any{"call_timeout": "200ms", "ping_interval": "100ms"},
	})
	if err != nil {
		t.Fatal(err)
	}
	sink := c.(*remoteSink)
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := sink.Write(context.Background(), flow.NewBatch(seqEvents(0, 10), nil)); err != nil {
		t.Fatal(err)
	}
	old, _ := sink.in.get(context.Background())
	b := flow.NewBatch(seqEvents(10, 10), nil)
	written := make(chan error, 1)
	go func() { written <- sink.Write(context.Background(), b) }()
	// The plugin has written the batch's lines and is in its slow part: stop it there.
	waitFor(t, "the second batch's lines", func() bool { return len(readLines(t, path)) >= 20 })
	if err := syscall.Kill(old.pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	err = <-written
	if err == nil || !strings.Contains(err.Error(), "hung") {
		t.Fatalf("the Write to a stopped plugin returned %v, want a hung plugin", err)
	}
	waitGone(t, old.pid())
	// The runtime writes the batch again: to the restarted process.
	if err := sink.Write(context.Background(), b); err != nil {
		t.Fatalf("write again: %v", err)
	}
	p, _ := sink.in.get(context.Background())
	if p.pid() == old.pid() {
		t.Fatal("the stopped plugin was not replaced")
	}
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r < 1 {
		t.Errorf("restarts_total = %v, want at least 1", r)
	}
	if r := f.metric(t, "flowpipe_plugin_redelivered_events_total"); r != 10 {
		t.Errorf("redelivered_events_total = %v, want the batch (10)", r)
	}
	lines := readLines(t, path)
	seen := map[string]bool{}
	for _, l := range lines {
		seen[l] = true
	}
	for i := range 20 {
		e := testEvent(i)
		if !seen[string(flow.AppendJSON(nil, &e))] {
			t.Errorf("event %d is missing from the output", i)
		}
	}
}
