package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
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

// These tests reload a running flowpipe (the real binary, components in their own plugin
// processes: the default isolation) as a user would: SIGHUP, run --watch, POST /-/reload.

const reloadToken = "reload-test-t0ken"

// logRecords decodes flowpipe's --log-format json lines (plugin lines included).
func logRecords(log string) []map[string]any {
	var out []map[string]any
	for _, l := range strings.Split(log, "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(l), &rec) == nil {
			out = append(out, rec)
		}
	}
	return out
}

// rejectedLines are the problem lines the log shows for rejected reloads, in order.
func rejectedLines(log string) []string {
	var out []string
	for _, rec := range logRecords(log) {
		if rec["reload"] == "rejected" {
			out = append(out, fmt.Sprint(rec["msg"]))
		}
	}
	return out
}

// logged counts the log records whose message starts with msg and that have every attribute
// of attrs.
func logged(log, msg string, attrs map[string]string) int {
	n := 0
	for _, rec := range logRecords(log) {
		if !strings.HasPrefix(fmt.Sprint(rec["msg"]), msg) {
			continue
		}
		ok := true
		for k, v := range attrs {
			if fmt.Sprint(rec[k]) != v {
				ok = false
			}
		}
		if ok {
			n++
		}
	}
	return n
}

// postReload asks for a reload over the admin listener.
func postReload(t *testing.T, admin string) (int, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest("POST", "http://"+admin+"/-/reload", nil)
	req.Header.Set("Authorization", "Bearer "+reloadToken)
	c := http.Client{Timeout: 2 * time.Minute}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var body map[string]any
	if err := json.Unmarshal(b, &body); err != nil {
		t.Fatalf("POST /-/reload: %d, not JSON: %s", resp.StatusCode, b)
	}
	return resp.StatusCode, body
}

// scrape reads one series (name{labels} exactly as /metrics writes it) from the admin
// listener; -1 when it is absent.
func scrape(t *testing.T, admin, series string) float64 {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+admin+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+reloadToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(b)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func reloads(t *testing.T, admin, result string) float64 {
	t.Helper()
	return scrape(t, admin, `flowpipe_config_reloads_total{result="`+result+`"}`)
}

// replaceFile writes content as an editor does: a new file renamed over the old one.
func replaceFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".swp")
	writeFile(t, tmp, content)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// validateLines is what `flowpipe validate` prints for the pipeline file in dir, without
// its closing count.
func validateLines(t *testing.T, dir, file string) []string {
	t.Helper()
	_, stderr, code := flowpipe(t, dir, "validate", "-c", file)
	if code != 1 {
		t.Fatalf("validate %s: exit %d, want 1:\n%s", file, code, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	if !strings.HasSuffix(lines[len(lines)-1], "problem(s) found") {
		t.Fatalf("validate's last line: %q", lines[len(lines)-1])
	}
	return lines[:len(lines)-1]
}

// keepsGrowing waits until the file at path is larger than it is now: events still flow.
func keepsGrowing(t *testing.T, path string) {
	t.Helper()
	size := func() int64 {
		st, err := os.Stat(path)
		if err != nil {
			return 0
		}
		return st.Size()
	}
	before := size()
	eventually(t, filepath.Base(path)+" grows", func() bool { return size() > before })
}

// A broken file changes nothing, however the reload is asked for: --watch (an editor's
// rename), SIGHUP and POST /-/reload each reject it with the problems exactly as `flowpipe
// validate` prints them (in the log, and in the HTTP answer), count it as rejected, and the
// running pipeline goes on: events keep flowing, no plugin process is restarted. A file that
// changes a setting that takes effect only at start (admin.listen) is rejected the same way.
// Then a correct file is applied.
func TestReloadRejectsABrokenFileThenAppliesAGoodOne(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "p.yaml")
	head := `admin: {listen: "127.0.0.1:0", token: ` + reloadToken + `}
`
	good := head + `sources:
  gen: {type: generate, rate: 2000}
sinks:
  out: {type: file, path: out.jsonl}
`
	r := startRun(t, dir, good, "--watch")
	eventually(t, "pipeline running", func() bool { return strings.Contains(r.stderr.String(), "pipeline running") })
	children := pluginChildren(t, r.cmd.Process.Pid)
	slices.Sort(children)
	if len(children) != 2 {
		t.Fatalf("plugin processes %v, want 2 (generate and file)", children)
	}
	sameChildren := func(step string) {
		t.Helper()
		now := pluginChildren(t, r.cmd.Process.Pid)
		slices.Sort(now)
		if !slices.Equal(now, children) {
			t.Fatalf("%s: plugin processes %v, were %v", step, now, children)
		}
	}
	if v := reloads(t, r.admin, "rejected"); v != 0 {
		t.Fatalf(`flowpipe_config_reloads_total{result="rejected"} at start: %v, want 0`, v)
	}
	if v := scrape(t, r.admin, "flowpipe_config_last_reload_successful"); v != 1 {
		t.Fatalf("flowpipe_config_last_reload_successful at start: %v, want 1", v)
	}
	startedAt := scrape(t, r.admin, "flowpipe_config_last_reload_success_timestamp_seconds")
	if startedAt < float64(time.Now().Add(-time.Hour).Unix()) {
		t.Fatalf("flowpipe_config_last_reload_success_timestamp_seconds at start: %v", startedAt)
	}

	// The document's own problems (runtime:) and a component's, reported together.
	broken := head + `runtime: {shutdown_timeout: soon}
sources:
  gen: {type: generate, rate: fast}
sinks:
  out: {type: file, path: out.jsonl}
`
	replaceFile(t, file, broken)
	want := validateLines(t, dir, "p.yaml")
	if len(want) != 2 || !strings.HasPrefix(want[0], "p.yaml:2: runtime.shutdown_timeout: ") || !strings.HasPrefix(want[1], "p.yaml:4: sources.gen.rate: ") {
		t.Fatalf("validate of the broken file: %q", want)
	}
	eventually(t, "the watched file's reload rejected", func() bool { return reloads(t, r.admin, "rejected") == 1 })
	if got := rejectedLines(r.stderr.String()); !slices.Equal(got, want) {
		t.Fatalf("problems logged: %q, want what validate prints: %q", got, want)
	}
	if logged(r.stderr.String(), "reload rejected: 2 problem(s) found; nothing changed", map[string]string{"via": "watch"}) != 1 {
		t.Fatalf("no rejection logged for --watch:\n%s", r.stderr.String())
	}
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))
	sameChildren("after the rejected reload (watch)")

	// SIGHUP reads the same broken file.
	if err := r.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the SIGHUP reload rejected", func() bool { return reloads(t, r.admin, "rejected") == 2 })
	if got := rejectedLines(r.stderr.String()); !slices.Equal(got, append(slices.Clone(want), want...)) {
		t.Fatalf("problems logged after SIGHUP: %q", got)
	}
	if logged(r.stderr.String(), "reload rejected: 2 problem(s) found", map[string]string{"via": "SIGHUP"}) != 1 {
		t.Fatalf("no rejection logged for SIGHUP:\n%s", r.stderr.String())
	}
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))

	// The admin endpoint answers with the problems.
	code, body := postReload(t, r.admin)
	var got []string
	for _, p := range body["problems"].([]any) {
		got = append(got, fmt.Sprint(p))
	}
	if code != http.StatusUnprocessableEntity || body["result"] != "rejected" || !slices.Equal(got, want) {
		t.Fatalf("POST /-/reload of the broken file: %d %v, want 422 with %q", code, body, want)
	}
	if v := reloads(t, r.admin, "rejected"); v != 3 {
		t.Fatalf("rejected reloads after POST: %v, want 3", v)
	}
	if v := scrape(t, r.admin, "flowpipe_config_last_reload_successful"); v != 0 {
		t.Fatalf("flowpipe_config_last_reload_successful after rejections: %v, want 0", v)
	}
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))
	sameChildren("after three rejected reloads")

	// admin: takes effect only at start: a file that changes it is rejected, at its line.
	replaceFile(t, file, strings.Replace(good, `"127.0.0.1:0"`, `"127.0.0.1:1"`, 1))
	eventually(t, "the admin.listen change rejected", func() bool { return reloads(t, r.admin, "rejected") == 4 })
	if got := rejectedLines(r.stderr.String()); got[len(got)-1] != `p.yaml:1: admin.listen: changed from "127.0.0.1:0" to "127.0.0.1:1"; takes effect only when flowpipe starts: restart flowpipe to apply it, or put the old value back to reload the rest` {
		t.Fatalf("start-only change logged as %q", got[len(got)-1])
	}
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))
	sameChildren("after the rejected admin.listen change")
	if v := reloads(t, r.admin, "failed"); v != 0 {
		t.Fatalf("failed reloads: %v, want 0", v)
	}
}

// A reload tells systemd as Type=notify-reload wants it: RELOADING=1 with MONOTONIC_USEC in
// one datagram, then READY=1 when it is done (whatever its result). A fake notify socket,
// as in TestRunNotifiesSystemd: systemd is not PID 1 here.
func TestReloadNotifiesSystemd(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), `
admin: {listen: ""}
sources:
  gen: {type: generate, rate: 2000}
sinks:
  out: {type: file, path: flows.jsonl}
`)
	sock, states := fakeNotifySocket(t, false)
	cmd := exec.Command(binary, "run")
	cmd.Dir = dir
	stderr := &testenv.SyncBuffer{}
	cmd.Stderr = stderr
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _, _ = cmd.Process.Wait() })
	waitState(t, states, "READY=1")
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitState(t, states, "RELOADING=1")
	next := <-states
	usec, ok := strings.CutPrefix(next, "MONOTONIC_USEC=")
	if n, err := strconv.ParseInt(usec, 10, 64); !ok || err != nil || n <= 0 {
		t.Fatalf("after RELOADING=1: %q, want MONOTONIC_USEC=<microseconds>", next)
	}
	if before := waitState(t, states, "READY=1"); slices.Contains(before, "STOPPING=1") {
		t.Fatalf("states before READY=1: %v", before)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitState(t, states, "STOPPING=1")
	if code := waitExit(t, cmd, stderr, 60*time.Second); code != 0 {
		t.Fatalf("exit %d:\n%s", code, stderr.String())
	}
}
