package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// TestReloadAnswersWhileADiskQueueIsFull: a sink whose collector is gone keeps a disk queue
// on a 1MiB tmpfs, allowed 64MiB: the disk fills, and the batches the source sends next wait
// in the queue's append for room that never comes. A reload that changes the queue's
// max_size must still answer (it used to wait for those batches forever); the blocked
// batches are refused and counted, every batch the queue had accepted is still in it, and
// the next pipeline on the same queue, with the collector back, delivers every one of them.
func TestReloadAnswersWhileADiskQueueIsFull(t *testing.T) {
	mnt := testenv.Tmpfs(t, "1m")
	qdir := filepath.Join(mnt, "q")
	h := newReloadHarness()
	dataDir := t.TempDir()
	var logs testenv.SyncBuffer
	doc := func(down bool, maxSize string) string {
		return fmt.Sprintf("data_dir: %s\nruntime:\n  shutdown_timeout: 300ms\nsources:\n  gen: {type: count}\nsinks:\n  a:\n    type: rec\n    down: %v\n    queue: {type: disk, path: %s, max_size: %s}\n    retry: {initial_interval: 5ms, max_interval: 20ms}\n", dataDir, down, qdir, maxSize)
	}
	p, err := New(context.Background(), loadDoc(t, doc(true, "64MiB")), Options{Registry: h.reg, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := runAsync(p, ctx)
	<-p.Running()
	waitFor(t, "the disk-full log line", func() bool { return strings.Contains(logs.String(), "the disk is full") })
	if !strings.Contains(logs.String(), "path="+qdir) {
		t.Errorf("the disk-full log line does not name the queue's path %s:\n%s", qdir, logs.String())
	}
	if n := gauge(t, p.Metrics().Registry, "flowpipe_sink_queue_disk_full", "a"); n != 1 {
		t.Errorf("flowpipe_sink_queue_disk_full = %v on a full disk, want 1", n)
	}

	type result struct {
		rep *ReloadReport
		err error
	}
	res := make(chan result, 1)
	next := loadDoc(t, doc(true, "32MiB"))
	go func() {
		rep, err := p.Reload(context.Background(), next)
		res <- result{rep, err}
	}()
	var r result
	select {
	case r = <-res:
	case <-time.After(60 * time.Second):
		t.Fatalf("the reload did not return within 60s while the disk queue was full (shutdown_timeout is 300ms): it hangs\n%s", logs.String())
	}
	if r.err != nil {
		t.Fatalf("reload: %v", r.err)
	}
	if err := changed("sink/a", "queue.max_size")(r.rep); err != nil {
		t.Fatal(err)
	}
	if r.rep.Undelivered["a"] == 0 {
		t.Errorf("the reload reports no events refused by the blocked queue: %+v", r.rep)
	}
	if !strings.Contains(logs.String(), "old disk queue blocked the reload") || !strings.Contains(logs.String(), "dir="+qdir) {
		t.Errorf("no log line names the sink whose full disk queue blocked the reload, with its path:\n%s", logs.String())
	}
	// A second reload goes through too (nothing is left waiting behind the first).
	next = loadDoc(t, doc(true, "48MiB"))
	go func() {
		rep, err := p.Reload(context.Background(), next)
		res <- result{rep, err}
	}()
	select {
	case r = <-res:
	case <-time.After(60 * time.Second):
		t.Fatal("a second reload did not return within 60s")
	}
	if r.err != nil {
		t.Fatalf("second reload: %v", r.err)
	}

	close(h.stop)
	cancel()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("Run did not return after the stop")
	}
	// Every event emitted is answered: accepted (on disk) or refused, and every refusal is
	// counted where the metrics show it.
	ok, failed := h.ackedCount()
	h.mu.Lock()
	emitted := h.emitted
	h.mu.Unlock()
	if int64(ok+failed) != emitted || ok == 0 {
		t.Fatalf("acks: %d ok, %d failed, of %d emitted", ok, failed, emitted)
	}
	counted := testutil.ToFloat64(p.Metrics().Component("a", "sink").DropCounter("shutdown"))
	if int(counted) != failed || p.Undelivered() != int64(failed) {
		t.Errorf("%d events refused, %v counted as dropped (reason shutdown), Undelivered() = %d", failed, counted, p.Undelivered())
	}

	// The collector is back: the next pipeline on the queue delivers everything accepted.
	p2, err := New(context.Background(), loadDoc(t, doc(false, "48MiB")), Options{Registry: h.reg, Logger: slogDiscard()})
	if err != nil {
		t.Fatal(err)
	}
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	done2 := runAsync(p2, ctx2)
	<-p2.Running()
	rec := h.recorder("a")
	waitFor(t, "the accepted events delivered", func() bool { return rec.count() >= ok })
	cancel2()
	<-done2
	h.mu.Lock()
	defer h.mu.Unlock()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	missing := 0
	for id, err := range h.acked {
		if err == nil && rec.seen[id] == 0 {
			missing++
		}
	}
	t.Logf("%d accepted, %d refused, %d delivered by the next pipeline", ok, failed, len(rec.seen))
	if missing > 0 {
		t.Errorf("%d of the %d events the disk queue accepted were never delivered", missing, ok)
	}
}

// TestReloadRefusedWhileAKeptSinkIsStuck: a reload that keeps a sink whose disk queue is
// full (the disk is, and its collector is gone) would wait for the batches of the running
// pipeline held back there for as long as the sink stays stuck — it cannot refuse them: the
// sink is not changed. So it gives the sink runtime.shutdown_timeout to move and, as it
// does not, is refused before anything changed, with the problem at the sink naming its full
// disk and what to do. A reload that changes the stuck sink too is applied (bounded by
// runtime.shutdown_timeout, TestReloadAnswersWhileADiskQueueIsFull).
func TestReloadRefusedWhileAKeptSinkIsStuck(t *testing.T) {
	mnt := testenv.Tmpfs(t, "1m")
	qdir := filepath.Join(mnt, "q")
	h := newReloadHarness()
	var logs testenv.SyncBuffer
	dataDir := t.TempDir()
	doc := func(maxSize, more string) string {
		return fmt.Sprintf("data_dir: %s\nruntime:\n  shutdown_timeout: 200ms\nsources:\n  gen: {type: count}\nsinks:\n  a:\n    type: rec\n    down: true\n    queue: {type: disk, path: %s, max_size: %s}\n    retry: {initial_interval: 5ms, max_interval: 20ms}\n%s", dataDir, qdir, maxSize, more)
	}
	p, err := New(context.Background(), loadDoc(t, doc("64MiB", "")), Options{Registry: h.reg, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := runAsync(p, ctx)
	<-p.Running()
	waitFor(t, "the disk-full log line", func() bool { return strings.Contains(logs.String(), "the disk is full") })

	reload := func(d *config.Document) (*ReloadReport, error) {
		t.Helper()
		type result struct {
			rep *ReloadReport
			err error
		}
		res := make(chan result, 1)
		go func() {
			rep, err := p.Reload(context.Background(), d)
			res <- result{rep, err}
		}()
		select {
		case r := <-res:
			return r.rep, r.err
		case <-time.After(60 * time.Second):
			t.Fatalf("the reload did not return within 60s (shutdown_timeout is 200ms): it hangs\n%s", logs.String())
		}
		return nil, nil
	}
	_, err = reload(loadDoc(t, doc("64MiB", "  b: {type: rec}\n")))
	var probs config.Problems
	if !errors.As(err, &probs) || len(probs) != 1 {
		t.Fatalf("a reload that keeps the stuck sink: got %v, want one problem at sinks.a", err)
	}
	if pr := probs[0]; pr.Path != "sinks.a" || !strings.Contains(pr.Msg, "the sink is stuck") || !strings.Contains(pr.Msg, "disk full at "+qdir) || !strings.Contains(pr.Msg, "nothing changed") {
		t.Errorf("problem %q at %s, want one at sinks.a saying it is stuck on its full disk at %s", pr.Msg, pr.Path, qdir)
	}
	for _, s := range p.Document().Sinks {
		if s.Name == "b" {
			t.Errorf("the refused reload's sink b is in the running pipeline")
		}
	}
	if n := h.recorder("b").count(); n != 0 {
		t.Errorf("the refused reload's sink b got %d events", n)
	}

	// Changing the stuck sink in the same reload is bounded: applied.
	rep, err := reload(loadDoc(t, doc("32MiB", "  b: {type: rec}\n")))
	if err != nil {
		t.Fatalf("a reload that changes the stuck sink: %v", err)
	}
	if !slices.Contains(rep.Started, "sink/b") {
		t.Errorf("reload report %+v: sink/b not started", rep)
	}
	close(h.stop)
	cancel()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("Run did not return after the stop")
	}
}
