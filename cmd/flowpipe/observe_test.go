package main

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// These tests run `flowpipe run` with the default isolation (every component a plugin
// process) and observe it with `flowpipe tap`, `flowpipe top`, plain HTTP and a browser.
// The source replays a named pipe, so the test decides when events flow and the pipeline
// keeps running after they have; it emits only full batches until the pipe closes, so
// every test feeds a multiple of its batch_size.

// recording writes n varied events (types, protocols, directions, addresses in two
// prefixes and IPv6, ports, rules, resources) and returns them.
func recording(t *testing.T, path string, n int) []flow.Event {
	t.Helper()
	var buf []byte
	events := make([]flow.Event, n)
	for i := range n {
		e := &events[i]
		e.EventID[6], e.EventID[8] = 0x40, 0x80
		e.EventID[12], e.EventID[13], e.EventID[14], e.EventID[15] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		e.FlowID = e.EventID
		e.FlowID[0] = 1
		e.Type = []flow.Type{flow.TypeStart, flow.TypeEnd, flow.TypeEnd, flow.TypeDrop}[i%4]
		e.Direction = []flow.Direction{flow.Egress, flow.Ingress}[i%3%2]
		e.Protocol = []uint8{flow.ProtoTCP, flow.ProtoUDP, flow.ProtoTCP, flow.ProtoICMP, flow.ProtoTCP}[i%5]
		if e.Protocol == flow.ProtoICMP {
			e.ICMPType = 8
		}
		e.Timestamp = flow.Time(1_700_000_000_000_000_000 + int64(i)*1_000_000)
		switch i % 6 {
		case 0, 1, 2:
			e.SrcAddr = netip.AddrFrom4([4]byte{10, 1, byte(i % 7), byte(i % 11)})
		case 3, 4:
			e.SrcAddr = netip.AddrFrom4([4]byte{192, 168, 0, byte(i % 5)})
		default:
			e.SrcAddr = netip.MustParseAddr("fd00::" + strconv.Itoa(i%3+1))
		}
		if e.SrcAddr.Is4() {
			e.DstAddr = netip.AddrFrom4([4]byte{198, 51, 100, byte(i % 4)})
		} else {
			e.DstAddr = netip.MustParseAddr("2001:db8::53")
		}
		if e.Protocol != flow.ProtoICMP {
			e.SrcPort = uint16(30000 + i%1000)
			e.DstPort = []uint16{443, 53, 22, 80}[i%4]
		}
		e.TxBytes, e.TxPackets = uint64(100+i%997), uint64(1+i%13)
		e.RxBytes, e.RxPackets = uint64(40+i%331), uint64(i%7)
		e.RuleID = []string{"", "allow-web", "allow-dns", "deny-ssh"}[i%4]
		if i%9 == 0 {
			e.SrcResourceID, e.DstResourceID = "res-a", "res-db"
		}
		e.Source = "in"
		buf = flow.AppendJSON(buf, e)
		buf = append(buf, '\n')
	}
	writeFile(t, path, string(buf))
	return events
}

// running is a `flowpipe run` under test.
type running struct {
	cmd    *exec.Cmd
	stderr *testenv.SyncBuffer
	admin  string
	fifo   *os.File // the replay source's input; nil when the source reads a file
}

// startRun starts flowpipe run -c p.yaml in dir (with more arguments, if given), waits for
// its admin listener and, when the pipeline reads in.fifo, opens the pipe for writing.
func startRun(t *testing.T, dir, yaml string, args ...string) *running {
	t.Helper()
	writeFile(t, filepath.Join(dir, "p.yaml"), yaml)
	r := &running{stderr: &testenv.SyncBuffer{}}
	usesFIFO := strings.Contains(yaml, "in.fifo")
	if usesFIFO {
		if err := syscall.Mkfifo(filepath.Join(dir, "in.fifo"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r.cmd = exec.Command(binary, append([]string{"run", "-c", "p.yaml", "--log-format", "json"}, args...)...)
	r.cmd.Dir = dir
	r.cmd.Stderr = r.stderr
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if r.fifo != nil {
			r.fifo.Close()
		}
		r.cmd.Process.Kill()
		r.cmd.Wait()
		if t.Failed() {
			t.Logf("flowpipe run's log:\n%s", r.stderr.String())
		}
	})
	eventually(t, "the admin listener", func() bool {
		for _, l := range strings.Split(r.stderr.String(), "\n") {
			var rec struct {
				Msg     string `json:"msg"`
				Address string `json:"address"`
			}
			if json.Unmarshal([]byte(l), &rec) == nil && rec.Msg == "admin listener" {
				r.admin = rec.Address
				return true
			}
		}
		return r.cmd.ProcessState != nil
	})
	if usesFIFO {
		// Opening blocks until the replay plugin opens its end.
		f, err := os.OpenFile(filepath.Join(dir, "in.fifo"), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		r.fifo = f
	}
	return r
}

func (r *running) feed(t *testing.T, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.fifo.Write(data); err != nil {
		t.Fatal(err)
	}
}

// stop closes the source's input, so the pipeline drains and exits.
func (r *running) stop(t *testing.T) {
	t.Helper()
	r.fifo.Close()
	r.fifo = nil
	if err := r.cmd.Wait(); err != nil {
		t.Fatalf("flowpipe run: %v\n%s", err, r.stderr.String())
	}
}

func lineCount(path string) int {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return bytes.Count(data, []byte{'\n'})
}

// tapProc is a `flowpipe tap` in the background, its stdout in a file.
type tapProc struct {
	cmd    *exec.Cmd
	out    string
	stderr *testenv.SyncBuffer
}

func startTap(t *testing.T, dir, name string, args ...string) *tapProc {
	t.Helper()
	p := &tapProc{out: filepath.Join(dir, name+".out"), stderr: &testenv.SyncBuffer{}}
	f, err := os.Create(p.out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p.cmd = exec.Command(binary, append([]string{"tap"}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = f, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.cmd.Process.Kill(); p.cmd.Wait() })
	eventually(t, name+" to follow", func() bool { return strings.Contains(p.stderr.String(), "following live events") })
	return p
}

func (p *tapProc) events(t *testing.T) []flow.Event {
	t.Helper()
	return componenttest.ReadJSONLines(t, p.out)
}

func ids(es []flow.Event) []string {
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = e.EventID.String()
	}
	return out
}

func selectEvents(es []flow.Event, keep func(*flow.Event) bool) []flow.Event {
	var out []flow.Event
	for i := range es {
		if keep(&es[i]) {
			out = append(out, es[i])
		}
	}
	return out
}

func inPrefix(p string, a netip.Addr) bool { return netip.MustParsePrefix(p).Contains(a) }

// TestTapFiltersAndRing runs with the default isolation (every component a plugin process)
// and again in process: the tap is the same.
func TestTapFiltersAndRing(t *testing.T) {
	for _, iso := range []string{"", "inproc"} {
		name := iso
		if name == "" {
			name = "default"
		}
		t.Run(name, func(t *testing.T) { testTapFiltersAndRing(t, iso) })
	}
}

func testTapFiltersAndRing(t *testing.T, isolation string) {
	dir := t.TempDir()
	const n, ring = 3000, 1000
	rec := recording(t, filepath.Join(dir, "rec.jsonl"), n)
	iso := ""
	if isolation != "" {
		iso = ", isolation: " + isolation
	}
	r := startRun(t, dir, fmt.Sprintf(`
admin: {listen: "127.0.0.1:0", tap_ring: %d}
data_dir: data
sources:
  in: {type: replay, path: in.fifo, batch_size: 100%[2]s}
enrichers:
  - {type: community_id, name: cid%[2]s}
sinks:
  out: {type: file, path: out.jsonl%[2]s}
`, ring, iso))
	if isolation == "" && len(pluginChildren(t, r.cmd.Process.Pid)) != 3 {
		t.Fatalf("want three plugin processes with the default isolation")
	}
	if isolation == "inproc" && len(pluginChildren(t, r.cmd.Process.Pid)) != 0 {
		t.Fatalf("want no plugin process with isolation: inproc")
	}
	admin := "--admin=" + r.admin
	cases := []struct {
		name string
		args []string
		keep func(*flow.Event) bool
	}{
		{"all", nil, func(*flow.Event) bool { return true }},
		{"src-cidr", []string{"--src", "10.0.0.0/8"}, func(e *flow.Event) bool { return inPrefix("10.0.0.0/8", e.SrcAddr) }},
		{"ip-v6", []string{"--ip", "2001:db8::53"}, func(e *flow.Event) bool {
			return e.SrcAddr == netip.MustParseAddr("2001:db8::53") || e.DstAddr == netip.MustParseAddr("2001:db8::53")
		}},
		{"dst-and-port", []string{"--dst", "198.51.100.1/32", "--dst-port", "53"}, func(e *flow.Event) bool {
			return e.DstAddr == netip.MustParseAddr("198.51.100.1") && e.Protocol != flow.ProtoICMP && e.DstPort == 53
		}},
		{"port-either", []string{"--port", "22,30001"}, func(e *flow.Event) bool {
			return e.Protocol != flow.ProtoICMP && (e.SrcPort == 22 || e.DstPort == 22 || e.SrcPort == 30001 || e.DstPort == 30001)
		}},
		{"src-port", []string{"--src-port", "30007"}, func(e *flow.Event) bool { return e.Protocol != flow.ProtoICMP && e.SrcPort == 30007 }},
		{"proto-type-dir", []string{"--proto", "udp", "--type", "end", "--direction", "ingress"}, func(e *flow.Event) bool {
			return e.Protocol == flow.ProtoUDP && e.Type == flow.TypeEnd && e.Direction == flow.Ingress
		}},
		{"not", []string{"--not", "--proto", "tcp", "--type", "drop"}, func(e *flow.Event) bool { return e.Protocol != flow.ProtoTCP && e.Type == flow.TypeDrop }},
		{"rule-resource", []string{"--rule", "allow-web", "--resource", "res-db"}, func(e *flow.Event) bool { return e.RuleID == "allow-web" && e.DstResourceID == "res-db" }},
		{"or-groups", []string{"--filter", "src=192.168.0.0/16 proto=icmp", "--filter", "rule=deny-ssh !direction=egress"}, func(e *flow.Event) bool {
			return (inPrefix("192.168.0.0/16", e.SrcAddr) && e.Protocol == flow.ProtoICMP) || (e.RuleID == "deny-ssh" && e.Direction != flow.Egress)
		}},
	}
	taps := make([]*tapProc, len(cases))
	for i, c := range cases {
		taps[i] = startTap(t, dir, c.name, append([]string{admin, "-o", "json"}, c.args...)...)
	}
	atSource := startTap(t, dir, "at-source", admin, "-o", "json", "--at", "in", "--type", "drop")
	atEnricher := startTap(t, dir, "at-enricher", admin, "-o", "json", "--at", "cid", "--type", "drop")

	r.feed(t, filepath.Join(dir, "rec.jsonl"))
	eventually(t, "the sink to write every event", func() bool { return lineCount(filepath.Join(dir, "out.jsonl")) == n })
	for i, c := range cases {
		want := selectEvents(rec, c.keep)
		if len(want) == 0 {
			t.Fatalf("%s: the recording has no matching event; the case tests nothing", c.name)
		}
		eventually(t, c.name+" to receive its events", func() bool { return lineCount(taps[i].out) >= len(want) })
	}

	// --last returns the ring: the newest events, at most tap_ring of them, oldest first.
	out, stderr, code := flowpipe(t, dir, "tap", admin, "--last", "5000", "-o", "json")
	if code != 0 {
		t.Fatalf("tap --last: %d %s", code, stderr)
	}
	last := parseLines(t, out)
	if !slices.Equal(ids(last), ids(rec[n-ring:])) {
		t.Fatalf("tap --last 5000 returned %d events, want the last %d of the recording in order", len(last), ring)
	}
	out, _, _ = flowpipe(t, dir, "tap", admin, "--last", "7", "--proto", "udp", "-o", "json")
	udp := selectEvents(rec[n-ring:], func(e *flow.Event) bool { return e.Protocol == flow.ProtoUDP })
	if got := parseLines(t, out); !slices.Equal(ids(got), ids(udp[len(udp)-7:])) {
		t.Fatalf("tap --last 7 --proto udp: %v, want %v", ids(got), ids(udp[len(udp)-7:]))
	}
	// --since reads the ring by when the tap point saw the events.
	out, _, _ = flowpipe(t, dir, "tap", admin, "--since", "1h", "-o", "json")
	if got := parseLines(t, out); !slices.Equal(ids(got), ids(rec[n-ring:])) {
		t.Fatalf("tap --since 1h returned %d events, want the ring's %d", len(got), ring)
	}
	out, _, _ = flowpipe(t, dir, "tap", admin, "--since", time.Now().Add(time.Hour).UTC().Format(time.RFC3339), "-o", "json")
	if out != "" {
		t.Fatalf("tap --since an hour ahead printed events:\n%.300s", out)
	}
	// Compact and table output carry the fields a reader looks for.
	out, _, _ = flowpipe(t, dir, "tap", admin, "--last", "1")
	if e := rec[n-1]; !strings.Contains(out, e.SrcAddr.String()) || !strings.Contains(out, e.Type.String()) {
		t.Errorf("compact line lacks the source or type of %+v:\n%s", e, out)
	}
	out, _, _ = flowpipe(t, dir, "tap", admin, "--last", "2", "-o", "table")
	if !strings.HasPrefix(out, "TIME") || strings.Count(out, "\n") != 3 {
		t.Errorf("table output:\n%s", out)
	}

	r.stop(t)
	for i, c := range cases {
		taps[i].cmd.Wait()
		got := taps[i].events(t)
		if want := selectEvents(rec, c.keep); !slices.Equal(ids(got), ids(want)) {
			t.Errorf("%s: tap printed %d events, want exactly the %d matching ones in order", c.name, len(got), len(want))
		}
	}
	atSource.cmd.Wait()
	atEnricher.cmd.Wait()
	// After the source, events have no community ID yet; after the enricher, they do.
	src, enr := atSource.events(t), atEnricher.events(t)
	if len(src) != n/4 || len(enr) != n/4 {
		t.Fatalf("at the source %d drops, at the enricher %d, want %d", len(src), len(enr), n/4)
	}
	if src[0].CommunityID != "" || enr[0].CommunityID == "" {
		t.Errorf("community IDs: at the source %q, after the enricher %q", src[0].CommunityID, enr[0].CommunityID)
	}
}

func parseLines(t *testing.T, s string) []flow.Event {
	t.Helper()
	var out []flow.Event
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		if l == "" {
			continue
		}
		var e flow.Event
		if err := flow.ParseJSON([]byte(l), &e); err != nil {
			t.Fatalf("%v: %s", err, l)
		}
		out = append(out, e)
	}
	return out
}

// TestTapSlowSubscriber: a subscriber that does not read does not change what the pipeline
// writes, and when it reads at last it is told exactly how many events it missed.
func TestTapSlowSubscriber(t *testing.T) {
	dir := t.TempDir()
	const n = 40_000
	writeEvents(t, filepath.Join(dir, "rec.jsonl"), n)
	r := startRun(t, dir, `
admin: {listen: "127.0.0.1:0"}
data_dir: data
sources:
  in: {type: replay, path: in.fifo, batch_size: 500}
sinks:
  out: {type: file, path: out.jsonl}
`)
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	conn, err := d.Dial("tcp", r.admin)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /api/tap?follow=1 HTTP/1.1\r\nHost: flowpipe\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReaderSize(conn, 4096), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("tap: %v %v", resp, err)
	}
	br := bufio.NewReaderSize(resp.Body, 4096)
	// Read only up to "following": the subscription exists; then stop reading.
	for {
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(l, `"following":true`) {
			break
		}
	}
	r.feed(t, filepath.Join(dir, "rec.jsonl"))
	eventually(t, "the sink to write every event", func() bool { return lineCount(filepath.Join(dir, "out.jsonl")) == n })
	// The output is the recording, unchanged (as in TestRunGenerateToFileThenReplayRoundTrip).
	in := componenttest.ReadJSONLines(t, filepath.Join(dir, "rec.jsonl"))
	for i := range in {
		in[i].Source = "in" // the pipeline names the source of events that have none
	}
	if got := componenttest.ReadJSONLines(t, filepath.Join(dir, "out.jsonl")); !slices.Equal(got, in) {
		t.Fatalf("with a stuck tap, the output differs from the input (%d vs %d events)", len(got), len(in))
	}
	// Now read: events received plus events reported skipped are every event.
	conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	var events, skipped int
	for events+skipped < n {
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("after %d events and %d skipped: %v", events, skipped, err)
		}
		switch {
		case strings.Contains(l, `"event_id"`):
			events++
		case strings.Contains(l, `"skipped"`):
			var m struct {
				Tap struct{ Skipped int } `json:"tap"`
			}
			if err := json.Unmarshal([]byte(l[strings.Index(l, "{"):]), &m); err != nil {
				t.Fatalf("%v: %q", err, l)
			}
			skipped += m.Tap.Skipped
		}
	}
	if skipped == 0 || events+skipped != n {
		t.Fatalf("%d events + %d skipped, want %d with some skipped", events, skipped, n)
	}
	t.Logf("stuck subscriber: %d events delivered, %d skipped and reported", events, skipped)
	r.stop(t)
}

// TestTapSurvivesPluginKill: kill -9 the sink's plugin process while tapping it; the plugin
// is restarted and the tap goes on, seeing every event once.
func TestTapSurvivesPluginKill(t *testing.T) {
	dir := t.TempDir()
	const n = 4000
	writeEvents(t, filepath.Join(dir, "rec.jsonl"), n)
	data, _ := os.ReadFile(filepath.Join(dir, "rec.jsonl"))
	// The replay source emits full batches until its input ends: split at a batch boundary.
	half := 0
	for range n / 2 {
		half += bytes.IndexByte(data[half:], '\n') + 1
	}
	writeFile(t, filepath.Join(dir, "a.jsonl"), string(data[:half]))
	writeFile(t, filepath.Join(dir, "b.jsonl"), string(data[half:]))
	first := bytes.Count(data[:half], []byte{'\n'})
	r := startRun(t, dir, `
admin: {listen: "127.0.0.1:0"}
data_dir: data
sources:
  in: {type: replay, path: in.fifo, batch_size: 50}
sinks:
  out:
    type: file
    path: out.jsonl
    retry: {initial_interval: 50ms, max_interval: 500ms}
`)
	tp := startTap(t, dir, "tap", "--admin="+r.admin, "--at", "out", "-o", "json")
	r.feed(t, filepath.Join(dir, "a.jsonl"))
	eventually(t, "the tap to see the first half", func() bool { return lineCount(tp.out) == first })
	var sinkPID int
	for _, pid := range pluginChildren(t, r.cmd.Process.Pid) {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if bytes.Contains(cmdline, []byte("serve\x00sink")) {
			sinkPID = pid
		}
	}
	if sinkPID == 0 {
		t.Fatal("no sink plugin process")
	}
	if err := syscall.Kill(sinkPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r.feed(t, filepath.Join(dir, "b.jsonl"))
	eventually(t, "the tap to see the second half", func() bool { return lineCount(tp.out) == n })
	eventually(t, "the sink plugin to be restarted", func() bool { return strings.Contains(r.stderr.String(), "plugin restarted") })
	eventually(t, "every event in the sink's file", func() bool {
		seen := map[string]bool{}
		for _, e := range componenttest.ReadJSONLines(t, filepath.Join(dir, "out.jsonl")) {
			seen[e.EventID.String()] = true
		}
		return len(seen) == n
	})
	r.stop(t)
	tp.cmd.Wait()
	got := tp.events(t)
	seen := map[string]bool{}
	for _, e := range got {
		seen[e.EventID.String()] = true
	}
	if len(got) != n || len(seen) != n {
		t.Fatalf("tap saw %d events (%d distinct) across the restart, want %d", len(got), len(seen), n)
	}
	if !strings.Contains(tp.stderr.String(), "following") || tp.cmd.ProcessState.ExitCode() != 0 {
		t.Errorf("tap exit %d: %s", tp.cmd.ProcessState.ExitCode(), tp.stderr.String())
	}
}

// TestTopOnceEqualsAnIndependentSum: top --once over a replayed recording prints the totals
// and groups that a Python script computes from the same file.
func TestTopOnceEqualsAnIndependentSum(t *testing.T) {
	_, err := exec.LookPath("python3")
	testenv.Require(t, err == nil, "python3 in PATH")
	dir := t.TempDir()
	const n = 5000
	recording(t, filepath.Join(dir, "rec.jsonl"), n)
	r := startRun(t, dir, `
admin: {listen: "127.0.0.1:0", tap_ring: 10000}
data_dir: data
sources:
  in: {type: replay, path: in.fifo, batch_size: 250}
sinks:
  out: {type: file, path: out.jsonl}
`)
	r.feed(t, filepath.Join(dir, "rec.jsonl"))
	eventually(t, "the sink to write every event", func() bool { return lineCount(filepath.Join(dir, "out.jsonl")) == n })
	script := `
import json, sys, collections
by = sys.argv[2].split(",")
tot = [0, 0, 0]
groups = collections.defaultdict(lambda: [0, 0, 0])
for line in open(sys.argv[1]):
    e = json.loads(line)
    if sys.argv[3] == "udp" and e["protocol"] != 17:
        continue
    key = []
    for k in by:
        if k == "src": key.append(e["src_ip"])
        elif k == "dst": key.append(e["dst_ip"])
        elif k == "dport": key.append(str(e["dst_port"]) if "dst_port" in e else "-")
        elif k == "rule": key.append(e["rule_id"] or "-")
    b, p = e["rx_bytes"] + e["tx_bytes"], e["rx_packets"] + e["tx_packets"]
    for acc in (tot, groups[tuple(key)]):
        acc[0] += 1; acc[1] += b; acc[2] += p
print("total", *tot, len(groups))
for k, v in sorted(groups.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0]))[:5]:
    print(*k, v[1], v[0], v[2])
`
	writeFile(t, filepath.Join(dir, "sum.py"), script)
	for _, c := range []struct{ by, proto string }{{"src,dst,dport", ""}, {"rule", ""}, {"src,dst,dport", "udp"}} {
		py, err := exec.Command("python3", filepath.Join(dir, "sum.py"), filepath.Join(dir, "rec.jsonl"), c.by, c.proto).Output()
		if err != nil {
			t.Fatal(err)
		}
		args := []string{"top", "--admin=" + r.admin, "--once", "--window", "1h", "--by", c.by, "-n", "5"}
		if c.proto != "" {
			args = append(args, "--proto", c.proto)
		}
		out, stderr, code := flowpipe(t, dir, args...)
		if code != 0 {
			t.Fatalf("top: %d %s", code, stderr)
		}
		if got, want := topSummary(t, out), strings.TrimSpace(string(py)); got != want {
			t.Errorf("top --once --by %s %s:\n%s\nwant (python):\n%s\nfull output:\n%s", c.by, c.proto, got, want, out)
		}
	}
	r.stop(t)
}

// topSummary turns top's text into the Python script's form: the total line, then the
// by-bytes rows as "key... bytes flows packets".
func topSummary(t *testing.T, out string) string {
	t.Helper()
	nocomma := func(s string) string { return strings.ReplaceAll(s, ",", "") }
	var lines []string
	var section string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		switch {
		case strings.HasPrefix(l, "total:"):
			// total: F flows, B bytes, P packets in G groups
			lines = append(lines, fmt.Sprintf("total %s %s %s %s", nocomma(f[1]), nocomma(f[3]), nocomma(f[5]), nocomma(f[8])))
		case strings.HasPrefix(l, "TOP BY"):
			section = l
		case section == "TOP BY BYTES" && len(f) > 3 && f[len(f)-1] != "PACKETS":
			k := len(f) - 3
			lines = append(lines, strings.Join(f[:k], " ")+" "+nocomma(f[k])+" "+nocomma(f[k+1])+" "+nocomma(f[k+2]))
		}
	}
	return strings.Join(lines, "\n")
}

func TestAdminAuth(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "token"), "s3cret-token\n")
	r := startRun(t, dir, `
admin: {listen: "127.0.0.1:0", token_file: token}
data_dir: data
sources:
  gen: {type: generate, rate: 200}
sinks:
  out: {type: file, path: out.jsonl}
`)
	base := "http://" + r.admin
	for _, path := range []string{"/api/components", "/api/pipeline", "/metrics", "/readyz", "/api/tap?last=1"} {
		for _, c := range []struct {
			auth string
			want int
		}{{"", 401}, {"Bearer wrong", 401}, {"s3cret-token", 401}, {"Bearer s3cret-token", 200}} {
			req, _ := http.NewRequest("GET", base+path, nil)
			if c.auth != "" {
				req.Header.Set("Authorization", c.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != c.want && !(path == "/readyz" && c.want == 200 && resp.StatusCode == 503) {
				t.Errorf("%s with %q: %d, want %d", path, c.auth, resp.StatusCode, c.want)
			}
		}
	}
	// The page itself holds no data and loads without the token; its API calls need it.
	if resp, err := http.Get(base + "/"); err != nil || resp.StatusCode != 200 {
		t.Errorf("GET /: %v %v", resp, err)
	}
	_, stderr, code := flowpipe(t, dir, "tap", "--admin="+r.admin, "--last", "1")
	if code != 1 || !strings.Contains(stderr, "wants its token") {
		t.Errorf("tap without a token: %d %s", code, stderr)
	}
	eventually(t, "tap with the token to print an event", func() bool {
		out, stderr, code := flowpipe(t, dir, "tap", "--admin="+r.admin, "--token-file", filepath.Join(dir, "token"), "--last", "1", "-o", "json")
		if code != 0 {
			t.Fatalf("tap with the token: %d %s", code, stderr)
		}
		return strings.Count(out, "\n") == 1
	})
}

func TestAdminListenValidation(t *testing.T) {
	dir := t.TempDir()
	write := func(admin string) {
		writeFile(t, filepath.Join(dir, "pipeline.yaml"), "admin:\n"+admin+`
data_dir: data
sources:
  gen: {type: generate, count: 2}
sinks:
  out: {type: file, path: out.jsonl}
`)
	}
	write("  listen: 0.0.0.0:9560")
	_, stderr, code := flowpipe(t, dir, "validate")
	if code != 1 || !strings.Contains(stderr, "pipeline.yaml:2: admin.listen: 0.0.0.0:9560 is reachable from other hosts: set admin.token") {
		t.Errorf("non-loopback without a token: %d %s", code, stderr)
	}
	_, stderr, code = flowpipe(t, dir, "run")
	if code != 1 || !strings.Contains(stderr, "admin.listen") {
		t.Errorf("run with non-loopback and no token: %d %s", code, stderr)
	}
	write("  listen: 0.0.0.0:9560\n  token_file: no-such-token")
	_, stderr, code = flowpipe(t, dir, "validate")
	if code != 1 || !strings.Contains(stderr, "pipeline.yaml:3: admin.token_file: open") {
		t.Errorf("a missing token file: %d %s", code, stderr)
	}
	for _, ok := range []string{"  listen: 0.0.0.0:9560\n  token: x", "  listen: \"[::]:9560\"\n  insecure: true", "  listen: localhost:9560", "  listen: \"[::1]:9560\""} {
		write(ok)
		if _, stderr, code := flowpipe(t, dir, "validate"); code != 0 {
			t.Errorf("%q: %d %s", ok, code, stderr)
		}
	}
}

func TestTapOverUnixSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")
	r := startRun(t, dir, fmt.Sprintf(`
admin: {listen: "unix:%s"}
data_dir: data
sources:
  gen: {type: generate, rate: 500}
sinks:
  out: {type: file, path: out.jsonl}
`, sock))
	if r.admin != "unix:"+sock {
		t.Fatalf("admin address %q", r.admin)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", st, err)
	}
	eventually(t, "events in the ring", func() bool {
		out, _, _ := flowpipe(t, dir, "tap", "--admin", "unix:"+sock, "--last", "3", "-o", "json")
		return strings.Count(out, "\n") == 3
	})
	out, _, code := flowpipe(t, dir, "top", "--admin", sock, "--once", "--by", "proto")
	if code != 0 || !strings.Contains(out, "TOP BY BYTES") {
		t.Errorf("top over the socket: %d %s", code, out)
	}
}

// writeCert writes a certificate signed by parent (self-signed when parent is nil) and its
// key as PEM files, and returns them for signing further certificates.
func writeCert(t *testing.T, dir, name string, tmpl *x509.Certificate, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	writeFile(t, filepath.Join(dir, name+".pem"), string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	writeFile(t, filepath.Join(dir, name+"-key.pem"), string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})))
	cert, _ := x509.ParseCertificate(der)
	return cert, key
}

// TestAdminMTLS: a listener on every address is accepted with mTLS instead of a token; tap
// gets through with a client certificate the CA signed, and not without one.
func TestAdminMTLS(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	ca, caKey := writeCert(t, dir, "ca", &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}, nil, nil)
	writeCert(t, dir, "server", &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "flowpipe"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}, ca, caKey)
	writeCert(t, dir, "client", &x509.Certificate{
		SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "operator"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
	}, ca, caKey)
	r := startRun(t, dir, `
admin:
  listen: "0.0.0.0:0"
  cert_file: server.pem
  key_file: server-key.pem
  client_ca_file: ca.pem
data_dir: data
sources:
  gen: {type: generate, rate: 200}
sinks:
  out: {type: file, path: out.jsonl}
`)
	_, port, _ := net.SplitHostPort(r.admin)
	admin := "--admin=https://127.0.0.1:" + port
	eventually(t, "tap over mTLS to print an event", func() bool {
		out, stderr, code := flowpipe(t, dir, "tap", admin, "--cacert", filepath.Join(dir, "ca.pem"),
			"--cert", filepath.Join(dir, "client.pem"), "--key", filepath.Join(dir, "client-key.pem"), "--last", "1", "-o", "json")
		if code != 0 {
			t.Fatalf("tap with a client certificate: %d %s", code, stderr)
		}
		return strings.Count(out, "\n") == 1
	})
	_, stderr, code := flowpipe(t, dir, "tap", admin, "--cacert", filepath.Join(dir, "ca.pem"), "--last", "1")
	if code != 1 || !strings.Contains(stderr, "cannot reach the admin listener") {
		t.Errorf("tap without a client certificate: %d %s", code, stderr)
	}
	// flowpipe reload goes the same way (the same client): the running file, nothing changed.
	out, stderr, code := flowpipe(t, dir, "reload", admin, "--cacert", filepath.Join(dir, "ca.pem"),
		"--cert", filepath.Join(dir, "client.pem"), "--key", filepath.Join(dir, "client-key.pem"))
	if code != 0 || out != "reload applied: nothing changed (2 components kept)\n" {
		t.Errorf("reload over mTLS: exit %d, %q %s", code, out, stderr)
	}
}
