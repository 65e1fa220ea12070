package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/pipeline/diskqueue"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

const queueSecret = "disk-queue-test-secret-0123456789"

// proc is a flowpipe process; kill -9 takes its plugin processes with it (they lead process
// groups of their own), as a crash of the host or an OOM kill of the unit would.
type proc struct {
	t      *testing.T
	cmd    *exec.Cmd
	log    *testenv.SyncBuffer
	exited chan struct{}
}

func startFlowpipe(t *testing.T, dir string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, log: &testenv.SyncBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(binary, args...)
	p.cmd.Dir = dir
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // no orphan if the test binary dies
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() { p.kill() })
	return p
}

// kill kills the process and its plugin processes with SIGKILL and waits until all are gone.
func (p *proc) kill() {
	select {
	case <-p.exited:
		return
	default:
	}
	if err := testenv.KillTree(p.cmd.Process.Pid, time.Minute); err != nil {
		p.t.Fatal(err)
	}
	<-p.exited
}

func (p *proc) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(2 * time.Minute):
		t.Fatalf("flowpipe did not exit:\n%s", p.log)
	}
	return p.cmd.ProcessState.ExitCode()
}

// waitListening waits until the process itself (its grpc source's plugin process) listens
// on addr, and fails with its log if it exits first. A dial would also succeed against
// another process that took the port after the test chose it, while this one exits.
func (p *proc) waitListening(t *testing.T, addr string) {
	t.Helper()
	if err := testenv.WaitListening(p.cmd.Process.Pid, "tcp", testenv.Port(t, addr), p.exited, time.Minute); err != nil {
		t.Fatalf("flowpipe does not listen on %s: %v\n%s", addr, err, p.log)
	}
}

// queued reads the event IDs a disk queue holds without confirming them, as the next start
// will see them.
func queued(t *testing.T, dir string) map[uuid.UUID]bool {
	t.Helper()
	q, err := diskqueue.Open(diskqueue.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	q.CloseWrites()
	ids := map[uuid.UUID]bool{}
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		b := q.Next(ctx)
		cancel()
		if b == nil {
			return ids
		}
		for i := range b.Events {
			ids[b.Events[i].EventID] = true
		}
		b.Release(flow.ErrShutdown) // leave it for the agent
	}
}

func fileIDs(t *testing.T, path string) (ids map[uuid.UUID]int, lines int) {
	t.Helper()
	ids = map[uuid.UUID]int{}
	if _, err := os.Stat(path); err != nil {
		return ids, 0
	}
	for _, e := range componenttest.ReadJSONLines(t, path) {
		ids[e.EventID]++
		lines++
	}
	return ids, lines
}

// TestDiskQueueSurvivesKill9 is the promise of the disk queue, run as a user would: an
// agent (generate → grpc sink with a disk queue, default isolation) whose collector is down
// is killed -9 mid-stream; restarted, it generates more while the collector is still down;
// then the collector comes up and the grpc sink's plugin process is killed -9 mid-delivery.
// Every event the agent accepted reaches the collector's file exactly once.
func TestDiskQueueSurvivesKill9(t *testing.T) {
	dir := t.TempDir()
	addr := testenv.FreeTCPAddr(t)
	writeFile(t, filepath.Join(dir, "collector.yaml"), fmt.Sprintf(`
admin: {listen: ""}
data_dir: collector-state
sources:
  agents:
    type: grpc
    listen: %s
    auth: hmac
    secrets: [%q]
    dedup: {state_file: dedup.state}
sinks:
  out: {type: file, path: collected.jsonl, max_size: 0}
`, addr, queueSecret))
	agent := func(count int, witness bool) string {
		s := fmt.Sprintf(`
admin: {listen: ""}
data_dir: agent-state
sources:
  gen: {type: generate, isolation: inproc, rate: 40000, count: %d, batch_size: 500, flows: 200}
sinks:
  collector:
    type: grpc
    url: http://%s
    hmac_secret: %q
    reconnect_min: 50ms
    reconnect_max: 300ms
    retry: {initial_interval: 50ms, max_interval: 300ms}
    queue: {type: disk, max_size: 256MiB}
`, count, addr, queueSecret)
		if witness {
			s += "  witness: {type: file, isolation: inproc, path: witness.jsonl, max_size: 0}\n"
		}
		return s
	}
	qdir := filepath.Join(dir, "agent-state", "queue", "collector")

	// 1. The collector is down; the agent queues on disk and is killed -9 mid-stream.
	writeFile(t, filepath.Join(dir, "agent.yaml"), agent(0, false))
	a := startFlowpipe(t, dir, "run", "-c", "agent.yaml")
	eventually(t, "20,000 events in the disk queue", func() bool {
		n, err := diskqueue.Pending(qdir)
		return err == nil && n >= 20000
	})
	a.kill()
	first := queued(t, qdir)
	if len(first) < 20000 {
		t.Fatalf("the queue holds %d events after kill -9, want at least the 20,000 seen", len(first))
	}

	// 2. Restarted, collector still down: it keeps what it had and queues 30,000 more (a
	// finite run, witnessed by a file sink beside the grpc one).
	writeFile(t, filepath.Join(dir, "agent.yaml"), agent(30000, true))
	a = startFlowpipe(t, dir, "run", "-c", "agent.yaml")
	eventually(t, "the new events in the disk queue", func() bool {
		n, err := diskqueue.Pending(qdir)
		return err == nil && n >= int64(len(first))+30000
	})

	// 3. The collector comes up; mid-delivery the grpc sink's plugin process is killed -9.
	c := startFlowpipe(t, dir, "run", "-c", "collector.yaml")
	c.waitListening(t, addr)
	eventually(t, "some events at the collector", func() bool {
		st, err := os.Stat(filepath.Join(dir, "collected.jsonl"))
		return err == nil && st.Size() > 100*5000
	})
	if kids := pluginChildren(t, a.cmd.Process.Pid); len(kids) == 1 {
		syscall.Kill(kids[0], syscall.SIGKILL)
	} else {
		t.Fatalf("want one plugin process (the grpc sink), found %v", kids)
	}
	if code := a.wait(t); code != 0 {
		t.Fatalf("agent exited %d:\n%s", code, a.log)
	}
	if !strings.Contains(a.log.String(), "plugin restarted") {
		t.Fatalf("the sink plugin was not restarted:\n%s", a.log)
	}

	want := map[uuid.UUID]bool{}
	for id := range first {
		want[id] = true
	}
	witnessed, _ := fileIDs(t, filepath.Join(dir, "witness.jsonl"))
	for id := range witnessed {
		want[id] = true
	}
	if len(want) < len(first)+30000 {
		t.Fatalf("expected %d distinct events", len(want))
	}
	var got map[uuid.UUID]int
	var lines int
	eventually(t, "every event at the collector", func() bool {
		got, lines = fileIDs(t, filepath.Join(dir, "collected.jsonl"))
		return len(got) >= len(want)
	})
	syscall.Kill(c.cmd.Process.Pid, syscall.SIGTERM)
	c.wait(t)
	got, lines = fileIDs(t, filepath.Join(dir, "collected.jsonl"))
	for id := range want {
		if got[id] != 1 {
			t.Fatalf("event %s reached the collector %d times, want exactly once", id, got[id])
		}
	}
	if lines != len(want) || len(got) != len(want) {
		t.Fatalf("collector file has %d lines, %d distinct events; want exactly the %d the agent accepted", lines, len(got), len(want))
	}
	if r, err := diskqueue.Inspect(qdir); err != nil {
		t.Fatal(err)
	} else if r.Pending != 0 {
		t.Fatalf("the disk queue still holds %d events", r.Pending)
	}
	t.Logf("%d events before kill -9, %d after; all delivered exactly once", len(first), len(witnessed))
}

// TestQueueTools runs flowpipe queue inspect, verify and repair on a queue a real run left
// behind, then damaged; and validate on a pipeline whose two sinks share one queue.
func TestQueueTools(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "p.yaml"), `
admin: {listen: ""}
runtime: {shutdown_timeout: 1s}
sources:
  gen: {type: generate, count: 20000, batch_size: 1000, seed: 3}
sinks:
  down:
    type: grpc
    url: http://127.0.0.1:1
    queue: {type: disk, path: q, max_size: 16MiB}
`)
	// The collector never comes up: the run ends at the shutdown timeout with everything
	// kept on disk.
	p := startFlowpipe(t, dir, "run", "-c", "p.yaml")
	qdir := filepath.Join(dir, "q")
	eventually(t, "20,000 events in the disk queue", func() bool {
		n, err := diskqueue.Pending(qdir)
		return err == nil && n >= 20000
	})
	syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
	if code := p.wait(t); code != 0 {
		t.Fatalf("run exited %d:\n%s", code, p.log)
	}
	if !strings.Contains(p.log.String(), "events kept in the disk queue for the next start") {
		t.Fatalf("shutdown did not say what it kept:\n%s", p.log)
	}
	r, err := diskqueue.Inspect(qdir)
	if err != nil {
		t.Fatal(err)
	}
	if r.Pending < 20000 {
		t.Fatalf("after shutdown the queue holds %d events, want the 20,000 generated", r.Pending)
	}
	out, _, code := flowpipe(t, dir, "queue", "inspect", "q")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("pending:   %d events", r.Pending)) || !strings.Contains(out, ".seg") {
		t.Fatalf("inspect exited %d:\n%s", code, out)
	}
	if out, _, code := flowpipe(t, dir, "queue", "verify", "q"); code != 0 || !strings.Contains(out, "clean") {
		t.Fatalf("verify of a clean queue exited %d:\n%s", code, out)
	}
	// Flip a byte in the middle of the first segment's records.
	segs, _ := filepath.Glob(filepath.Join(qdir, "*.seg"))
	b, _ := os.ReadFile(segs[0])
	b[len(b)/2] ^= 0xff
	os.WriteFile(segs[0], b, 0o640)
	out, errOut, code := flowpipe(t, dir, "queue", "verify", "q")
	if code != 1 || !strings.Contains(out, "damaged:") || !strings.Contains(errOut, "repair") {
		t.Fatalf("verify of a damaged queue exited %d:\n%s%s", code, out, errOut)
	}
	if out, errOut, code := flowpipe(t, dir, "queue", "repair", "q"); code != 0 || !strings.Contains(out, "cut 1 damaged") {
		t.Fatalf("repair exited %d:\n%s%s", code, out, errOut)
	}
	if out, _, code := flowpipe(t, dir, "queue", "verify", "q"); code != 0 {
		t.Fatalf("verify after repair exited %d:\n%s", code, out)
	}

	// validate: two sinks on one queue directory is a positioned error.
	writeFile(t, filepath.Join(dir, "shared.yaml"), `
admin: {listen: ""}
sources:
  gen: {type: generate, count: 2}
sinks:
  a: {type: discard, queue: {type: disk, path: q}}
  b: {type: discard, queue: {type: disk, path: ./q/}}
`)
	_, errOut, code = flowpipe(t, dir, "validate", "-c", "shared.yaml")
	if code != 1 || !strings.Contains(errOut, "shared.yaml:7: sinks.b.queue.path:") || !strings.Contains(errOut, "already sink a's queue") {
		t.Fatalf("validate exited %d:\n%s", code, errOut)
	}
	// A directory that cannot be created is reported at its line too.
	writeFile(t, filepath.Join(dir, "blocked"), "a file, not a directory")
	writeFile(t, filepath.Join(dir, "bad.yaml"), `
admin: {listen: ""}
sources:
  gen: {type: generate, count: 2}
sinks:
  a: {type: discard, queue: {type: disk, path: blocked/q}}
`)
	_, errOut, code = flowpipe(t, dir, "validate", "-c", "bad.yaml")
	if code != 1 || !strings.Contains(errOut, "bad.yaml:6: sinks.a.queue.path:") || !bytes.Contains([]byte(errOut), []byte("cannot create")) {
		t.Fatalf("validate exited %d:\n%s", code, errOut)
	}
}

// TestDiskQueueBacklogDrainsInBoundedMemory queues 300,000 events (about 26MB on disk,
// some 80MB as decoded events) while the collector is unreachable, then a restarted
// flowpipe drains them into a file: the process holding the queue stays under 64MiB of
// peak RSS (about 26MB measured), because the reader streams from disk. (The
// 10-million-event figure is BenchmarkDrainBacklog in core/pipeline/diskqueue and
// BACKLOG= scripts/bench-pipeline.sh, see docs/benchmarks.md.)
func TestDiskQueueBacklogDrainsInBoundedMemory(t *testing.T) {
	const backlog, bound = 300_000, 64 << 20
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "fill.yaml"), fmt.Sprintf(`
admin: {listen: ""}
runtime: {shutdown_timeout: 1s}
sources:
  gen: {type: generate, count: %d, batch_size: 1000}
sinks:
  out: {type: grpc, url: "http://127.0.0.1:1", queue: {type: disk, path: q, max_size: 1GiB}}
`, backlog))
	// The draining run keeps every component in process, so that the figure is the memory of
	// the process holding the queue, and keeps running (a slow source) after the backlog is
	// drained, so that its high-water RSS (VmHWM, monotonic) can be read from /proc. (wait4's
	// peak RSS would not do: it counts the test process's own memory at the exec.)
	writeFile(t, filepath.Join(dir, "drain.yaml"), `
admin: {listen: ""}
sources:
  gen: {type: generate, isolation: inproc, rate: 100, batch_size: 10}
sinks:
  out: {type: file, isolation: inproc, path: out.jsonl, max_size: 0, sync: none, queue: {type: disk, path: q, max_size: 1GiB}}
`)
	fill := startFlowpipe(t, dir, "run", "-c", "fill.yaml")
	qdir := filepath.Join(dir, "q")
	var onDisk int64
	eventually(t, "the backlog on disk", func() bool {
		n, err := diskqueue.Pending(qdir)
		return err == nil && n >= backlog
	})
	if r, err := diskqueue.Inspect(qdir); err == nil {
		onDisk = r.Bytes
	}
	syscall.Kill(fill.cmd.Process.Pid, syscall.SIGTERM)
	fill.wait(t)

	drain := startFlowpipe(t, dir, "run", "-c", "drain.yaml")
	eventually(t, "the backlog drained", func() bool {
		n, err := diskqueue.Pending(qdir)
		return err == nil && n < 100
	})
	rss := vmHWM(t, drain.cmd.Process.Pid)
	syscall.Kill(drain.cmd.Process.Pid, syscall.SIGTERM)
	if code := drain.wait(t); code != 0 {
		t.Fatalf("drain exited %d:\n%s", code, drain.log)
	}
	out, err := os.ReadFile(filepath.Join(dir, "out.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if lines := bytes.Count(out, []byte("\n")); lines < backlog {
		t.Fatalf("drained %d events, want the %d of the backlog", lines, backlog)
	}
	t.Logf("drained a %d-byte backlog of %d events with a peak RSS of %d bytes", onDisk, backlog, rss)
	if rss > bound {
		t.Fatalf("peak RSS %d bytes draining a %d-byte backlog, above the %d bound", rss, onDisk, bound)
	}
}

// TestDiskQueueCollectorGoesDownAndUpTwice: while the agent keeps producing, its collector
// stops and comes back twice; the disk queue holds what the collector could not take, and in
// the end every event the agent accepted is in the collector's file exactly once.
func TestDiskQueueCollectorGoesDownAndUpTwice(t *testing.T) {
	dir := t.TempDir()
	addr := testenv.FreeTCPAddr(t)
	writeFile(t, filepath.Join(dir, "collector.yaml"), fmt.Sprintf(`
admin: {listen: ""}
data_dir: collector-state
sources:
  agents: {type: grpc, listen: %s, auth: hmac, secrets: [%q], dedup: {state_file: dedup.state}}
sinks:
  out: {type: file, path: collected.jsonl, max_size: 0}
`, addr, queueSecret))
	writeFile(t, filepath.Join(dir, "agent.yaml"), fmt.Sprintf(`
admin: {listen: ""}
data_dir: agent-state
sources:
  gen: {type: generate, isolation: inproc, rate: 15000, count: 60000, batch_size: 250, flows: 100}
sinks:
  collector:
    type: grpc
    url: http://%s
    hmac_secret: %q
    reconnect_min: 50ms
    reconnect_max: 200ms
    retry: {initial_interval: 50ms, max_interval: 200ms}
    queue: {type: disk}
  witness: {type: file, isolation: inproc, path: witness.jsonl, max_size: 0}
`, addr, queueSecret))
	collected := filepath.Join(dir, "collected.jsonl")
	size := func() int64 {
		st, err := os.Stat(collected)
		if err != nil {
			return 0
		}
		return st.Size()
	}
	qdir := filepath.Join(dir, "agent-state", "queue", "collector")
	pending := func() int64 {
		n, _ := diskqueue.Pending(qdir)
		return n
	}
	a := startFlowpipe(t, dir, "run", "-c", "agent.yaml")
	for round := range 2 {
		c := startFlowpipe(t, dir, "run", "-c", "collector.yaml")
		c.waitListening(t, addr)
		before := size()
		eventually(t, "events at the collector", func() bool { return size() > before+100*2000 })
		syscall.Kill(c.cmd.Process.Pid, syscall.SIGTERM)
		if code := c.wait(t); code != 0 {
			t.Fatalf("collector exited %d:\n%s", code, c.log)
		}
		eventually(t, fmt.Sprintf("events queued on disk while the collector is down (round %d)", round+1), func() bool { return pending() >= 3000 })
	}
	c := startFlowpipe(t, dir, "run", "-c", "collector.yaml")
	if code := a.wait(t); code != 0 {
		t.Fatalf("agent exited %d:\n%s", code, a.log)
	}
	want, _ := fileIDs(t, filepath.Join(dir, "witness.jsonl"))
	if len(want) < 60000 {
		t.Fatalf("the agent accepted %d events, want at least 60000", len(want))
	}
	syscall.Kill(c.cmd.Process.Pid, syscall.SIGTERM)
	c.wait(t)
	got, lines := fileIDs(t, collected)
	for id := range want {
		if got[id] != 1 {
			t.Fatalf("event %s reached the collector %d times, want once", id, got[id])
		}
	}
	if lines != len(want) {
		t.Fatalf("collector file has %d lines for %d events", lines, len(want))
	}
}

// vmHWM is a process's peak resident set size so far, in bytes.
func vmHWM(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(v), "%d kB", &kb)
			return kb * 1024
		}
	}
	t.Fatalf("no VmHWM in /proc/%d/status", pid)
	return 0
}
