package main

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// runUntilRunning starts `flowpipe run` in dir and waits until the pipeline runs.
func runUntilRunning(t *testing.T, dir string, args ...string) (*exec.Cmd, *testenv.SyncBuffer) {
	t.Helper()
	cmd := exec.Command(binary, append([]string{"run"}, args...)...)
	cmd.Dir = dir
	stderr := &testenv.SyncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _, _ = cmd.Process.Wait() })
	eventually(t, "pipeline running", func() bool { return strings.Contains(stderr.String(), "pipeline running") })
	return cmd, stderr
}

// waitExit waits for cmd to exit and returns its exit code; the bound only stops a broken
// test from hanging (the pipelines below would wait far longer if the behaviour were wrong).
func waitExit(t *testing.T, cmd *exec.Cmd, stderr *testenv.SyncBuffer, within time.Duration) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(within):
		t.Fatalf("flowpipe still running %s later:\n%s", within, stderr.String())
		return -1
	}
}

// waitAccepted waits until the grpc sink says events wait for the collector that is down:
// the pipeline has accepted events it cannot deliver.
func waitAccepted(t *testing.T, stderr *testenv.SyncBuffer) {
	t.Helper()
	waiting := regexp.MustCompile(`events_waiting=[1-9]`)
	eventually(t, "events accepted and waiting for the collector", func() bool { return waiting.MatchString(stderr.String()) })
}

// generateToFile is a pipeline file: generated events into flows.jsonl.
const generateToFile = `
admin: {listen: ""}
sources:
  gen: {type: generate, rate: 2000}
sinks:
  out: {type: file, path: flows.jsonl}
`

// runIntoDownCollector runs, in dir, generate → a grpc sink whose collector is down (a
// loopback port nothing listens on), with runtime.shutdown_timeout, until the pipeline has
// accepted events it cannot deliver.
func runIntoDownCollector(t *testing.T, dir, shutdownTimeout string) (*exec.Cmd, *testenv.SyncBuffer) {
	t.Helper()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), `
admin: {listen: ""}
runtime: {shutdown_timeout: `+shutdownTimeout+`}
sources:
  gen: {type: generate, rate: 2000}
sinks:
  collector: {type: grpc, url: "http://`+testenv.FreeTCPAddr(t)+`", hmac_secret: s3cret}
`)
	cmd, stderr := runUntilRunning(t, dir)
	waitAccepted(t, stderr)
	return cmd, stderr
}

// A second SIGTERM ends a drain that would otherwise wait for runtime.shutdown_timeout (an
// hour here): flowpipe exits at once, still counting and logging what it gives up, with the
// exit status for undelivered events. Default isolation.
func TestSecondSignalStopsAtOnceAndCountsTheLoss(t *testing.T) {
	cmd, stderr := runIntoDownCollector(t, t.TempDir(), "1h")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	eventually(t, "draining", func() bool { return strings.Contains(stderr.String(), "draining in-flight batches") })
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	code := waitExit(t, cmd, stderr, 30*time.Second)
	out := stderr.String()
	if code != exitUndelivered {
		t.Errorf("exit status %d, want %d (events were not delivered):\n%s", code, exitUndelivered, out)
	}
	if !strings.Contains(out, "events not delivered before shutdown") || !strings.Contains(out, "sink=collector") {
		t.Errorf("the loss is not logged per sink:\n%s", out)
	}
	if strings.Contains(out, "close failed") {
		t.Errorf("a component is blamed for a close the user cut short:\n%s", out)
	}
}

// When the drain runs out of runtime.shutdown_timeout, the components that did nothing
// wrong are not blamed for the close that follows (the source used to be reported as
// "close failed ... DeadlineExceeded" because the drain had spent its close time), and the
// exit status says events were lost.
func TestShutdownTimeoutBlamesNobodyAndExitsNonZero(t *testing.T) {
	cmd, stderr := runIntoDownCollector(t, t.TempDir(), "1s")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	code := waitExit(t, cmd, stderr, 60*time.Second)
	out := stderr.String()
	if code != exitUndelivered {
		t.Errorf("exit status %d, want %d:\n%s", code, exitUndelivered, out)
	}
	if strings.Contains(out, "close failed") || strings.Contains(out, "DeadlineExceeded") || strings.Contains(out, "deadline exceeded") {
		t.Errorf("shutdown blames a component for the drain's deadline:\n%s", out)
	}
}

// SIGHUP does not kill flowpipe (nor its plugin processes, which share its process group):
// it reloads the unchanged file, which changes nothing, and keeps delivering; a later
// SIGTERM stops it cleanly.
func TestSIGHUPKeepsRunning(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), generateToFile)
	cmd, stderr := runUntilRunning(t, dir)
	children := pluginChildren(t, cmd.Process.Pid)
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	// The plugins share flowpipe's process group: a terminal hangup reaches them too.
	for _, pid := range children {
		_ = syscall.Kill(pid, syscall.SIGHUP)
	}
	eventually(t, "SIGHUP logged", func() bool {
		return strings.Contains(stderr.String(), `msg="reloading the pipeline file" file=pipeline.yaml via=SIGHUP`) &&
			regexp.MustCompile(`msg="reload applied" file=pipeline.yaml started=0 stopped=0 changed=0 kept=2 `).MatchString(stderr.String())
	})
	size := func() int64 {
		st, err := os.Stat(filepath.Join(dir, "flows.jsonl"))
		if err != nil {
			return 0
		}
		return st.Size()
	}
	before := size()
	eventually(t, "events still written after SIGHUP", func() bool { return size() > before })
	for _, pid := range append(children, cmd.Process.Pid) {
		if !testenv.Alive(pid) {
			t.Fatalf("process %d died of SIGHUP:\n%s", pid, stderr.String())
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, cmd, stderr, 60*time.Second); code != 0 {
		t.Errorf("exit status %d after SIGHUP then SIGTERM, want 0:\n%s", code, stderr.String())
	}
}

// `flowpipe run | head -1`: when the reader of standard output goes away, flowpipe stops
// (it used to retry "broken pipe" for ever), says why, and counts what it did not deliver.
// A real pipe whose read end the test closes after one line; both isolations.
func TestClosedStdoutStopsThePipeline(t *testing.T) {
	for _, isolation := range []string{"process", "inproc"} {
		t.Run(isolation, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, "pipeline.yaml"), `
admin: {listen: ""}
runtime: {shutdown_timeout: 1h}
sources:
  gen: {type: generate, rate: 5000}
sinks:
  stdout: {type: file, path: "-", isolation: `+isolation+`}
`)
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(binary, "run")
			cmd.Dir = dir
			stderr := &testenv.SyncBuffer{}
			cmd.Stdout, cmd.Stderr = w, stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cmd.Process.Kill(); _, _ = cmd.Process.Wait() })
			w.Close()
			line, err := bufio.NewReader(r).ReadString('\n')
			if err != nil || !strings.HasPrefix(line, `{"event_id"`) {
				t.Fatalf("first line %q, %v:\n%s", line, err, stderr.String())
			}
			r.Close() // head -1 exits
			code := waitExit(t, cmd, stderr, 60*time.Second)
			out := stderr.String()
			if code != exitUndelivered {
				t.Errorf("exit status %d, want %d:\n%s", code, exitUndelivered, out)
			}
			if !strings.Contains(out, "standard output was closed by its reader") {
				t.Errorf("no clear log line for the closed stdout:\n%s", out)
			}
			if strings.Contains(out, "retrying") {
				t.Errorf("a closed stdout was retried:\n%s", out)
			}
		})
	}
}
