package replay

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
)

func TestMalformedLinesAreCountedAndSkipped(t *testing.T) {
	dir := t.TempDir()
	ids := flow.NewIDGen()
	var sb strings.Builder
	for i := range 5 {
		e := flow.Event{EventID: ids.New(), FlowID: ids.New(), Type: flow.TypeStart, Timestamp: flow.Now(), Protocol: 6, TxBytes: uint64(i)}
		sb.Write(flow.AppendJSON(nil, &e))
		sb.WriteByte('\n')
		if i == 1 {
			sb.WriteString("{\"event_id\": \"not-a-uuid\"}\n")
		}
		if i == 3 {
			sb.WriteString("garbage\n\n")
		}
	}
	path := filepath.Join(dir, "in.jsonl")
	os.WriteFile(path, []byte(sb.String()), 0o644)

	var logs strings.Builder
	m := &componenttest.Metrics{}
	env := component.Env{Name: "r", ConfigDir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m}
	out := &componenttest.Collector{}
	if err := New(env, &Config{Path: "in.jsonl", BatchSize: 2, OnError: "skip"}).Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	events := out.Events()
	if len(events) != 5 || m.DroppedCount("malformed") != 2 {
		t.Fatalf("got %d events and %d malformed, want 5 and 2", len(events), m.DroppedCount("malformed"))
	}
	for i, e := range events {
		if e.TxBytes != uint64(i) {
			t.Fatalf("event %d out of order", i)
		}
	}
	if !strings.Contains(logs.String(), "line=3") || !strings.Contains(logs.String(), "line=6") {
		t.Errorf("log does not name the bad lines 3 and 6:\n%s", logs.String())
	}

	err := New(env, &Config{Path: "in.jsonl", BatchSize: 2, OnError: "stop"}).Run(context.Background(), &componenttest.Collector{})
	if err == nil || !strings.Contains(err.Error(), "in.jsonl:3: missing key \"flow_id\"") {
		t.Fatalf("on_error: stop gave %v, want an error naming in.jsonl:3 and the missing key", err)
	}
}

func TestMissingFileIsAClearError(t *testing.T) {
	env := component.Env{Name: "r", ConfigDir: t.TempDir(), Logger: slog.Default(), Metrics: component.NopMetrics{}}
	err := New(env, &Config{Path: "nope.jsonl", BatchSize: 10, OnError: "skip"}).Run(context.Background(), &componenttest.Collector{})
	if err == nil || !strings.Contains(err.Error(), "nope.jsonl") {
		t.Fatalf("got %v", err)
	}
}

// A directory or a glob replays a file sink's rotated set oldest first: the rotated files
// by their UTC time, then the current file.
func TestRotatedSetOldestFirst(t *testing.T) {
	dir := t.TempDir()
	ids := flow.NewIDGen()
	write := func(name string, seq uint64) {
		var sb strings.Builder
		for range 10 {
			e := flow.Event{EventID: ids.New(), FlowID: ids.New(), Type: flow.TypeStart, Timestamp: flow.Now(), Protocol: 6, TxBytes: seq}
			seq++
			sb.Write(flow.AppendJSON(nil, &e))
			sb.WriteByte('\n')
		}
		if err := os.WriteFile(filepath.Join(dir, "flows", name), []byte(sb.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.Mkdir(filepath.Join(dir, "flows"), 0o755)
	// Written in an order that is not the files' order, so that neither creation nor
	// modification time decides.
	write("flows.jsonl", 20)
	write("flows.jsonl.20260102T000000.000000000Z", 10)
	write("flows.jsonl.20260101T000000.000000000Z", 0)
	env := component.Env{Name: "r", ConfigDir: dir, Logger: slog.Default(), Metrics: component.NopMetrics{}}
	for _, path := range []string{"flows", "flows/flows.jsonl*"} {
		out := &componenttest.Collector{}
		if err := New(env, &Config{Path: path, BatchSize: 7, OnError: "skip"}).Run(context.Background(), out); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		events := out.Events()
		if len(events) != 30 {
			t.Fatalf("%s: %d events, want 30", path, len(events))
		}
		for i, e := range events {
			if e.TxBytes != uint64(i) {
				t.Fatalf("%s: event %d is %d: not oldest first", path, i, e.TxBytes)
			}
		}
	}
	err := New(env, &Config{Path: "flows/nothing*", BatchSize: 7, OnError: "skip"}).Run(context.Background(), &componenttest.Collector{})
	if err == nil || !strings.Contains(err.Error(), "no file matches") {
		t.Fatalf("a glob that matches nothing: %v", err)
	}
}
