package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/flowpipe/flowpipe/core/pipeline/diskqueue"
)

// TestDiskQueueReadBackPassesThroughSameOutput: a sink plugin behind a disk queue is sent
// each record as it is on disk, neither decoded nor encoded again by the host, whether the
// record was written by an in-process source (encoded by the queue) or stored as a source
// plugin sent it; the output is byte for byte what the same pipeline writes in process.
func TestDiskQueueReadBackPassesThroughSameOutput(t *testing.T) {
	dir := t.TempDir()
	writeEvents(t, filepath.Join(dir, "in.jsonl"), 20_000)
	writeFile(t, filepath.Join(dir, "ref.yaml"), `
admin: {listen: ""}
sources:
  in: {type: replay, isolation: inproc, path: in.jsonl, batch_size: 777}
sinks:
  ref: {type: file, isolation: inproc, path: ref.jsonl}
`)
	// An in-process source: the only batches that can reach the sink plugin undecoded are
	// those its disk queue reads back.
	writeFile(t, filepath.Join(dir, "inproc-source.yaml"), `
admin: {listen: ""}
data_dir: data1
sources:
  in: {type: replay, isolation: inproc, path: in.jsonl, batch_size: 777}
sinks:
  out: {type: file, path: inproc-source.jsonl, queue: {type: disk}}
`)
	writeFile(t, filepath.Join(dir, "plugin-source.yaml"), `
admin: {listen: ""}
data_dir: data2
sources:
  in: {type: replay, path: in.jsonl, batch_size: 777}
sinks:
  out: {type: file, path: plugin-source.jsonl, queue: {type: disk}}
`)
	if _, stderr, code := flowpipe(t, dir, "run", "-c", "ref.yaml"); code != 0 {
		t.Fatalf("ref.yaml: exit %d\n%s", code, stderr)
	}
	ref, err := os.ReadFile(filepath.Join(dir, "ref.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(ref, []byte("\n")); n != 20_000 {
		t.Fatalf("in process: %d events, want 20000", n)
	}
	for _, name := range []string{"inproc-source", "plugin-source"} {
		_, stderr, code := flowpipe(t, dir, "run", "-c", name+".yaml", "--log-level", "debug")
		if code != 0 {
			t.Fatalf("%s: exit %d\n%s", name, code, stderr)
		}
		if !strings.Contains(stderr, "records read back go to the sink undecoded") || !strings.Contains(stderr, "pass through in the encoding they arrived in") {
			t.Fatalf("%s: the records read back from the disk queue did not pass through to the sink plugin:\n%s", name, stderr)
		}
		data, err := os.ReadFile(filepath.Join(dir, name+".jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(data, ref) {
			t.Errorf("%s: %d events, not what the in-process pipeline wrote", name, bytes.Count(data, []byte("\n")))
		}
	}
}

// TestPluginSinkKilledBehindDiskQueue kills -9 the file sink's plugin process while 100,000
// events stream through its disk queue, read back undecoded, and a write is in flight (the
// plugin was stopped first, until the queue grew behind it): after the restart every event
// is in the output, each redelivered batch was a whole record of the queue (500 events),
// and every duplicate belongs to a batch the host logged as redelivered.
func TestPluginSinkKilledBehindDiskQueue(t *testing.T) {
	dir := t.TempDir()
	const total = 100_000
	writeEvents(t, filepath.Join(dir, "in.jsonl"), total)
	writeFile(t, filepath.Join(dir, "p.yaml"), `
admin: {listen: ""}
data_dir: data
sources:
  in:
    type: replay
    isolation: inproc
    path: in.jsonl
    batch_size: 500
    rate: 25000
sinks:
  out:
    type: file
    path: out.jsonl
    retry: {initial_interval: 50ms, max_interval: 1s}
    queue: {type: disk}
`)
	cmd := exec.Command(binary, "run", "-c", "p.yaml", "--log-format", "json", "--log-level", "debug")
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sinkPID := solePlugin(t, cmd.Process.Pid)
	out := filepath.Join(dir, "out.jsonl")
	grownPast(t, out, 100*total/4, "a quarter of the events to be written")
	// Stopped first, so that the kill finds a write in flight: the queue grows only while
	// the sink's writer waits for the plugin's answer, and that batch must be redelivered.
	qdir := filepath.Join(dir, "data", "queue", "out")
	before, err := diskqueue.Pending(qdir)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(sinkPID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the queue to grow while the sink plugin is stopped", func() bool {
		n, err := diskqueue.Pending(qdir)
		return err == nil && n >= before+5000
	})
	if err := syscall.Kill(sinkPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("flowpipe run: %v\n%s", err, stderr.String())
	}
	seen, lines := parsedEventIDs(t, out)
	if len(seen) != total {
		t.Fatalf("%d distinct events in the output, want %d", len(seen), total)
	}
	sizes, restarted := redeliveries(stderr.String())
	redelivered, batches := 0, len(sizes)
	for _, n := range sizes {
		redelivered += n
		if n != 500 {
			t.Errorf("a redelivered batch of %d events, want a whole record of 500", n)
		}
	}
	undecoded := strings.Contains(stderr.String(), "records read back go to the sink undecoded")
	passed := strings.Contains(stderr.String(), "pass through in the encoding they arrived in")
	if !restarted || !undecoded || !passed {
		t.Fatalf("restart logged %v, records read back undecoded %v, passed through %v:\n%s", restarted, undecoded, passed, stderr.String())
	}
	if batches == 0 {
		t.Fatalf("no batch redelivered after the kill:\n%s", stderr.String())
	}
	if dups := lines - total; dups > redelivered {
		t.Fatalf("%d duplicate events, but only %d logged as redelivered", dups, redelivered)
	}
	t.Logf("%d duplicates, %d events redelivered in %d batches", lines-total, redelivered, batches)
}
