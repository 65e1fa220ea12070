package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// `flowpipe reload` against a running flowpipe (the real binary, the default isolation) as
// systemd's ExecReload runs it: where flowpipe listens and its token come from the pipeline
// file (a Unix socket and a token file here), the command waits for the reload and says how
// it went, in its output and its exit status.
func TestReloadCommandPrintsTheDiffOrTheProblems(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "admin.token"), reloadToken+"\n")
	head := `admin: {listen: "unix:admin.sock", token_file: admin.token}
`
	good := head + `sources:
  gen: {type: generate, rate: 2000}
sinks:
  out: {type: file, path: out.jsonl}
`
	r := startRun(t, dir, good)
	eventually(t, "pipeline running", func() bool { return strings.Contains(r.stderr.String(), "pipeline running") })

	// A valid change: a new sink, and a source option changed. The diff, exit 0, and it runs.
	fixed := strings.Replace(good, "rate: 2000", "rate: 3000", 1) + "  more: {type: file, path: more.jsonl}\n"
	replaceFile(t, filepath.Join(dir, "p.yaml"), fixed)
	stdout, stderr, code := flowpipe(t, dir, "reload", "-c", "p.yaml")
	if code != 0 {
		t.Fatalf("reload of a valid change: exit %d, want 0:\n%s%s", code, stdout, stderr)
	}
	for _, want := range []string{
		`(?m)^started  sink/more$`,
		`(?m)^changed  source/gen: rate \((reconfigured|replaced)\)$`,
		`(?m)^reload applied: 1 started, 0 stopped, 1 changed, 1 kept$`,
	} {
		if !regexp.MustCompile(want).MatchString(stdout) {
			t.Errorf("reload's output lacks %s:\n%s", want, stdout)
		}
	}
	keepsGrowing(t, filepath.Join(dir, "more.jsonl"))
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))

	// A broken file: the problems as validate prints them, exit 1, the old pipeline runs on.
	broken := head + `runtime: {shutdown_timeout: soon}
sources:
  gen: {type: generate, rate: fast}
sinks:
  out: {type: file, path: out.jsonl}
  more: {type: file, path: more.jsonl}
`
	replaceFile(t, filepath.Join(dir, "p.yaml"), broken)
	want := validateLines(t, dir, "p.yaml")
	if len(want) != 2 || !strings.HasPrefix(want[0], "p.yaml:2: runtime.shutdown_timeout: ") || !strings.HasPrefix(want[1], "p.yaml:4: sources.gen.rate: ") {
		t.Fatalf("validate of the broken file: %q", want)
	}
	before := pluginChildren(t, r.cmd.Process.Pid)
	slices.Sort(before)
	stdout, stderr, code = flowpipe(t, dir, "reload", "-c", "p.yaml")
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if code != exitReloadRejected || stdout != "" || len(lines) != 3 || !slices.Equal(lines[:2], want) ||
		lines[2] != "reload rejected: 2 problem(s) found; nothing changed, flowpipe runs on as before" {
		t.Fatalf("reload of a broken file: exit %d, stdout %q, stderr:\n%s\nwant exit %d and the problems %q", code, stdout, stderr, exitReloadRejected, want)
	}
	keepsGrowing(t, filepath.Join(dir, "more.jsonl"))
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))
	if now := pluginChildren(t, r.cmd.Process.Pid); !slices.Equal(sorted(now), before) {
		t.Fatalf("plugin processes after the rejected reload: %v, were %v", now, before)
	}

	// A wrong token (given on the command line, over the file's): refused, exit 3.
	replaceFile(t, filepath.Join(dir, "p.yaml"), fixed)
	stdout, stderr, code = flowpipe(t, dir, "reload", "-c", "p.yaml", "--token", "not-"+reloadToken)
	if code != exitReloadRefused || !strings.Contains(stderr, "wants its token (admin.token): pass --token, --token-file or $FLOWPIPE_ADMIN_TOKEN") {
		t.Fatalf("reload with a wrong token: exit %d, want %d with a clear message:\n%s%s", code, exitReloadRefused, stdout, stderr)
	}

	// --json: the answer as the admin listener gave it; the running file again changes nothing.
	stdout, stderr, code = flowpipe(t, dir, "reload", "-c", "p.yaml", "--json")
	var a reloadAnswer
	if err := json.Unmarshal([]byte(stdout), &a); code != 0 || err != nil {
		t.Fatalf("reload --json: exit %d, %v:\n%s%s", code, err, stdout, stderr)
	}
	if a.Result != "applied" || len(a.Started)+len(a.Stopped)+len(a.Changed) != 0 || !slices.Equal(a.Kept, []string{"sink/more", "sink/out", "source/gen"}) {
		t.Fatalf("reload --json of the running file: %+v", a)
	}

	// A valid file that cannot be applied in full (a new gRPC receiver on a port in use):
	// what was done, the error, exit 1; the rest runs on.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	replaceFile(t, filepath.Join(dir, "p.yaml"), strings.Replace(fixed, "sinks:\n", `  rx: {type: grpc, listen: "`+busy.Addr().String()+`", auth: none}`+"\nsinks:\n", 1))
	stdout, stderr, code = flowpipe(t, dir, "reload", "-c", "p.yaml")
	if code != exitReloadRejected || !strings.Contains(stdout, "reload applied in part: ") ||
		!regexp.MustCompile(`(?m)^error: source/rx: start: .*address already in use`).MatchString(stderr) ||
		!strings.Contains(stderr, "reload failed in part: 1 change(s) could not be applied") {
		t.Fatalf("reload applied in part: exit %d, want %d:\n%s%s", code, exitReloadRejected, stdout, stderr)
	}
	keepsGrowing(t, filepath.Join(dir, "more.jsonl"))

	// Nothing listens at --admin: cannot reach, exit 2.
	stdout, stderr, code = flowpipe(t, dir, "reload", "--admin", "unix:"+filepath.Join(dir, "nobody.sock"))
	if code != exitReloadUnreachable || !strings.Contains(stderr, "cannot reach the admin listener at unix:") {
		t.Fatalf("reload of nobody: exit %d, want %d:\n%s%s", code, exitReloadUnreachable, stdout, stderr)
	}
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, r.cmd, r.stderr, 60*time.Second); code != 0 {
		t.Fatalf("exit %d after the reloads, want 0", code)
	}
}

func sorted(s []int) []int { slices.Sort(s); return s }

// With the admin listener disabled there is no one to ask: reload says so (exit 2) and
// points at SIGHUP; with --hup-pid (the unit's ExecReload) it validates the file and sends
// SIGHUP itself.
func TestReloadCommandWithoutAdminListener(t *testing.T) {
	dir := t.TempDir()
	good := `admin: {listen: ""}
sources:
  gen: {type: generate, rate: 2000}
sinks:
  out: {type: file, path: out.jsonl}
`
	writeFile(t, filepath.Join(dir, "p.yaml"), good)
	cmd, runlog := runUntilRunning(t, dir, "-c", "p.yaml")
	pid := strconv.Itoa(cmd.Process.Pid)

	stdout, stderr, code := flowpipe(t, dir, "reload", "-c", "p.yaml")
	if code != exitReloadUnreachable || !strings.Contains(stderr, `cannot reach flowpipe: p.yaml disables the admin listener (admin.listen: "")`) ||
		!strings.Contains(stderr, "kill -HUP") {
		t.Fatalf("reload with no admin listener: exit %d, want %d saying so and suggesting kill -HUP:\n%s%s", code, exitReloadUnreachable, stdout, stderr)
	}

	// --hup-pid: a broken file is not sent (exit 1, the problems as validate prints them).
	broken := strings.Replace(good, "rate: 2000", "rate: fast", 1)
	replaceFile(t, filepath.Join(dir, "p.yaml"), broken)
	want := validateLines(t, dir, "p.yaml")
	_, stderr, code = flowpipe(t, dir, "reload", "-c", "p.yaml", "--hup-pid", pid)
	if code != exitReloadRejected || !strings.HasPrefix(stderr, strings.Join(want, "\n")+"\n") {
		t.Fatalf("reload --hup-pid of a broken file: exit %d, want %d with %q:\n%s", code, exitReloadRejected, want, stderr)
	}
	if strings.Contains(runlog.String(), "reloading the pipeline file") {
		t.Fatalf("a broken file was sent to flowpipe:\n%s", runlog.String())
	}

	// A valid file: validated, SIGHUP sent, applied by flowpipe.
	replaceFile(t, filepath.Join(dir, "p.yaml"), good+"  more: {type: file, path: more.jsonl}\n")
	_, stderr, code = flowpipe(t, dir, "reload", "-c", "p.yaml", "--hup-pid", pid)
	if code != 0 || !strings.Contains(stderr, "sent SIGHUP to "+pid) {
		t.Fatalf("reload --hup-pid: exit %d, want 0:\n%s", code, stderr)
	}
	keepsGrowing(t, filepath.Join(dir, "more.jsonl"))
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, cmd, runlog, 60*time.Second); code != 0 {
		t.Fatalf("exit %d, want 0:\n%s", code, runlog.String())
	}
}

// POST /-/reload answers 503 when no reload can run: while the pipeline still starts (a
// Kafka source waits for brokers that do not answer: a loopback listener that accepts and
// says nothing) and while flowpipe stops (draining to a collector that is down, with an hour
// of runtime.shutdown_timeout). Nothing is reloaded nor counted as a reload; the real binary,
// the default isolation.
func TestReloadUnavailableWhileStartingOrStopping(t *testing.T) {
	unavailable := func(t *testing.T, r *running, why string) {
		t.Helper()
		code, body := postReload(t, r.admin)
		if code != 503 || body["result"] != "unavailable" || !strings.Contains(fmt.Sprint(body["error"]), why) {
			t.Fatalf("POST /-/reload: %d %v, want 503, unavailable: %s", code, body, why)
		}
		for _, res := range []string{"applied", "rejected", "failed"} {
			if v := reloads(t, r.admin, res); v != 0 {
				t.Errorf("flowpipe_config_reloads_total{result=%q} = %v after a refused request, want 0", res, v)
			}
		}
		if n := logged(r.stderr.String(), "reloading the pipeline file", nil); n != 0 {
			t.Errorf("%d reloads began", n)
		}
	}
	t.Run("starting", func(t *testing.T) {
		mute, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer mute.Close()
		go func() {
			for {
				c, err := mute.Accept()
				if err != nil {
					return
				}
				go io.Copy(io.Discard, c) // reads the requests, answers none
			}
		}()
		r := startRun(t, t.TempDir(), `admin: {listen: "127.0.0.1:0", token: `+reloadToken+`}
sources:
  log: {type: kafka, brokers: ["`+mute.Addr().String()+`"], topics: [flows], group: g, dial_timeout: 10m}
sinks:
  out: {type: file, path: out.jsonl}
`)
		unavailable(t, r, "still starting")
		if strings.Contains(r.stderr.String(), "pipeline running") {
			t.Fatalf("the pipeline runs: the request was not made while it started\n%s", r.stderr.String())
		}
	})
	t.Run("stopping", func(t *testing.T) {
		r := startRun(t, t.TempDir(), `admin: {listen: "127.0.0.1:0", token: `+reloadToken+`}
runtime: {shutdown_timeout: 1h}
sources:
  gen: {type: generate, rate: 2000}
sinks:
  collector: {type: grpc, url: "http://`+testenv.FreeTCPAddr(t)+`", hmac_secret: s3cret}
`)
		eventually(t, "events accepted and waiting for the collector", func() bool {
			return logged(r.stderr.String(), "stream to collector failed; reconnecting", nil) > 0 && scrape(t, r.admin, `flowpipe_sink_queue_events{component="collector"}`) > 0
		})
		if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		eventually(t, "draining", func() bool { return strings.Contains(r.stderr.String(), "draining in-flight batches") })
		unavailable(t, r, "stopping")
	})
}
