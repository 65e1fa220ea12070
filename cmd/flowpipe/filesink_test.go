package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// TestCompressedFileSurvivesCollectorKill9 runs a collector (grpc → file sink with zstd and
// rotation, default isolation) as a user would and kills it -9 mid-stream, then starts it
// again: every event the agent had sent (the agent's witness file) is in the collector's
// files, every one of which (the rotated ones and the current one) is a valid zstd stream
// that zstdcat and the replay source read whole. A kill that lands in the middle of a
// frame leaves it torn, which the restart cuts off (TestCompressionTornFrameIsCutBeforeTheFirstWrite in
// sinks/file forces that case; here it is up to the timing of the kill). With klauspost's
// encoder (compression_level fastest) and the sink's own (lines, the default).
func TestCompressedFileSurvivesCollectorKill9(t *testing.T) {
	for _, level := range []string{"fastest", "lines"} {
		t.Run(level, func(t *testing.T) { testCompressedFileSurvivesCollectorKill9(t, level) })
	}
}

func testCompressedFileSurvivesCollectorKill9(t *testing.T, level string) {
	zstdcat, err := exec.LookPath("zstdcat")
	testenv.Require(t, err == nil, "zstdcat")
	dir := t.TempDir()
	addr := testenv.FreeTCPAddr(t)
	writeFile(t, filepath.Join(dir, "collector.yaml"), fmt.Sprintf(`
admin: {listen: ""}
sources:
  agents: {type: grpc, listen: %s, auth: hmac, secrets: [%q]}
sinks:
  out: {type: file, path: collected.zst, compression: zstd, compression_level: %s, max_size: 200KiB, max_files: 0}
`, addr, queueSecret, level))
	writeFile(t, filepath.Join(dir, "agent.yaml"), fmt.Sprintf(`
admin: {listen: ""}
sources:
  gen: {type: generate, isolation: inproc, rate: 20000, count: 60000, batch_size: 500, flows: 200}
sinks:
  collector:
    type: grpc
    url: http://%s
    hmac_secret: %q
    reconnect_min: 50ms
    reconnect_max: 300ms
    retry: {initial_interval: 50ms, max_interval: 300ms}
  witness: {type: file, isolation: inproc, path: witness.jsonl, max_size: 0}
`, addr, queueSecret))
	collected := func() (files []string, size int64) {
		files, _ = filepath.Glob(filepath.Join(dir, "collected.zst*"))
		for _, f := range files {
			if st, err := os.Stat(f); err == nil {
				size += st.Size()
			}
		}
		return files, size
	}

	c := startFlowpipe(t, dir, "run", "-c", "collector.yaml")
	c.waitListening(t, addr)
	a := startFlowpipe(t, dir, "run", "-c", "agent.yaml")
	eventually(t, "a rotated file and more at the collector", func() bool {
		files, size := collected()
		return len(files) >= 2 && size > 300<<10
	})
	c.kill()
	c = startFlowpipe(t, dir, "run", "-c", "collector.yaml")
	c.waitListening(t, addr)
	if code := a.wait(t); code != 0 {
		t.Fatalf("agent exited %d:\n%s", code, a.log)
	}
	syscall.Kill(c.cmd.Process.Pid, syscall.SIGTERM)
	if code := c.wait(t); code != 0 {
		t.Fatalf("collector exited %d:\n%s", code, c.log)
	}

	want, _ := fileIDs(t, filepath.Join(dir, "witness.jsonl"))
	if len(want) != 60000 {
		t.Fatalf("the witness holds %d events, want 60000", len(want))
	}
	files, _ := collected()
	got := map[uuid.UUID]int{}
	lines := 0
	for _, f := range files {
		out, err := exec.Command(zstdcat, f).Output()
		if err != nil {
			t.Fatalf("zstdcat %s: %v (a file that is not a valid zstd stream)", f, err)
		}
		for _, line := range strings.Split(strings.TrimSuffix(string(out), "\n"), "\n") {
			var e flow.Event
			if err := flow.ParseJSON([]byte(line), &e); err != nil {
				t.Fatalf("%s: line %q: %v", f, line, err)
			}
			got[e.EventID]++
			lines++
		}
	}
	for id := range want {
		if got[id] == 0 {
			t.Fatalf("event %s the agent sent is not in the collector's files", id)
		}
	}
	// The replay source reads the same files, rotated ones first, through the binary.
	writeFile(t, filepath.Join(dir, "replay.yaml"), `
admin: {listen: ""}
sources:
  back: {type: replay, path: "collected.zst*"}
sinks:
  out: {type: file, path: replayed.jsonl, max_size: 0}
`)
	if _, stderr, code := flowpipe(t, dir, "run", "-c", "replay.yaml"); code != 0 {
		t.Fatalf("replay exited %d:\n%s", code, stderr)
	}
	replayed, n := fileIDs(t, filepath.Join(dir, "replayed.jsonl"))
	if n != lines || len(replayed) != len(got) {
		t.Fatalf("replay read %d lines (%d events), zstdcat %d (%d)", n, len(replayed), lines, len(got))
	}
	t.Logf("%d files, %d lines for %d events (%d written twice: sent again after the kill)", len(files), lines, len(want), lines-len(got))
}
