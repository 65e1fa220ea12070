package main

import (
	"bufio"
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

// losses lists the series of flowpipe_events_dropped_total that are not 0.
func losses(t *testing.T, admin string) []string {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+admin+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+reloadToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "flowpipe_events_dropped_total{") && !strings.HasSuffix(l, " 0") {
			out = append(out, l)
		}
	}
	return out
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

// keepsGrowing waits until the file sink's output at path (with the files it rotated to)
// is larger than it is now: events still flow.
func keepsGrowing(t *testing.T, path string) {
	t.Helper()
	size := func() int64 {
		rotated, _ := filepath.Glob(path + ".*")
		var n int64
		for _, f := range append(rotated, path) {
			if st, err := os.Stat(f); err == nil {
				n += st.Size()
			}
		}
		return n
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
	// The log reaches r.stderr through a pipe the test copies on its own goroutine.
	eventually(t, "the watched file's rejection logged", func() bool {
		return logged(r.stderr.String(), "reload rejected: 2 problem(s) found; nothing changed", map[string]string{"via": "watch"}) > 0
	})
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
	eventually(t, "the SIGHUP rejection logged", func() bool {
		return logged(r.stderr.String(), "reload rejected: 2 problem(s) found", map[string]string{"via": "SIGHUP"}) > 0
	})
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
	eventually(t, "the fourth rejection logged", func() bool { return logged(r.stderr.String(), "reload rejected: ", nil) == 4 })
	if got := rejectedLines(r.stderr.String()); got[len(got)-1] != `p.yaml:1: admin.listen: changed from "127.0.0.1:0" to "127.0.0.1:1"; takes effect only when flowpipe starts: restart flowpipe to apply it, or put the old value back to reload the rest` {
		t.Fatalf("start-only change logged as %q", got[len(got)-1])
	}
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))
	sameChildren("after the rejected admin.listen change")

	// A component's problem alone: the pipeline's own check finds it.
	replaceFile(t, file, strings.Replace(good, "path: out.jsonl}", "path: out.jsonl, sync: sometimes}", 1))
	want = validateLines(t, dir, "p.yaml")
	if len(want) != 1 || !strings.HasPrefix(want[0], "p.yaml:5: sinks.out.sync: ") {
		t.Fatalf("validate of the file with a bad sink option: %q", want)
	}
	eventually(t, "the bad sink option rejected", func() bool { return reloads(t, r.admin, "rejected") == 5 })
	eventually(t, "the fifth rejection logged", func() bool { return logged(r.stderr.String(), "reload rejected: ", nil) == 5 })
	if got := rejectedLines(r.stderr.String()); got[len(got)-1] != want[0] {
		t.Fatalf("problem logged as %q, want %q", got[len(got)-1], want[0])
	}
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))
	sameChildren("after the rejected sink option")

	// Then a correct file, written in place this time, is applied: a second sink starts,
	// the others are kept.
	fixed := good + "  more: {type: file, path: more.jsonl}\n"
	writeFile(t, file, fixed)
	eventually(t, "the correct file applied", func() bool { return reloads(t, r.admin, "applied") == 1 })
	keepsGrowing(t, filepath.Join(dir, "more.jsonl"))
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))
	if v := scrape(t, r.admin, "flowpipe_config_last_reload_successful"); v != 1 {
		t.Fatalf("flowpipe_config_last_reload_successful after the applied reload: %v, want 1", v)
	}
	if v := scrape(t, r.admin, "flowpipe_config_last_reload_success_timestamp_seconds"); v < startedAt {
		t.Fatalf("flowpipe_config_last_reload_success_timestamp_seconds went back: %v < %v", v, startedAt)
	}
	now := pluginChildren(t, r.cmd.Process.Pid)
	for _, pid := range children {
		if !slices.Contains(now, pid) {
			t.Fatalf("plugin process %d of an unchanged component was restarted (now %v)", pid, now)
		}
	}
	if len(now) != 3 {
		t.Fatalf("plugin processes after adding a sink: %v, want 3", now)
	}
	// The same file again: nothing to do, and the answer says so.
	code, body = postReload(t, r.admin)
	if code != 200 || body["result"] != "applied" || fmt.Sprint(body["kept"]) != "[sink/more sink/out source/gen]" ||
		fmt.Sprint(body["started"], body["stopped"], body["changed"]) != "[] [] []" {
		t.Fatalf("POST /-/reload of the running file: %d %v", code, body)
	}
	if v := reloads(t, r.admin, "failed"); v != 0 {
		t.Fatalf("failed reloads: %v, want 0", v)
	}
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, r.cmd, r.stderr, 60*time.Second); code != 0 {
		t.Fatalf("exit %d after the reloads, want 0", code)
	}
}

// A reload tells systemd as Type=notify-reload wants it: RELOADING=1 with MONOTONIC_USEC in
// one datagram, then READY=1 when it is done (whatever its result). A fake notify socket,
// as in TestRunNotifiesSystemd: systemd is not PID 1 here.
func TestReloadNotifiesSystemd(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), generateToFile)
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

// countIDs adds, for every line of a file sink's output (path and the files it rotated to,
// path.<time>), its event ID to ids. It reads the ID where the flowpipe schema puts it
// (first) instead of decoding each line: the load test reads millions of lines.
func countIDs(t *testing.T, path string, ids map[string]int) (lines int) {
	t.Helper()
	rotated, err := filepath.Glob(path + ".*")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range append(rotated, path) {
		lines += countFileIDs(t, f, ids)
	}
	return lines
}

func countFileIDs(t *testing.T, path string, ids map[string]int) (lines int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	const prefix = `{"event_id":"`
	for sc.Scan() {
		l := sc.Bytes()
		if len(l) < len(prefix)+36 || string(l[:len(prefix)]) != prefix {
			t.Fatalf("%s: line %d is not an event: %.80q", path, lines+1, l)
		}
		ids[string(l[len(prefix):len(prefix)+36])]++
		lines++
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return lines
}

// agentConfig is the agent's pipeline in the load test; each reload changes one field.
type agentConfig struct {
	admin     string
	genOpts   string   // more options of the generate source
	enrichers []string // flow-style enricher entries, in order
	allOpts   string   // more options of the file sink "all"
	url       string   // the grpc sink's url: (or urls: list)
	secret    string
	grpcOpts  string // more options of the grpc sink
	extra     string // an extra file sink's name, "" for none
}

func (c agentConfig) yaml() string {
	var b strings.Builder
	fmt.Fprintf(&b, "admin: {listen: %q, token: %s}\n", c.admin, reloadToken)
	fmt.Fprintf(&b, "sources:\n  gen: {type: generate, rate: 50000, batch_size: 1000%s}\n", c.genOpts)
	if len(c.enrichers) > 0 {
		b.WriteString("enrichers:\n")
		for _, e := range c.enrichers {
			fmt.Fprintf(&b, "  - %s\n", e)
		}
	}
	fmt.Fprintf(&b, "sinks:\n  all: {type: file, path: all.jsonl%s}\n", c.allOpts)
	fmt.Fprintf(&b, "  collector: {type: grpc, %s, hmac_secret: %s, reconnect_min: 50ms, reconnect_max: 1s%s}\n", c.url, c.secret, c.grpcOpts)
	if c.extra != "" {
		fmt.Fprintf(&b, "  %s: {type: file, path: %s.jsonl}\n", c.extra, c.extra)
	}
	return b.String()
}

// TestReloadUnderLoadLosesAndDoublesNothing reloads an agent 20 times in a row while it
// generates 50,000 events/s into a file sink and a grpc sink; the grpc sink streams to one of
// two collectors (flowpipe processes: grpc source with de-duplication → file). Each reload
// changes something else: a sink's own option, a sink's runtime settings, the enricher list,
// a sink added and removed, the collector's URL (to the other collector, and back, and to
// both), its token (a new secret the collectors accept), the source. Every POST /-/reload is
// answered 200 with the change it made; every event the agent generated is in its file
// exactly once and in the collectors' files (together) exactly once; the agent stops with
// every accepted event delivered. All processes run their components as plugins.
func TestReloadUnderLoadLosesAndDoublesNothing(t *testing.T) {
	dir := t.TempDir()
	const s1, s2 = "reload-secret-one-0123456789", "reload-secret-two-0123456789"
	addrA, addrB := testenv.FreeTCPAddr(t), testenv.FreeTCPAddr(t)
	collector := func(name, addr string) *tierProc {
		return startProc(t, dir, name, fmt.Sprintf(`admin: {listen: ""}
sources:
  agents: {type: grpc, listen: %q, auth: hmac, secrets: [%s, %s], dedup: {window: 10m}}
sinks:
  out: {type: file, path: %s.jsonl}
`, addr, s1, s2, name))
	}
	colA, colB := collector("collector-a", addrA), collector("collector-b", addrB)

	cfg := agentConfig{admin: testenv.FreeTCPAddr(t), url: `url: "http://` + addrA + `"`, secret: s1}
	agent := startRun(t, dir, cfg.yaml())
	eventually(t, "agent running", func() bool { return strings.Contains(agent.stderr.String(), "pipeline running") })
	all := filepath.Join(dir, "all.jsonl")
	keepsGrowing(t, all)

	community := "{type: community_id}"
	resources := "{type: resources, resources: [{id: lan, prefixes: [10.0.0.0/8]}]}"
	steps := []struct {
		what   string
		change func(*agentConfig)
		want   string // the component in the answer's started, stopped or changed list
		list   string
	}{
		{"sink runtime setting", func(c *agentConfig) { c.allOpts = ", in_flight: 2" }, "sink/all", "changed"},
		{"enricher added", func(c *agentConfig) { c.enrichers = []string{community} }, "enricher/community_id", "started"},
		{"sink added", func(c *agentConfig) { c.extra = "extra1" }, "sink/extra1", "started"},
		{"grpc url to the second collector", func(c *agentConfig) { c.url = `url: "http://` + addrB + `"` }, "sink/collector", "changed"},
		{"second enricher", func(c *agentConfig) { c.enrichers = []string{community, resources} }, "enricher/resources", "started"},
		{"sink removed", func(c *agentConfig) { c.extra = "" }, "sink/extra1", "stopped"},
		{"new token", func(c *agentConfig) { c.secret = s2 }, "sink/collector", "changed"},
		{"file sink option", func(c *agentConfig) { c.allOpts += ", sync: interval" }, "sink/all", "changed"},
		{"enricher removed", func(c *agentConfig) { c.enrichers = []string{resources} }, "enricher/community_id", "stopped"},
		{"grpc url back to the first collector", func(c *agentConfig) { c.url = `url: "http://` + addrA + `"` }, "sink/collector", "changed"},
		{"grpc sink runtime setting", func(c *agentConfig) { c.grpcOpts = ", in_flight: 8" }, "sink/collector", "changed"},
		{"another sink added", func(c *agentConfig) { c.extra = "extra2" }, "sink/extra2", "started"},
		{"queue setting", func(c *agentConfig) { c.allOpts += ", queue: {max_events: 50000}" }, "sink/all", "changed"},
		{"that sink removed", func(c *agentConfig) { c.extra = "" }, "sink/extra2", "stopped"},
		{"grpc sink option", func(c *agentConfig) { c.grpcOpts += ", max_in_flight: 10000" }, "sink/collector", "changed"},
		{"source option", func(c *agentConfig) { c.genOpts = ", flows: 2048" }, "source/gen", "changed"},
		{"both collectors", func(c *agentConfig) { c.url = `urls: ["http://` + addrA + `", "http://` + addrB + `"]` }, "sink/collector", "changed"},
		{"file sink rotation", func(c *agentConfig) { c.allOpts += ", max_size: 0" }, "sink/all", "changed"},
		{"enricher list swapped", func(c *agentConfig) { c.enrichers = []string{community} }, "enricher/resources", "stopped"},
		{"token back, public key", func(c *agentConfig) { c.secret, c.grpcOpts = s1, c.grpcOpts+", public_key: agent-one" }, "sink/collector", "changed"},
	}
	var took []time.Duration // a figure for the report, not a bound
	for i, st := range steps {
		st.change(&cfg)
		writeFile(t, filepath.Join(dir, "p.yaml"), cfg.yaml())
		began := time.Now()
		code, body := postReload(t, agent.admin)
		took = append(took, time.Since(began))
		if code != 200 || body["result"] != "applied" || len(body["errors"].([]any)) != 0 {
			t.Fatalf("reload %d (%s): %d %v\n%s", i+1, st.what, code, body, cfg.yaml())
		}
		var names []string
		for _, v := range body[st.list].([]any) {
			if m, ok := v.(map[string]any); ok {
				names = append(names, fmt.Sprint(m["component"]))
			} else {
				names = append(names, fmt.Sprint(v))
			}
		}
		if !slices.Contains(names, st.want) {
			t.Fatalf("reload %d (%s): %s is %v, want %s in it: %v", i+1, st.what, st.list, names, st.want, body)
		}
		if l := losses(t, agent.admin); len(l) > 0 {
			t.Fatalf("reload %d (%s) lost events: %v\n%s", i+1, st.what, l, cfg.yaml())
		}
		keepsGrowing(t, all) // events flow between reloads
	}
	if v := reloads(t, agent.admin, "applied"); v != float64(len(steps)) {
		t.Fatalf("applied reloads: %v, want %d", v, len(steps))
	}
	slices.Sort(took)
	t.Logf("POST /-/reload answered in %v (fastest), %v (median), %v (slowest)", took[0], took[len(took)/2], took[len(took)-1])

	// The source is turned off by one more reload (enabled: false), which stops it after its
	// batches in flight are through; once the queues are empty the agent stops. (A SIGTERM
	// under this backpressure would give up the batch a full queue keeps waiting at the
	// fan-out, counted as not delivered: shutdown's own behaviour, not a reload's.)
	cfg.genOpts += ", enabled: false"
	writeFile(t, filepath.Join(dir, "p.yaml"), cfg.yaml())
	if code, body := postReload(t, agent.admin); code != 200 || fmt.Sprint(body["stopped"]) != "[source/gen]" {
		t.Fatalf("turning the source off: %d %v", code, body)
	}
	eventually(t, "the agent's queues empty", func() bool {
		return scrape(t, agent.admin, `flowpipe_sink_queue_events{component="collector"}`) == 0 &&
			scrape(t, agent.admin, `flowpipe_sink_queue_events{component="all"}`) == 0
	})
	if err := agent.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, agent.cmd, agent.stderr, 2*time.Minute); code != 0 {
		t.Fatalf("agent exit %d, want 0 (every accepted event delivered)", code)
	}
	if !strings.Contains(agent.stderr.String(), "every accepted batch was delivered") {
		t.Fatal("the agent did not report a full drain")
	}

	generated := map[string]int{}
	n := countIDs(t, all, generated)
	for id, c := range generated {
		if c != 1 {
			t.Fatalf("event %s is %d times in all.jsonl", id, c)
		}
	}
	collected := map[string]int{}
	perCollector := map[string]int{}
	for _, name := range []string{"collector-a", "collector-b"} {
		perCollector[name] = countIDs(t, filepath.Join(dir, name+".jsonl"), collected)
	}
	var missing, doubled, foreign int
	for id := range generated {
		switch collected[id] {
		case 0:
			missing++
		case 1:
		default:
			doubled++
		}
	}
	for id := range collected {
		if generated[id] == 0 {
			foreign++
		}
	}
	t.Logf("%d events generated; collector-a wrote %d, collector-b %d", n, perCollector["collector-a"], perCollector["collector-b"])
	if missing+doubled+foreign > 0 {
		t.Fatalf("of %d events, %d never reached a collector, %d reached them more than once, and %d collected events were never generated", n, missing, doubled, foreign)
	}
	for name, c := range perCollector {
		if c == 0 {
			t.Errorf("%s received nothing: the url changes did not move the stream", name)
		}
	}
	for _, extra := range []string{"extra1", "extra2"} {
		ids := map[string]int{}
		if countIDs(t, filepath.Join(dir, extra+".jsonl"), ids) == 0 {
			t.Errorf("the added sink %s wrote nothing", extra)
		}
		for id, c := range ids {
			if c != 1 || generated[id] != 1 {
				t.Fatalf("%s: event %s %d times (generated %d times)", extra, id, c, generated[id])
			}
		}
	}
	colA.kill()
	colB.kill()
}

// pluginsByType maps each plugin process of flowpipe (pid) to its "<kind> <type>".
func pluginsByType(t *testing.T, pid int) map[int]string {
	t.Helper()
	out := map[int]string{}
	for _, c := range pluginChildren(t, pid) {
		out[c] = pluginType(t, c)
	}
	return out
}

// A reload leaves the plugin processes of unchanged components alone: same process IDs, and
// their counters go on. A removed component's process ends, a new one's starts; a changed
// component keeps its process only when it took the new options in place.
func TestReloadKeepsUnchangedPluginProcesses(t *testing.T) {
	dir := t.TempDir()
	head := `admin: {listen: "127.0.0.1:0", token: ` + reloadToken + `}
sources:
  gen: {type: generate, rate: 2000}
`
	r := startRun(t, dir, head+`enrichers:
  - {type: community_id}
sinks:
  out: {type: file, path: out.jsonl}
  gone: {type: discard}
`)
	eventually(t, "pipeline running", func() bool { return strings.Contains(r.stderr.String(), "pipeline running") })
	before := pluginsByType(t, r.cmd.Process.Pid)
	pidOf := func(procs map[int]string, typ string) []int {
		var pids []int
		for pid, ty := range procs {
			if ty == typ {
				pids = append(pids, pid)
			}
		}
		slices.Sort(pids)
		return pids
	}
	gen, enr, out, gone := pidOf(before, "source generate"), pidOf(before, "enricher community_id"), pidOf(before, "sink file"), pidOf(before, "sink discard")
	if len(before) != 4 || len(gen) != 1 || len(enr) != 1 || len(out) != 1 || len(gone) != 1 {
		t.Fatalf("plugin processes at start: %v", before)
	}
	written := `flowpipe_events_out_total{component="out",kind="sink"}`
	eventually(t, "events written", func() bool { return scrape(t, r.admin, written) > 0 })

	// SIGHUP: a sink removed, another added.
	writeFile(t, filepath.Join(dir, "p.yaml"), head+`enrichers:
  - {type: community_id}
sinks:
  out: {type: file, path: out.jsonl}
  added: {type: file, path: added.jsonl}
`)
	atReload := scrape(t, r.admin, written)
	if err := r.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the SIGHUP reload applied", func() bool { return reloads(t, r.admin, "applied") == 1 })
	eventually(t, "the reload's diff logged", func() bool {
		return logged(r.stderr.String(), "reload: stopped", map[string]string{"component": "sink/gone"}) > 0
	})
	if logged(r.stderr.String(), "reload: started", map[string]string{"component": "sink/added"}) != 1 ||
		logged(r.stderr.String(), "reload: stopped", map[string]string{"component": "sink/gone"}) != 1 {
		t.Fatalf("the reload's diff is not in the log:\n%s", r.stderr.String())
	}
	keepsGrowing(t, filepath.Join(dir, "added.jsonl"))
	// The admin API (and the page) show the pipeline that runs now.
	req, _ := http.NewRequest("GET", "http://"+r.admin+"/api/pipeline", nil)
	req.Header.Set("Authorization", "Bearer "+reloadToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	graph, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(graph), `"name": "added"`) || strings.Contains(string(graph), `"name": "gone"`) {
		t.Fatalf("/api/pipeline after the reload:\n%s", graph)
	}
	after := pluginsByType(t, r.cmd.Process.Pid)
	for _, pid := range []int{gen[0], enr[0], out[0]} {
		if after[pid] != before[pid] {
			t.Fatalf("%s (pid %d) of an unchanged component is gone after the reload: %v, before %v", before[pid], pid, after, before)
		}
	}
	eventually(t, "the removed sink's process ends", func() bool { return !testenv.Alive(gone[0]) })
	if files := pidOf(after, "sink file"); len(after) != 4 || len(files) != 2 {
		t.Fatalf("plugin processes after the reload: %v, want the three kept and a new file sink", after)
	}
	if v := scrape(t, r.admin, written); v < atReload {
		t.Fatalf("the kept sink's counter went back from %v to %v", atReload, v)
	}

	// POST: the enricher's option changes; its process goes on only if it took them in place.
	writeFile(t, filepath.Join(dir, "p.yaml"), head+`enrichers:
  - {type: community_id, seed: 7}
sinks:
  out: {type: file, path: out.jsonl}
  added: {type: file, path: added.jsonl}
`)
	code, body := postReload(t, r.admin)
	changed, _ := body["changed"].([]any)
	if code != 200 || len(changed) != 1 {
		t.Fatalf("POST /-/reload: %d %v", code, body)
	}
	ch := changed[0].(map[string]any)
	if ch["component"] != "enricher/community_id" || fmt.Sprint(ch["keys"]) != "[seed]" {
		t.Fatalf("change reported as %v, want enricher/community_id's seed", ch)
	}
	now := pluginsByType(t, r.cmd.Process.Pid)
	for pid, ty := range after {
		if ty == "enricher community_id" {
			continue
		}
		if now[pid] != ty {
			t.Fatalf("%s (pid %d) is gone after the enricher's change: %v, before %v", ty, pid, now, after)
		}
	}
	newEnr := pidOf(now, "enricher community_id")
	t.Logf("the enricher's change: %v", ch["how"])
	switch ch["how"] {
	case "reconfigured":
		if !slices.Equal(newEnr, enr) {
			t.Fatalf("the enricher was reconfigured in place but its process changed: %v, was %v", newEnr, enr)
		}
	case "replaced":
		eventually(t, "the replaced enricher's process ends", func() bool { return !testenv.Alive(enr[0]) })
		if newEnr = pidOf(pluginsByType(t, r.cmd.Process.Pid), "enricher community_id"); len(newEnr) != 1 || newEnr[0] == enr[0] {
			t.Fatalf("the enricher was replaced but its processes are %v (was %v)", newEnr, enr)
		}
	default:
		t.Fatalf("how %q", ch["how"])
	}
	keepsGrowing(t, filepath.Join(dir, "out.jsonl"))
	if l := losses(t, r.admin); len(l) > 0 {
		t.Fatalf("the reloads lost events: %v", l)
	}
}
