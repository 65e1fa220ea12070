package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// These tests run the real flowpipe binary, as a user would.

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "flowpipe-bin-")
	if err != nil {
		panic(err)
	}
	// Plugin processes running as run_as (privilege_test.go) exec the binary too.
	if err := os.Chmod(dir, 0o755); err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "flowpipe")
	out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build flowpipe: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// runBound keeps a flowpipe that should finish by itself, and does not, from hanging the test
// until CI's limit: not a timing assertion (these runs take seconds).
const runBound = 5 * time.Minute

func flowpipe(t *testing.T, dir string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), runBound)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Dir = dir
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("flowpipe %s still running after %s: killed\n%s", strings.Join(args, " "), runBound, e.String())
	}
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), code
}

func TestRunGenerateToFileThenReplayRoundTrip(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "record.yaml"), `
admin: {listen: ""}
sources:
  gen: {type: generate, count: 20000, flows: 500, seed: 7}
sinks:
  out: {type: file, path: out/flows.jsonl}
`)
	if _, stderr, code := flowpipe(t, dir, "run", "-c", "record.yaml"); code != 0 {
		t.Fatalf("run exited %d:\n%s", code, stderr)
	}
	recorded := componenttest.ReadJSONLines(t, filepath.Join(dir, "out/flows.jsonl"))
	if len(recorded) < 20000 {
		t.Fatalf("recorded %d events, want at least 20000", len(recorded))
	}
	// Every start has its end: the source closes open flows when it stops.
	open := map[[16]byte]int{}
	for _, e := range recorded {
		switch e.Type {
		case flow.TypeStart:
			open[e.FlowID]++
		case flow.TypeEnd:
			open[e.FlowID]--
		}
	}
	for id, n := range open {
		if n != 0 {
			t.Fatalf("flow %x has %d unmatched starts", id, n)
		}
	}
	st, err := os.Stat(filepath.Join(dir, "out/flows.jsonl"))
	if err != nil || st.Mode().Perm() != 0o640 {
		t.Errorf("file mode %v, want 0640 (%v)", st.Mode().Perm(), err)
	}

	writeFile(t, filepath.Join(dir, "replay.yaml"), `
admin: {listen: ""}
sources:
  again: {type: replay, path: out/flows.jsonl, batch_size: 333}
sinks:
  copy: {type: file, path: copy.jsonl}
`)
	if _, stderr, code := flowpipe(t, dir, "run", "-c", "replay.yaml"); code != 0 {
		t.Fatalf("replay exited %d:\n%s", code, stderr)
	}
	a, _ := os.ReadFile(filepath.Join(dir, "out/flows.jsonl"))
	b, _ := os.ReadFile(filepath.Join(dir, "copy.jsonl"))
	if !bytes.Equal(a, b) {
		t.Fatalf("replayed file differs from the recording (%d vs %d bytes)", len(a), len(b))
	}
}

func TestValidateReportsEveryProblemWithItsLine(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), `sources:
  gen:
    type: generate
    rate: fast
  other:
    type: nosuch
sinks:
  local:
    type: file
    max_size: -5
    max_filez: 3
    queue:
      when_full: sometimes
`)
	_, stderr, code := flowpipe(t, dir, "validate")
	if code != 1 {
		t.Fatalf("validate exited %d, want 1:\n%s", code, stderr)
	}
	for _, want := range []string{
		`pipeline.yaml:4: sources.gen.rate: want an integer, got string "fast"`,
		`pipeline.yaml:6: sources.other.type: unknown source type "nosuch"`,
		`pipeline.yaml:8: sinks.local.path: required, but not set`,
		`pipeline.yaml:10: sinks.local.max_size: invalid size`,
		`pipeline.yaml:11: sinks.local.max_filez: unknown key (did you mean "max_files"?)`,
		`pipeline.yaml:13: sinks.local.queue.when_full: unknown policy "sometimes"`,
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("validate output lacks %q:\n%s", want, stderr)
		}
	}
	// A reader goes through the file top to bottom: so do the problems.
	last := -1
	for _, line := range strings.Split(stderr, "\n") {
		var n int
		if _, err := fmt.Sscanf(line, "pipeline.yaml:%d:", &n); err == nil {
			if n < last {
				t.Errorf("problems not in line order:\n%s", stderr)
				break
			}
			last = n
		}
	}

	writeFile(t, filepath.Join(dir, "good.yaml"), "sources: {g: {type: generate}}\nsinks: {o: {type: file, path: x.jsonl}}\n")
	out, stderr, code := flowpipe(t, dir, "validate", "-c", "good.yaml")
	if code != 0 || !strings.Contains(out, "valid") {
		t.Fatalf("valid file: exit %d, %s %s", code, out, stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "x.jsonl")); err == nil {
		t.Error("validate created the sink's file; it must have no side effects")
	}
}

func TestRunStopsCleanlyOnSIGTERMAndServesAdmin(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), `
admin: {listen: "127.0.0.1:0"}
sources:
  gen: {type: generate, rate: 5000}
sinks:
  out: {type: file, path: flows.jsonl}
`)
	cmd := exec.Command(binary, "run", "--log-format", "json")
	cmd.Dir = dir
	stderr := &testenv.SyncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(stderr.String(), "pipeline running") {
		if time.Now().After(deadline) {
			t.Fatalf("not running: %s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("flowpipe exited with %v:\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "every accepted batch was delivered") {
		t.Errorf("shutdown did not report a full drain:\n%s", stderr.String())
	}
	for _, line := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		if !json.Valid([]byte(line)) {
			t.Errorf("--log-format json wrote a non-JSON line: %s", line)
		}
	}
	if n := len(componenttest.ReadJSONLines(t, filepath.Join(dir, "flows.jsonl"))); n == 0 {
		t.Error("no events written before SIGTERM")
	}
}

func TestGraphFormats(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), "sources: {g: {type: generate}}\nsinks: {a: {type: file, path: a}, b: {type: discard}}\n")
	out, _, code := flowpipe(t, dir, "graph")
	if code != 0 || !strings.Contains(out, "source_g -> sink_a") || !strings.Contains(out, "source_g -> sink_b") {
		t.Errorf("dot graph (exit %d):\n%s", code, out)
	}
	out, _, code = flowpipe(t, dir, "graph", "--format", "mermaid")
	if code != 0 || !strings.HasPrefix(out, "flowchart LR") || !strings.Contains(out, "source_g --> sink_a") {
		t.Errorf("mermaid graph (exit %d):\n%s", code, out)
	}
}

// graph checks the pipeline as validate does: an invalid one is not drawn, its problems are
// printed at their lines and the exit status is 1.
func TestGraphRefusesAnInvalidPipeline(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), "sources: {g: {type: generate}}\nsinks:\n  a: {type: file, path: a, sync: sometimes}\n")
	out, stderr, code := flowpipe(t, dir, "graph")
	if code != 1 || out != "" || !strings.Contains(stderr, `pipeline.yaml:3: sinks.a.sync: unknown mode "sometimes"`) {
		t.Fatalf("graph of an invalid pipeline: exit %d, stdout %q, stderr:\n%s", code, out, stderr)
	}
}

// The environment override that run --help shows works on the default pipeline.yaml.
func TestRunHelpExampleFitsTheDefaultPipeline(t *testing.T) {
	help, _, code := flowpipe(t, t.TempDir(), "run", "--help")
	if code != 0 {
		t.Fatalf("run --help: exit %d", code)
	}
	m := regexp.MustCompile(`(FLOWPIPE_[A-Z_]+)=(\S+) flowpipe run`).FindStringSubmatch(help)
	if m == nil {
		t.Fatalf("run --help shows no environment override:\n%s", help)
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary, "validate", "-c", filepath.Join(root, "pipeline.yaml"))
	cmd.Env = append(os.Environ(), m[1]+"="+m[2])
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "valid (1 sources, 0 enrichers, 1 sinks)") {
		t.Fatalf("%s=%s flowpipe validate on the default pipeline: %v\n%s", m[1], m[2], err, out)
	}
}

// The README's agent and collector run side by side on one host: distinct admin ports, and
// the agent's events arrive in the collector's file.
func TestReadmeAgentAndCollectorOnOneHost(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	block := func(name string) string {
		_, rest, ok := strings.Cut(string(readme), "<!-- readme:"+name+" -->")
		if !ok {
			t.Fatalf("README.md has no readme:%s block", name)
		}
		_, rest, _ = strings.Cut(rest, "```yaml\n")
		y, _, _ := strings.Cut(rest, "```")
		return y
	}
	collector, agent := block("collector"), block("agent")
	adminOf := regexp.MustCompile(`admin: \{listen: ([0-9.:]+)\}`)
	ca, aa := adminOf.FindStringSubmatch(collector), adminOf.FindStringSubmatch(agent)
	if ca == nil || aa == nil || ca[1] == aa[1] {
		t.Fatalf("the agent and the collector need distinct admin ports: %v and %v", ca, aa)
	}
	// Free ports instead of the README's, so that a busy machine does not fail the test.
	free := func() string { return testenv.FreeTCPAddr(t) }
	grpcAddr := free()
	collector = strings.NewReplacer(ca[1], free(), "127.0.0.1:7000", grpcAddr).Replace(collector)
	agent = strings.NewReplacer(aa[1], free(), "127.0.0.1:7000", grpcAddr).Replace(agent)
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "collector.yaml"), collector)
	writeFile(t, filepath.Join(dir, "agent.yaml"), agent)
	env := append(os.Environ(), "FLOW_SECRET=readme-test-secret-0123456789")

	col := exec.Command(binary, "run", "-c", "collector.yaml")
	col.Dir, col.Env = dir, env
	var colErr testenv.SyncBuffer
	col.Stderr = &colErr
	if err := col.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = col.Process.Kill(); _ = col.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(colErr.String(), "pipeline running") {
		if time.Now().After(deadline) {
			t.Fatalf("collector did not start:\n%s", colErr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), runBound)
	defer cancel()
	ag := exec.CommandContext(ctx, binary, "run", "-c", "agent.yaml")
	ag.Dir = dir
	ag.Env = append(env, "FLOWPIPE_SOURCES__DEMO__RATE=0", "FLOWPIPE_SOURCES__DEMO__COUNT=2000")
	if out, err := ag.CombinedOutput(); err != nil || !strings.Contains(string(out), "every accepted batch was delivered") {
		t.Fatalf("agent: %v (after %s: %v)\n%s\ncollector:\n%s", err, runBound, ctx.Err(), out, colErr.String())
	}
	// The agent finished only after the collector ACKed every event, which it does once the
	// file sink has them on disk.
	if n := len(componenttest.ReadJSONLines(t, filepath.Join(dir, "collected.jsonl"))); n != 2000 {
		t.Fatalf("collector wrote %d events, want 2000\n%s", n, colErr.String())
	}
	_ = col.Process.Signal(syscall.SIGTERM)
}
