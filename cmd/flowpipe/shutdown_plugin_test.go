package main

import (
	"encoding/json"
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
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// TestSIGTERMDrainsSourcePluginInOrder stops `generate → file` with the default isolation
// (the source in a plugin process, as fast as the file sink takes it) while it streams. The
// source plugin's batches in flight at shutdown are delivered or refused whole and in order:
// every end event in the file follows its start, and what is refused is at most the few
// batches of the emit window, not the hundreds of thousands of events that the plugin
// connection used to hold.
func TestSIGTERMDrainsSourcePluginInOrder(t *testing.T) {
	const batch = 1024
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), `
admin: {listen: ""}
sources:
  gen: {type: generate, batch_size: 1024}
sinks:
  out: {type: file, path: flows.jsonl, max_size: 0}
`)
	cmd := exec.Command(binary, "run", "--log-format", "json")
	cmd.Dir = dir
	stderr := &testenv.SyncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	// Stop once the pipeline is busy: the sink has written a few hundred batches, and the
	// source is ahead of it, blocked on the full queue.
	out := filepath.Join(dir, "flows.jsonl")
	deadline := time.Now().Add(60 * time.Second)
	for {
		if st, err := os.Stat(out); err == nil && st.Size() > 32<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("flowpipe wrote too little in a minute:\n%s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait() // the exit code is the shutdown's business; what was written is ours

	undelivered := 0
	for _, line := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		var rec struct {
			Msg    string `json:"msg"`
			Events int    `json:"events"`
		}
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "events not delivered before shutdown" {
			undelivered += rec.Events
		}
	}
	// The batch the source plugin was emitting when the pipeline stopped, and the others of
	// its emit window, may be refused (an in-process source loses its one blocked batch the
	// same way); nothing else.
	if max := 4 * batch; undelivered > max {
		t.Errorf("%d events not delivered at shutdown, want at most the emit window (%d):\n%s", undelivered, max, tail(stderr.String()))
	}
	started := map[uuid.UUID]bool{}
	ends, orphans := 0, 0
	for _, e := range componenttest.ReadJSONLines(t, out) {
		switch e.Type {
		case flow.TypeStart:
			started[e.FlowID] = true
		case flow.TypeEnd:
			ends++
			if !started[e.FlowID] {
				orphans++
			}
		}
	}
	if ends == 0 {
		t.Fatal("no end events written: the test did not exercise the shutdown")
	}
	if orphans > 0 {
		t.Errorf("%d of %d end events were written without their start: a later batch was delivered after an earlier one was refused", orphans, ends)
	}
	t.Logf("%d flows started, %d ended, %d events not delivered", len(started), ends, undelivered)
}

func tail(s string) string {
	if len(s) > 4000 {
		return "…" + s[len(s)-4000:]
	}
	return s
}
