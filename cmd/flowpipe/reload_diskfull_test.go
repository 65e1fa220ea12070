package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// A reload while a sink's disk queue is full answers. The file sink writes on a 2MiB tmpfs
// that also holds its disk queue (allowed 64MiB): the disk fills, the sink's writes fail and
// are retried, the queue cannot free space, and the source's next batches wait in its append.
// A reload that changes the queue's max_size answers (it used to hang for good: SIGHUP and
// POST /-/reload never returned), refusing and counting the batches that were waiting; a
// second one moves the file off the full disk, and the queue drains into it. In the end every
// event the source made is in a file, still in the queue, or counted as dropped.
func TestReloadAnswersWhileADiskQueueIsFull(t *testing.T) {
	mnt := testenv.Tmpfs(t, "2m")
	dir := t.TempDir()
	const count = 40000
	qdir := filepath.Join(mnt, "q")
	yaml := func(out, maxSize string) string {
		return fmt.Sprintf(`admin: {listen: "127.0.0.1:0", token: %s}
runtime: {shutdown_timeout: 1s}
sources:
  gen: {type: generate, count: %d, batch_size: 100}
sinks:
  out:
    type: file
    path: %s
    queue: {type: disk, path: %s, max_size: %s}
    retry: {initial_interval: 10ms, max_interval: 100ms}
`, reloadToken, count, out, qdir, maxSize)
	}
	full := filepath.Join(mnt, "out.jsonl")
	r := startRun(t, dir, yaml(full, "64MiB"))
	eventually(t, "the disk-full log line", func() bool {
		return logged(r.stderr.String(), "disk queue cannot write: the disk is full", map[string]string{"path": qdir}) > 0
	})
	if v := scrape(t, r.admin, `flowpipe_sink_queue_disk_full{component="out",kind="sink"}`); v != 1 {
		t.Errorf("flowpipe_sink_queue_disk_full = %v on a full disk, want 1", v)
	}

	replaceFile(t, filepath.Join(dir, "p.yaml"), yaml(full, "32MiB"))
	asked := time.Now()
	code, body := postReload(t, r.admin) // its client gives up after 2 minutes: the hang fails
	t.Logf("the reload answered after %v (runtime.shutdown_timeout 1s)", time.Since(asked).Round(time.Millisecond))
	if code != http.StatusOK || body["result"] != "applied" {
		t.Fatalf("POST /-/reload with the disk full: %d %v", code, body)
	}
	refused := body["undelivered"].(map[string]any)["out"]
	if n, _ := refused.(float64); n <= 0 {
		t.Errorf("the reload's answer counts no refused events for sink out: %v", body)
	}
	// The line is logged before the answer is sent, but reaches r.stderr through a pipe
	// that the test copies on its own goroutine: wait for it, then count.
	blocked := func() int {
		return logged(r.stderr.String(), "reload: a sink's old disk queue blocked the reload", map[string]string{"sink": "out", "dir": qdir, "why": "disk full at " + qdir})
	}
	eventually(t, "an ERROR line naming the blocked sink, its queue directory and the full disk", func() bool { return blocked() > 0 })
	if n := blocked(); n != 1 {
		t.Errorf("%d ERROR lines name the blocked sink, its queue directory and the full disk, want 1", n)
	}

	// SIGHUP with the file moved off the full disk: the queue drains into it.
	free := filepath.Join(dir, "out.jsonl")
	replaceFile(t, filepath.Join(dir, "p.yaml"), yaml(free, "32MiB"))
	if err := r.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the second reload applied", func() bool { return reloads(t, r.admin, "applied") == 2 })
	// The source ends after count events; flowpipe then drains and exits 3: events were
	// refused, and counted.
	if code := waitExit(t, r.cmd, r.stderr, 2*time.Minute); code != exitUndelivered {
		t.Fatalf("flowpipe run exited %d, want %d (the refused events were not delivered)", code, exitUndelivered)
	}

	ids := map[string]int{}
	tornFileIDs(t, full, ids)
	countFileIDs(t, free, ids)
	stdout, stderr, ecode := flowpipe(t, dir, "queue", "inspect", "--json", qdir)
	if ecode != 0 {
		t.Fatalf("queue inspect: exit %d: %s", ecode, stderr)
	}
	var insp struct {
		Pending int64 // events the sink has not confirmed
	}
	if err := json.Unmarshal([]byte(stdout), &insp); err != nil {
		t.Fatalf("queue inspect --json: %v: %s", err, stdout)
	}
	n, _ := refused.(float64)
	dropped := droppedAtExit(r.stderr.String())
	t.Logf("%d events in the files, %d pending in the queue, %v refused at the reload, %d counted as not delivered at exit", len(ids), insp.Pending, n, dropped)
	if int64(len(ids))+insp.Pending+int64(n) < count {
		t.Errorf("of %d events, %d are in the files, %d in the queue and %v were counted as refused: %d lost silently",
			count, len(ids), insp.Pending, n, count-int64(len(ids))-insp.Pending-int64(n))
	}
	if dropped < int64(n) {
		t.Errorf("flowpipe's exit counts %d events not delivered, fewer than the %v the reload refused", dropped, n)
	}
	os.Remove(full) // the tmpfs is unmounted at cleanup
}

// tornFileIDs is countFileIDs for a file written on a disk that filled: its last line may be
// cut short (a write that failed, retried in the next file).
func tornFileIDs(t *testing.T, path string, ids map[string]int) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	const prefix = `{"event_id":"`
	for i, l := range lines {
		if len(l) < len(prefix)+36 || !strings.HasPrefix(l, prefix) || !strings.HasSuffix(l, "}") {
			if i == len(lines)-1 {
				break // the torn (or empty) end
			}
			t.Fatalf("%s: line %d is not an event: %.80q", path, i+1, l)
		}
		ids[l[len(prefix):len(prefix)+36]]++
	}
}

// droppedAtExit is what flowpipe run's last log line counts as not delivered (0 if none).
func droppedAtExit(log string) int64 {
	var n int64
	for _, rec := range logRecords(log) {
		if rec["msg"] == "pipeline stopped; accepted events were not delivered" {
			if v, ok := rec["events"].(float64); ok {
				n = int64(v)
			}
		}
	}
	return n
}

// A reload that keeps a stuck sink (its file and its disk queue on a full disk) is refused
// over the admin API, with the problem at the sink, instead of waiting for the disk for good;
// the same reload with the sink moved off the full disk is applied.
func TestReloadRefusedWhileAKeptSinkIsStuck(t *testing.T) {
	mnt := testenv.Tmpfs(t, "2m")
	dir := t.TempDir()
	qdir := filepath.Join(mnt, "q")
	yaml := func(out, more string) string {
		return fmt.Sprintf(`admin: {listen: "127.0.0.1:0", token: %s}
runtime: {shutdown_timeout: 1s}
sources:
  gen: {type: generate, count: 40000, batch_size: 100}
sinks:
  out:
    type: file
    path: %s
    queue: {type: disk, path: %s, max_size: 64MiB}
    retry: {initial_interval: 10ms, max_interval: 100ms}
%s`, reloadToken, out, qdir, more)
	}
	full := filepath.Join(mnt, "out.jsonl")
	more := "  more: {type: file, path: more.jsonl}\n"
	r := startRun(t, dir, yaml(full, ""))
	eventually(t, "the disk-full log line", func() bool {
		return logged(r.stderr.String(), "disk queue cannot write: the disk is full", map[string]string{"path": qdir}) > 0
	})
	replaceFile(t, filepath.Join(dir, "p.yaml"), yaml(full, more))
	code, body := postReload(t, r.admin) // its client gives up after 2 minutes: the hang fails
	var got []string
	if ps, ok := body["problems"].([]any); ok {
		for _, p := range ps {
			got = append(got, fmt.Sprint(p))
		}
	}
	if code != http.StatusUnprocessableEntity || body["result"] != "rejected" || len(got) != 1 ||
		!strings.HasPrefix(got[0], "p.yaml:6: sinks.out: the sink is stuck: its queue is full (disk full at "+qdir+")") {
		t.Fatalf("POST /-/reload keeping the stuck sink: %d %v, want 422 with the problem at sinks.out", code, body)
	}
	// A refused reload builds what it checks and closes it again: the new file sink may have
	// created its file, but nothing ran.
	if st, err := os.Stat(filepath.Join(dir, "more.jsonl")); err == nil && st.Size() != 0 {
		t.Errorf("the refused reload's sink wrote %d bytes to more.jsonl", st.Size())
	}
	// The same reload with the stuck sink moved off the full disk is applied, and every
	// event reaches a file (what the full disk's file holds, torn at its end, and the rest).
	free := filepath.Join(dir, "out.jsonl")
	replaceFile(t, filepath.Join(dir, "p.yaml"), yaml(free, more))
	code, body = postReload(t, r.admin)
	if code != http.StatusOK || body["result"] != "applied" {
		t.Fatalf("POST /-/reload moving the stuck sink: %d %v", code, body)
	}
	if code := waitExit(t, r.cmd, r.stderr, 2*time.Minute); code != 0 {
		t.Fatalf("flowpipe run exited %d, want 0: nothing was refused", code)
	}
	ids := map[string]int{}
	tornFileIDs(t, full, ids)
	countFileIDs(t, free, ids)
	if len(ids) != 40000 {
		t.Errorf("%d of 40000 events in the files", len(ids))
	}
	os.Remove(full) // the tmpfs is unmounted at cleanup
}
