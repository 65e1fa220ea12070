package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// These tests run components as real plugin processes through the flowpipe binary.

// writeEvents writes n deterministic events as JSON lines, the input of a replay source.
func writeEvents(t *testing.T, path string, n int) {
	t.Helper()
	var buf []byte
	for i := range n {
		var e flow.Event
		e.EventID[6], e.EventID[8] = 0x40, 0x80
		e.EventID[12], e.EventID[13], e.EventID[14], e.EventID[15] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		e.FlowID = e.EventID
		e.Type, e.Direction, e.Protocol = flow.TypeStart, flow.Egress, flow.ProtoTCP
		if i%7 == 0 {
			e.Protocol, e.ICMPType = flow.ProtoICMP, 8
		}
		e.Timestamp = flow.Time(1_700_000_000_000_000_000 + int64(i)*1000)
		e.SrcAddr = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		e.DstAddr = netip.MustParseAddr("192.0.2.1")
		if i%5 == 0 {
			e.SrcAddr, e.DstAddr = netip.MustParseAddr("fd00::1"), netip.MustParseAddr("2001:db8::1")
		}
		e.SrcPort, e.DstPort = uint16(1024+i%60000), 443
		e.TxBytes, e.TxPackets = uint64(i)*10, uint64(i%100)
		buf = flow.AppendJSON(buf, &e)
		buf = append(buf, '\n')
	}
	writeFile(t, path, string(buf))
}

// pluginChildren lists the PIDs of processes whose parent is pid and whose command line
// contains "plugin serve".
func pluginChildren(t *testing.T, pid int) []int {
	t.Helper()
	var out []int
	for _, child := range testenv.Children(pid) {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", child))
		if bytes.Contains(cmdline, []byte("plugin\x00serve")) {
			out = append(out, child)
		}
	}
	return out
}

// solePlugin waits for the one plugin process of the flowpipe with pid to start, and
// returns its PID.
func solePlugin(t *testing.T, pid int) int {
	t.Helper()
	var plugin int
	eventually(t, "the sink plugin to start", func() bool {
		if kids := pluginChildren(t, pid); len(kids) == 1 {
			plugin = kids[0]
		}
		return plugin != 0
	})
	return plugin
}

// grownPast waits until the file at path holds more than size bytes.
func grownPast(t *testing.T, path string, size int64, what string) {
	t.Helper()
	eventually(t, what, func() bool {
		st, err := os.Stat(path)
		return err == nil && st.Size() > size
	})
}

// eventually polls cond until it holds; the deadline only stops a broken test from hanging.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPluginsSameOutputInAndOutOfProcess(t *testing.T) {
	dir := t.TempDir()
	writeEvents(t, filepath.Join(dir, "in.jsonl"), 20_000)
	outputs := map[string][]byte{}
	for _, iso := range []string{"inproc", "process"} {
		writeFile(t, filepath.Join(dir, iso+".yaml"), fmt.Sprintf(`
admin: {listen: ""}
sources:
  in:
    type: replay
    isolation: %[1]s
    path: in.jsonl
    batch_size: 777
enrichers:
  - type: community_id
    isolation: %[1]s
sinks:
  out:
    type: file
    isolation: %[1]s
    path: out-%[1]s.jsonl
`, iso))
		_, stderr, code := flowpipe(t, dir, "run", "-c", iso+".yaml", "--log-level", "debug")
		if code != 0 {
			t.Fatalf("%s: exit %d\n%s", iso, code, stderr)
		}
		if started := strings.Count(stderr, "plugin process running"); iso == "process" && started != 3 {
			t.Fatalf("%d plugin processes started, want 3:\n%s", started, stderr)
		} else if iso == "inproc" && started != 0 {
			t.Fatalf("plugin processes started for isolation: inproc:\n%s", stderr)
		}
		data, err := os.ReadFile(filepath.Join(dir, "out-"+iso+".jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		outputs[iso] = data
	}
	if n := bytes.Count(outputs["process"], []byte("\n")); n != 20_000 {
		t.Fatalf("out of process: %d events, want 20000", n)
	}
	if !bytes.Contains(outputs["process"], []byte(`"community_id":"1:`)) {
		t.Fatal("the enricher did not run out of process")
	}
	if !bytes.Equal(outputs["inproc"], outputs["process"]) {
		t.Fatal("output differs between isolation: inproc and isolation: process")
	}
}

// TestPluginPassThroughSameOutput: with a source plugin and a sink plugin and no enricher
// between them (the default isolation), the host passes each batch on in the encoding it
// arrived in, and the output is the same as in process.
func TestPluginPassThroughSameOutput(t *testing.T) {
	dir := t.TempDir()
	writeEvents(t, filepath.Join(dir, "in.jsonl"), 20_000)
	outputs := map[string][]byte{}
	for _, iso := range []string{"inproc", "process"} {
		writeFile(t, filepath.Join(dir, iso+".yaml"), fmt.Sprintf(`
admin: {listen: ""}
sources:
  in: {type: replay, isolation: %[1]s, path: in.jsonl, batch_size: 777}
sinks:
  out: {type: file, isolation: %[1]s, path: out-%[1]s.jsonl}
`, iso))
		_, stderr, code := flowpipe(t, dir, "run", "-c", iso+".yaml", "--log-level", "debug")
		if code != 0 {
			t.Fatalf("%s: exit %d\n%s", iso, code, stderr)
		}
		passed := strings.Contains(stderr, "pass through in the encoding they arrived in")
		if iso == "process" && (!passed || strings.Count(stderr, "data_channel=true") != 2) {
			t.Fatalf("out of process, batches did not pass through the host on the data channel:\n%s", stderr)
		}
		data, err := os.ReadFile(filepath.Join(dir, "out-"+iso+".jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		outputs[iso] = data
	}
	if n := bytes.Count(outputs["process"], []byte("\n")); n != 20_000 {
		t.Fatalf("out of process: %d events, want 20000", n)
	}
	if !bytes.Equal(outputs["inproc"], outputs["process"]) {
		t.Fatal("output differs between isolation: inproc and isolation: process")
	}
}

// TestUndecodedMixedSinksSameOutput: with a source plugin, the host hands its batches on
// undecoded; a sink plugin (pass-through), an in-process sink (decoded for it), and each of
// them behind a disk queue (which stores the encoding as it came) write exactly what the
// same pipeline writes in process.
func TestUndecodedMixedSinksSameOutput(t *testing.T) {
	dir := t.TempDir()
	writeEvents(t, filepath.Join(dir, "in.jsonl"), 20_000)
	writeFile(t, filepath.Join(dir, "inproc.yaml"), `
admin: {listen: ""}
sources:
  in: {type: replay, isolation: inproc, path: in.jsonl, batch_size: 777}
sinks:
  ref: {type: file, isolation: inproc, path: ref.jsonl}
`)
	writeFile(t, filepath.Join(dir, "mixed.yaml"), `
admin: {listen: ""}
data_dir: data
sources:
  in: {type: replay, path: in.jsonl, batch_size: 777}
sinks:
  plugin: {type: file, path: plugin.jsonl}
  inproc: {type: file, isolation: inproc, path: inproc.jsonl}
  plugin_disk: {type: file, path: plugin_disk.jsonl, queue: {type: disk}}
  inproc_disk: {type: file, isolation: inproc, path: inproc_disk.jsonl, queue: {type: disk}}
`)
	for _, cfg := range []string{"inproc.yaml", "mixed.yaml"} {
		_, stderr, code := flowpipe(t, dir, "run", "-c", cfg, "--log-level", "debug")
		if code != 0 {
			t.Fatalf("%s: exit %d\n%s", cfg, code, stderr)
		}
		if cfg == "mixed.yaml" && (!strings.Contains(stderr, "pass through in the encoding they arrived in") || !strings.Contains(stderr, "batches go on undecoded")) {
			t.Fatalf("batches did not go on undecoded and pass through to the sink plugin:\n%s", stderr)
		}
	}
	ref, err := os.ReadFile(filepath.Join(dir, "ref.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(ref, []byte("\n")); n != 20_000 {
		t.Fatalf("in process: %d events, want 20000", n)
	}
	for _, name := range []string{"plugin", "inproc", "plugin_disk", "inproc_disk"} {
		data, err := os.ReadFile(filepath.Join(dir, name+".jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(data, ref) {
			t.Errorf("sink %s: %d events, not what the in-process pipeline wrote", name, bytes.Count(data, []byte("\n")))
		}
	}
}

// TestPluginSinkKilledMidStream kills -9 the file sink's plugin process while 100,000
// events stream through it: after the restart every event is in the output, and every
// duplicate belongs to a batch the host logged as redelivered.
func TestPluginSinkKilledMidStream(t *testing.T) {
	dir := t.TempDir()
	const total = 100_000
	writeEvents(t, filepath.Join(dir, "in.jsonl"), total)
	writeFile(t, filepath.Join(dir, "p.yaml"), `
admin: {listen: ""}
sources:
  in:
    type: replay
    isolation: inproc
    path: in.jsonl
    batch_size: 500
    rate: 25000
sinks:
  out:
    type: file
    path: out.jsonl
    retry: {initial_interval: 50ms, max_interval: 1s}
`)
	cmd := exec.Command(binary, "run", "-c", "p.yaml", "--log-format", "json")
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sinkPID := solePlugin(t, cmd.Process.Pid)
	out := filepath.Join(dir, "out.jsonl")
	grownPast(t, out, 100*total/4, "a quarter of the events to be written")
	if err := syscall.Kill(sinkPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("flowpipe run: %v\n%s", err, stderr.String())
	}
	seen, lines := parsedEventIDs(t, out)
	if len(seen) != total {
		t.Fatalf("%d distinct events in the output, want %d", len(seen), total)
	}
	sizes, restarted := redeliveries(stderr.String())
	redelivered := 0
	for _, n := range sizes {
		redelivered += n
	}
	if !restarted {
		t.Fatalf("no restart logged:\n%s", stderr.String())
	}
	if dups := lines - total; dups > redelivered {
		t.Fatalf("%d duplicate events, but only %d logged as redelivered", dups, redelivered)
	}
	t.Logf("%d duplicates, %d events redelivered", lines-total, redelivered)
}

// An upgrade replaces the flowpipe binary on disk while the old one runs. A built-in plugin
// that dies afterwards is started again from the running binary, the one whose protocol the
// host speaks, not from whatever the path names now, and nothing is lost.
func TestBuiltinPluginRestartsFromTheRunningBinaryAfterAnUpgrade(t *testing.T) {
	dir := t.TempDir()
	// Its own copy of the binary, to replace.
	exe := filepath.Join(dir, "flowpipe")
	data, err := os.ReadFile(binary)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, data, 0o755); err != nil {
		t.Fatal(err)
	}
	const total = 60_000
	writeEvents(t, filepath.Join(dir, "in.jsonl"), total)
	writeFile(t, filepath.Join(dir, "p.yaml"), `
admin: {listen: ""}
sources:
  in: {type: replay, isolation: inproc, path: in.jsonl, batch_size: 500, rate: 20000}
sinks:
  out:
    type: file
    path: out.jsonl
    retry: {initial_interval: 50ms, max_interval: 1s}
`)
	cmd := exec.Command(exe, "run", "-c", "p.yaml", "--log-format", "json")
	cmd.Dir = dir
	var stderr testenv.SyncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = testenv.KillTree(cmd.Process.Pid, 10*time.Second) }()
	sinkPID := solePlugin(t, cmd.Process.Pid)
	out := filepath.Join(dir, "out.jsonl")
	grownPast(t, out, 100*total/6, "a sixth of the events to be written")
	// The upgrade: a new file renamed over the old path (here one that could not serve).
	writeFile(t, exe+".new", "#!/bin/sh\necho 'not the flowpipe that runs' >&2\nexit 3\n")
	if err := os.Chmod(exe+".new", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(exe+".new", exe); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(sinkPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var restarted int
	eventually(t, "the sink plugin to be started again", func() bool {
		for _, pid := range pluginChildren(t, cmd.Process.Pid) {
			if pid != sinkPID {
				restarted = pid
			}
		}
		return restarted != 0
	})
	// It runs the old binary: the file the host was started from, now unlinked.
	if link, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", restarted)); err == nil && link != exe+" (deleted)" {
		t.Errorf("the restarted plugin runs %q, want the replaced %s (deleted)", link, exe)
	}
	waitErr := make(chan error, 1)
	go func() { waitErr <- cmd.Wait() }()
	select {
	case err := <-waitErr:
		if err != nil {
			t.Fatalf("flowpipe run: %v\n%s", err, stderr.String())
		}
	case <-time.After(runBound):
		t.Fatalf("flowpipe run did not finish after the plugin's restart:\n%s", stderr.String())
	}
	if seen, _ := parsedEventIDs(t, out); len(seen) != total {
		t.Fatalf("%d distinct events in the output, want %d\n%s", len(seen), total, stderr.String())
	}
	if _, ok := redeliveries(stderr.String()); !ok {
		t.Errorf("no restart logged:\n%s", stderr.String())
	}
}

// parsedEventIDs counts the event IDs of a JSON-lines output; every line must parse as an
// event (a line torn by a killed writer fails the test).
func parsedEventIDs(t *testing.T, path string) (seen map[string]int, lines int) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	seen = map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e flow.Event
		if err := flow.ParseJSON(sc.Bytes(), &e); err != nil {
			t.Fatalf("%s: line %d: %v", path, lines+1, err)
		}
		seen[e.EventID.String()]++
		lines++
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return seen, lines
}

// redeliveries reads flowpipe's JSON log: the size of each batch written again to a plugin
// that failed before it acknowledged it, and whether a plugin was restarted.
func redeliveries(log string) (sizes []int, restarted bool) {
	for _, l := range strings.Split(log, "\n") {
		var rec struct {
			Msg    string `json:"msg"`
			Events int    `json:"events"`
		}
		if json.Unmarshal([]byte(l), &rec) != nil {
			continue
		}
		if strings.HasPrefix(rec.Msg, "plugin redelivery") {
			sizes = append(sizes, rec.Events)
		}
		restarted = restarted || rec.Msg == "plugin restarted"
	}
	return sizes, restarted
}

func TestNoPluginProcessesRemain(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, "p.yaml"), `
admin: {listen: ""}
sources:
  gen: {type: generate, rate: 1000}
enrichers:
  - type: community_id
sinks:
  out: {type: file, path: out.jsonl}
`)
			cmd := exec.Command(binary, "run", "-c", "p.yaml")
			cmd.Dir = dir
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			var kids []int
			eventually(t, "three plugin processes", func() bool {
				kids = pluginChildren(t, cmd.Process.Pid)
				return len(kids) == 3
			})
			eventually(t, "events in the output", func() bool {
				st, err := os.Stat(filepath.Join(dir, "out.jsonl"))
				return err == nil && st.Size() > 0
			})
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			err := cmd.Wait()
			if sig == syscall.SIGTERM && err != nil {
				t.Fatalf("flowpipe run after SIGTERM: %v\n%s", err, stderr.String())
			}
			for _, pid := range kids {
				eventually(t, fmt.Sprintf("plugin process %d to exit", pid), func() bool { return !testenv.Alive(pid) })
			}
		})
	}
}

func TestValidateShowsPluginErrorsAtTheirLine(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "p.yaml"), `admin: {listen: ""}
sources:
  gen: {type: generate}
sinks:
  out:
    type: file
    path: out.jsonl
    sync: sometimes
  ext:
    plugin: ./plugins/flowpipe-sink-nosuch
`)
	_, stderr, code := flowpipe(t, dir, "validate", "-c", "p.yaml")
	if code == 0 {
		t.Fatal("validate accepted a bad pipeline")
	}
	for _, want := range []string{
		"p.yaml:8: sinks.out.sync: unknown mode \"sometimes\"",
		"p.yaml:10: sinks.ext.plugin: plugin binary",
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("missing %q in:\n%s", want, stderr)
		}
	}
}

func TestPluginsList(t *testing.T) {
	dir := t.TempDir()
	stdout, stderr, code := flowpipe(t, dir, "plugins", "list")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"sink      file", "built-in", "source    generate"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("missing %q in:\n%s", want, stdout)
		}
	}
}

// TestPluginGuide follows docs/plugins.md as a new plugin author would: build the example
// webhook sink, pin it with sha256sum, configure it with the guide's pipeline.yaml, check
// it, list it and run it against an HTTP endpoint.
func TestPluginGuide(t *testing.T) {
	dir := t.TempDir()
	// 2. Build it.
	bin := buildWebhookPlugin(t, dir)
	if out, _ := exec.Command(bin).CombinedOutput(); !strings.Contains(string(out), `This is a flowpipe sink plugin (type "webhook"`) {
		t.Fatalf("run by hand, the plugin said %q", out)
	}
	// 3. Pin it.
	out, err := exec.Command("sha256sum", bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	sum := strings.Fields(string(out))[0]

	// 4. Configure it, with the guide's own pipeline.yaml.
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "plugins.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(doc), "<!-- guide:pipeline")
	if !ok {
		t.Fatal("docs/plugins.md has no guide:pipeline block")
	}
	_, rest, _ = strings.Cut(rest, "```yaml\n")
	pipeline, _, _ := strings.Cut(rest, "```")

	var mu sync.Mutex
	ids := map[string]int{}
	auth := ""
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sc := bufio.NewScanner(r.Body)
		mu.Lock()
		defer mu.Unlock()
		auth = r.Header.Get("Authorization")
		for sc.Scan() {
			var e flow.Event
			if err := flow.ParseJSON(sc.Bytes(), &e); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			ids[e.EventID.String()]++
		}
	}))
	defer srv.Close()
	pipeline = regexp.MustCompile(`sha256: "<[^"]*>"`).ReplaceAllString(pipeline, `sha256: "`+sum+`"`)
	pipeline = strings.Replace(pipeline, "http://127.0.0.1:8080/flows", srv.URL+"/flows", 1)
	pipeline = strings.Replace(pipeline, "listen: 127.0.0.1:9560", `listen: ""`, 1)
	// Environment overrides make the demo source finite without moving any line.
	t.Setenv("FLOWPIPE_SOURCES__DEMO__RATE", "0")
	t.Setenv("FLOWPIPE_SOURCES__DEMO__COUNT", "5000")
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), pipeline)

	if _, stderr, code := flowpipe(t, dir, "validate", "-c", "pipeline.yaml"); code != 0 {
		t.Fatalf("validate: exit %d\n%s", code, stderr)
	}
	stdout, stderr, code := flowpipe(t, dir, "plugins", "list", "-c", "pipeline.yaml")
	if code != 0 || !regexp.MustCompile(`sink\s+webhook\s+\S+flowpipe-sink-webhook\s+0\.1\.0\s+`+sum).MatchString(stdout) {
		t.Fatalf("plugins list (exit %d) does not show the webhook plugin with its hash:\n%s%s", code, stdout, stderr)
	}
	_, stderr, code = flowpipe(t, dir, "run", "-c", "pipeline.yaml")
	if code != 0 || !strings.Contains(stderr, "every accepted batch was delivered") {
		t.Fatalf("run: exit %d\n%s", code, stderr)
	}
	mu.Lock()
	if len(ids) < 5000 || auth != "Bearer change-me" {
		t.Fatalf("endpoint got %d distinct events with Authorization %q", len(ids), auth)
	}
	for id, n := range ids {
		if n != 1 {
			t.Fatalf("event %s posted %d times without a failure", id, n)
		}
	}
	mu.Unlock()

	// A binary that no longer matches its pin is refused, and a bad option is shown at its
	// line, as the guide says.
	bad := strings.Replace(pipeline, sum, strings.Repeat("ab", 32), 1)
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), bad)
	if _, stderr, code := flowpipe(t, dir, "validate", "-c", "pipeline.yaml"); code == 0 || !strings.Contains(stderr, "refusing to start it") {
		t.Fatalf("validate with a wrong pin: exit %d\n%s", code, stderr)
	}
	bad = strings.Replace(pipeline, "url: "+srv.URL+"/flows", "url: localhost", 1)
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), bad)
	if _, stderr, code := flowpipe(t, dir, "validate", "-c", "pipeline.yaml"); code == 0 || !strings.Contains(stderr, `pipeline.yaml:11: sinks.hook.url: want an http:// or https:// URL, got "localhost"`) {
		t.Fatalf("validate with a bad url: exit %d\n%s", code, stderr)
	}
}

// A file sink on standard output writes to flowpipe's standard output also when it runs as
// a plugin process (whose own stdout go-plugin uses).
func TestPluginSinkOnStdout(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "p.yaml"), `
admin: {listen: ""}
sources:
  gen: {type: generate, count: 1000, rate: 0, flows: 1}
sinks:
  out: {type: file, path: "-", isolation: process}
`)
	stdout, stderr, code := flowpipe(t, dir, "run", "-c", "p.yaml")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr)
	}
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if len(lines) != 1000 {
		t.Fatalf("%d lines on stdout, want 1000\nstderr:\n%s", len(lines), stderr)
	}
	var e flow.Event
	if err := flow.ParseJSON([]byte(lines[999]), &e); err != nil {
		t.Fatal(err)
	}
}

// The same broken options give the same problems at the same lines whether the component is
// built in process or in its plugin process: both go through component.Factory.Build.
func TestOptionProblemsSameInAndOutOfProcess(t *testing.T) {
	dir := t.TempDir()
	got := map[string]string{}
	for _, iso := range []string{"inproc", "process"} {
		writeFile(t, filepath.Join(dir, iso+".yaml"), fmt.Sprintf(`admin: {listen: ""}
sources:
  gen: {type: generate, count: 10}
sinks:
  undecodable:
    type: file
    isolation: %[1]s
    path: a.jsonl
    max_files: many
    colour: red
  invalid:
    type: file
    isolation: %[1]s
    path: b.jsonl
    max_age: -5s
    sync: sometimes
`, iso))
		_, stderr, code := flowpipe(t, dir, "validate", "-c", iso+".yaml")
		if code == 0 {
			t.Fatalf("%s: validate accepted broken options", iso)
		}
		got[iso] = strings.ReplaceAll(stderr, iso+".yaml", "pipeline.yaml")
	}
	for _, want := range []string{
		"pipeline.yaml:9: sinks.undecodable.max_files: want an integer",
		"pipeline.yaml:10: sinks.undecodable.colour: unknown key",
		"pipeline.yaml:15: sinks.invalid.max_age: must not be negative",
		"pipeline.yaml:16: sinks.invalid.sync: unknown mode \"sometimes\"",
		"4 problem(s) found",
	} {
		if !strings.Contains(got["inproc"], want) {
			t.Errorf("in process: missing %q in:\n%s", want, got["inproc"])
		}
	}
	if got["inproc"] != got["process"] {
		t.Fatalf("problems differ:\nin process:\n%s\nout of process:\n%s", got["inproc"], got["process"])
	}
}

// TestPluginEnrichersSameOutput runs the built-in enrichers that can run out of process
// (community_id; resources with rule IDs, resource IDs, and the exit-node and DNS filters
// that drop some events) in process, out of process (their answers come as changes to the
// batch the host holds), and out of process with FLOWPIPE_PLUGIN_ENRICH_CHANGES=off (whole
// batches): the output is the same. aggregate keeps events across batches
// (component.Holder) and runs only in process.
func TestPluginEnrichersSameOutput(t *testing.T) {
	dir := t.TempDir()
	const total = 20_000
	writeEvents(t, filepath.Join(dir, "all.jsonl"), total)
	// Every 11th event a DNS query (UDP to port 53), which dns_collection: false drops.
	var in []byte
	data, err := os.ReadFile(filepath.Join(dir, "all.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	kept := 0
	for i, line := range bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n")) {
		var e flow.Event
		if err := flow.ParseJSON(line, &e); err != nil {
			t.Fatal(err)
		}
		if i%11 == 0 {
			e.Protocol, e.ICMPType, e.DstPort = flow.ProtoUDP, 0, 53
		}
		if i%5 != 0 && i%11 != 0 { // neither an exit-node flow (IPv6 to 2001:db8::1) nor DNS
			kept++
		}
		in = append(flow.AppendJSON(in, &e), '\n')
	}
	writeFile(t, filepath.Join(dir, "in.jsonl"), string(in))
	outputs := map[string][]byte{}
	for _, run := range []string{"inproc", "process", "process-whole"} {
		iso := strings.TrimSuffix(run, "-whole")
		if run == "process-whole" {
			t.Setenv("FLOWPIPE_PLUGIN_ENRICH_CHANGES", "off")
		}
		writeFile(t, filepath.Join(dir, run+".yaml"), fmt.Sprintf(`
admin: {listen: ""}
sources:
  in: {type: replay, isolation: inproc, path: in.jsonl, batch_size: 777}
enrichers:
  - {type: community_id, isolation: %[1]s}
  - type: resources
    isolation: %[1]s
    overlay: [100.64.0.0/10]
    resources:
      - {id: lan, prefixes: [10.0.0.0/8]}
      - {id: docs, prefixes: [192.0.2.0/24]}
    routes:
      - {prefix: "2001:db8::/32", exit_node: true}
    rules:
      - {id: r-ping, protocols: [icmp]}
      - {id: r-web, protocols: [tcp], ports: [443]}
    exit_node_collection: false
    dns_collection: false
sinks:
  out: {type: file, isolation: inproc, path: out-%[2]s.jsonl}
`, iso, run))
		_, stderr, code := flowpipe(t, dir, "run", "-c", run+".yaml", "--log-level", "debug")
		if code != 0 {
			t.Fatalf("%s: exit %d\n%s", run, code, stderr)
		}
		changes := strings.Count(stderr, "answers come as the changes to the batch the host holds")
		if want := map[string]int{"inproc": 0, "process": 2, "process-whole": 0}[run]; changes != want {
			t.Fatalf("%s: %d enrichers answered with changes, want %d:\n%s", run, changes, want, stderr)
		}
		if iso == "process" && strings.Count(stderr, "data_channel=true") != 2 {
			t.Fatalf("%s: the enrichers do not run out of process on the data channel:\n%s", run, stderr)
		}
		data, err := os.ReadFile(filepath.Join(dir, "out-"+run+".jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		outputs[run] = data
	}
	if n := bytes.Count(outputs["inproc"], []byte("\n")); n != kept {
		t.Fatalf("in process: %d events, want the %d that are neither exit-node nor DNS flows", n, kept)
	}
	for _, want := range []string{`"community_id":"1:`, `"rule_id":"r-web"`, `"rule_id":"r-ping"`, `"src_resource_id":"lan"`, `"dst_resource_id":"docs"`} {
		if !bytes.Contains(outputs["inproc"], []byte(want)) {
			t.Fatalf("in process: no event has %s", want)
		}
	}
	for _, run := range []string{"process", "process-whole"} {
		if !bytes.Equal(outputs["inproc"], outputs[run]) {
			t.Fatalf("output differs between in process and %s", run)
		}
	}
}
