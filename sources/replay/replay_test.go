package replay

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

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

// A line over max_line_size does not end the replay: under on_error: skip it is skipped and
// counted, and every good line after it is delivered; under stop it fails at its line.
func TestLongLineIsSkippedAndCounted(t *testing.T) {
	dir := t.TempDir()
	ids := flow.NewIDGen()
	var sb strings.Builder
	good := func(i int) {
		e := flow.Event{EventID: ids.New(), FlowID: ids.New(), Type: flow.TypeStart, Timestamp: flow.Now(), Protocol: 6, TxBytes: uint64(i)}
		sb.Write(flow.AppendJSON(nil, &e))
		sb.WriteByte('\n')
	}
	for i := range 3 {
		good(i)
	}
	sb.WriteString(`{"event_id":"` + strings.Repeat("x", 3<<20) + "\"}\n") // 3 MiB, line 4
	for i := 3; i < 1503; i++ {
		good(i)
	}
	path := filepath.Join(dir, "in.jsonl")
	if err := os.WriteFile(path, []byte(sb.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	var logs strings.Builder
	m := &componenttest.Metrics{}
	env := component.Env{Name: "r", ConfigDir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m}
	out := &componenttest.Collector{}
	cfg := defaults()
	cfg.Path = "in.jsonl"
	if err := New(env, cfg).Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	events := out.Events()
	if len(events) != 1503 || m.DroppedCount("line_too_long") != 1 {
		t.Fatalf("got %d events and %d too long, want 1503 and 1", len(events), m.DroppedCount("line_too_long"))
	}
	for i, e := range events {
		if e.TxBytes != uint64(i) {
			t.Fatalf("event %d out of order", i)
		}
	}
	if !strings.Contains(logs.String(), "line=4") {
		t.Errorf("log does not name line 4:\n%s", logs.String())
	}

	// The limit is an option: raised, the long line is read (and is malformed JSON).
	cfg.MaxLineSize = 4 << 20
	m2 := &componenttest.Metrics{}
	env.Metrics = m2
	if err := New(env, cfg).Run(context.Background(), &componenttest.Collector{}); err != nil {
		t.Fatal(err)
	}
	if m2.DroppedCount("line_too_long") != 0 || m2.DroppedCount("malformed") != 1 {
		t.Errorf("max_line_size 4MiB: %d too long, %d malformed, want 0 and 1", m2.DroppedCount("line_too_long"), m2.DroppedCount("malformed"))
	}

	cfg.MaxLineSize, cfg.OnError = 1<<20, "stop"
	err := New(env, cfg).Run(context.Background(), &componenttest.Collector{})
	if err == nil || !strings.Contains(err.Error(), "in.jsonl:4: line longer than max_line_size (1MiB)") {
		t.Fatalf("on_error: stop gave %v, want in.jsonl:4 and the limit", err)
	}
}

// The line reader returns lines exactly at the limit, a last line without a newline, and
// strips CRLF, as bufio.Scanner did.
func TestLineReaderEdges(t *testing.T) {
	in := strings.Repeat("a", 1024) + "\n" + strings.Repeat("b", 1025) + "\r\nlast"
	rd := newLineReader(strings.NewReader(in), 1024)
	var got []string
	for {
		b, long, err := rd.next()
		if err != nil {
			break
		}
		if long {
			got = append(got, "LONG")
			continue
		}
		got = append(got, string(b))
	}
	want := []string{strings.Repeat("a", 1024), "LONG", "last"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("got %q", got)
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

// TestReplayCompressed reads zstd and gzip files made of several frames or members (as the
// file sink's compression writes them, one per batch) and a plain file, all through one
// source: every event comes back once.
func TestReplayCompressed(t *testing.T) {
	dir := t.TempDir()
	ids := flow.NewIDGen()
	lines := func(from, n int) []byte {
		var b []byte
		for i := from; i < from+n; i++ {
			e := flow.Event{EventID: ids.New(), FlowID: ids.New(), Type: flow.TypeStart, Timestamp: flow.Now(), Protocol: 6, TxBytes: uint64(i)}
			b = append(flow.AppendJSON(b, &e), '\n')
		}
		return b
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	var zs, gz []byte
	for f := 0; f < 3; f++ {
		zs = enc.EncodeAll(lines(f*10, 10), zs)
		var m bytes.Buffer
		w := gzip.NewWriter(&m)
		w.Write(lines(100+f*10, 10))
		w.Close()
		gz = append(gz, m.Bytes()...)
	}
	os.WriteFile(filepath.Join(dir, "a.jsonl.zst"), zs, 0o644)
	os.WriteFile(filepath.Join(dir, "b.jsonl.gz"), gz, 0o644)
	os.WriteFile(filepath.Join(dir, "c.jsonl"), lines(200, 5), 0o644)
	for _, name := range []string{"a.jsonl.zst", "b.jsonl.gz", "c.jsonl"} {
		env := component.Env{Name: "r", ConfigDir: dir, Logger: slog.Default(), Metrics: &componenttest.Metrics{}}
		out := &componenttest.Collector{}
		if err := New(env, &Config{Path: name, BatchSize: 7, OnError: "stop"}).Run(context.Background(), out); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want := map[string]int{"a.jsonl.zst": 30, "b.jsonl.gz": 30, "c.jsonl": 5}[name]
		seen := map[uint64]bool{}
		for _, e := range out.Events() {
			seen[e.TxBytes] = true
		}
		if len(out.Events()) != want || len(seen) != want {
			t.Errorf("%s: %d events (%d distinct), want %d", name, len(out.Events()), len(seen), want)
		}
	}
}

// A compressed file whose writer was killed in the middle of a frame ends in a torn frame:
// with on_error: skip everything before it is replayed and the torn end is counted as one
// malformed line; with on_error: stop the error says what happened and where.
func TestReplayCompressedTornTail(t *testing.T) {
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	compress := map[string]func([]byte) []byte{
		"zstd": func(b []byte) []byte { return enc.EncodeAll(b, nil) },
		"gzip": func(b []byte) []byte {
			var m bytes.Buffer
			w := gzip.NewWriter(&m)
			w.Write(b)
			w.Close()
			return m.Bytes()
		},
	}
	for _, name := range []string{"zstd", "gzip"} {
		dir := t.TempDir()
		ids := flow.NewIDGen()
		var data []byte
		for f := range 3 {
			var b []byte
			for i := range 20 {
				e := flow.Event{EventID: ids.New(), FlowID: ids.New(), Type: flow.TypeStart, Timestamp: flow.Now(), Protocol: 6, TxBytes: uint64(f*20 + i)}
				b = append(flow.AppendJSON(b, &e), '\n')
			}
			frame := compress[name](b)
			if f == 2 {
				frame = frame[:len(frame)/2]
			}
			data = append(data, frame...)
		}
		os.WriteFile(filepath.Join(dir, "torn"), data, 0o644)

		var logs strings.Builder
		m := &componenttest.Metrics{}
		env := component.Env{Name: "r", ConfigDir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m}
		out := &componenttest.Collector{}
		if err := New(env, &Config{Path: "torn", BatchSize: 7, OnError: "skip"}).Run(context.Background(), out); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got := out.Events()
		if len(got) < 40 || m.DroppedCount("malformed") != 1 {
			t.Fatalf("%s: %d events, %d malformed; want the 40 of the whole frames at least, and the torn end counted once", name, len(got), m.DroppedCount("malformed"))
		}
		for i, e := range got {
			if e.TxBytes != uint64(i) {
				t.Fatalf("%s: event %d holds %d", name, i, e.TxBytes)
			}
		}
		if !strings.Contains(logs.String(), "ends in the middle of a frame") {
			t.Errorf("%s: the torn end was not logged:\n%s", name, logs.String())
		}
		err = New(env, &Config{Path: "torn", BatchSize: 7, OnError: "stop"}).Run(context.Background(), &componenttest.Collector{})
		if err == nil || !strings.Contains(err.Error(), "torn: the compressed stream ends in the middle of a frame after line") {
			t.Fatalf("%s: on_error: stop gave %v", name, err)
		}
	}
}
