package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/netns"
	"github.com/flowpipe/flowpipe/internal/pluginhost"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// A conntrack source whose options change while it runs must lose no start and no end: these
// tests flood a namespace with short UDP flows and change the source's options between
// rounds of the flood, through the plugin host with the flowpipe binary re-executed as the
// source's plugin (the default isolation).

var (
	udpfloodOnce sync.Once
	udpfloodBin  string
	udpfloodErr  error
)

// burstNS is a namespace pair in which flows from A to a UDP sink in B end a second after
// their one datagram.
type burstNS struct {
	p    *testenv.Pair
	sink *net.UDPAddr
}

func newBurstNS(t *testing.T) *burstNS {
	t.Helper()
	testenv.RequireRoot(t)
	_, err := exec.LookPath("conntrack")
	testenv.Require(t, err == nil, "conntrack (Debian package conntrack)")
	udpfloodOnce.Do(func() {
		udpfloodBin = filepath.Join(filepath.Dir(binary), "udpflood")
		out, err := exec.Command("go", "build", "-o", udpfloodBin, "../../sources/conntrack/internal/udpflood").CombinedOutput()
		if err != nil {
			udpfloodErr = err
			t.Logf("%s", out)
		}
	})
	if udpfloodErr != nil {
		t.Fatalf("build udpflood: %v", udpfloodErr)
	}
	p := testenv.NewPair(t)
	testenv.MustRun(t, "ip", "netns", "exec", p.A, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=1",
		"net.netfilter.nf_conntrack_udp_timeout_stream=1")
	var pc net.PacketConn
	if err := netns.Run(p.B, func() (err error) { pc, err = net.ListenPacket("udp", p.B4+":0"); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	return &burstNS{p: p, sink: pc.LocalAddr().(*net.UDPAddr)}
}

// flood opens n flows from source ports first… in namespace A, one datagram of 16 bytes each.
func (b *burstNS) flood(first, n int) error {
	return exec.Command("ip", "netns", "exec", b.p.A, udpfloodBin, "-dst", b.sink.String(),
		"-n", strconv.Itoa(n), "-first-port", strconv.Itoa(first), "-workers", "1").Run()
}

// reap makes the kernel destroy the expired entries now (a table dump does).
func (b *burstNS) reap() { _ = exec.Command("ip", "netns", "exec", b.p.A, "conntrack", "-L").Run() }

// checkOnce checks that each flow from source ports first…first+n-1 to the sink has
// exactly one start and one end, with the same flow ID.
func (b *burstNS) checkOnce(t *testing.T, evs []flow.Event, first, n int) {
	t.Helper()
	startOf := map[uint16]uuid.UUID{}
	ended := map[uint16]bool{}
	for _, e := range evs {
		if e.Protocol != flow.ProtoUDP || e.DstPort != uint16(b.sink.Port) || int(e.SrcPort) < first || int(e.SrcPort) >= first+n {
			continue
		}
		switch e.Type {
		case flow.TypeStart:
			if _, dup := startOf[e.SrcPort]; dup {
				t.Errorf("two starts for source port %d", e.SrcPort)
			}
			startOf[e.SrcPort] = e.FlowID
		case flow.TypeEnd:
			if ended[e.SrcPort] {
				t.Errorf("two ends for source port %d", e.SrcPort)
			}
			ended[e.SrcPort] = true
			if id, ok := startOf[e.SrcPort]; !ok || id != e.FlowID {
				t.Errorf("end of port %d has flow ID %v, its start %v", e.SrcPort, e.FlowID, id)
			}
		}
	}
	if len(startOf) != n || len(ended) != n {
		t.Fatalf("%d of %d flows have a start, %d an end", len(startOf), n, len(ended))
	}
}

// counted returns how many flows of the range have a start and an end so far.
// A flow reported twice (as a replaced source may) counts once.
func (b *burstNS) counted(evs []flow.Event, first, n int) (starts, ends int) {
	st, en := map[uint16]bool{}, map[uint16]bool{}
	for _, e := range evs {
		if e.Protocol == flow.ProtoUDP && e.DstPort == uint16(b.sink.Port) && int(e.SrcPort) >= first && int(e.SrcPort) < first+n {
			if e.Type == flow.TypeStart {
				st[e.SrcPort] = true
			} else if e.Type == flow.TypeEnd {
				en[e.SrcPort] = true
			}
		}
	}
	return len(st), len(en)
}

// floodDuringReload floods n flows from source ports first… while flowpipe (cmd) reloads
// pipeline.yaml, written with yaml, on a SIGHUP; it is the round-th reload (from 1).
func (b *burstNS) floodDuringReload(t *testing.T, cmd *exec.Cmd, stderr *testenv.SyncBuffer, dir, yaml string, round, first, n int) {
	t.Helper()
	flooded := make(chan error, 1)
	go func() { flooded <- b.flood(first, n) }()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), yaml)
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, fmt.Sprintf("reload %d applied", round), func() bool {
		return ctLogCount(stderr.String(), "reload applied", nil) == round
	})
	if err := <-flooded; err != nil {
		t.Fatalf("flood %d: %v", round, err)
	}
}

// TestConntrackReconfigureInPluginProcess runs the conntrack source as the host runs it by
// default, in a plugin process (the flowpipe binary re-executed), and reconfigures it a
// dozen times through the plugin protocol during a burst of short flows: the plugin process
// stays the same, and every flow has exactly one start and one end with the same flow ID.
func TestConntrackReconfigureInPluginProcess(t *testing.T) {
	b := newBurstNS(t)
	host := pluginhost.NewHost(pluginhost.HostOptions{Registry: newRegistry(),
		BuiltinCommand: func(kind component.Kind, typ string) (*exec.Cmd, error) {
			return exec.Command(binary, "plugin", "serve", string(kind), typ), nil
		}})
	logs := &testenv.SyncBuffer{}
	env := component.Env{Name: "kernel", Kind: component.KindSource, Type: "conntrack", DataDir: t.TempDir(),
		Logger: slog.New(slog.NewTextHandler(logs, nil)), Metrics: &componenttest.Metrics{}}
	defer func() {
		if t.Failed() {
			t.Logf("log:\n%s", logs.String())
		}
	}()
	base := map[string]any{"netns": b.p.A, "activate": true}
	opts := func(extra map[string]any) map[string]any {
		out := map[string]any{}
		for k, v := range base {
			out[k] = v
		}
		for k, v := range extra {
			out[k] = v
		}
		return out
	}
	ctx := context.Background()
	c, err := host.Instantiate(ctx, config.Component{Kind: component.KindSource, Name: "kernel", Type: "conntrack",
		Options: opts(map[string]any{"protocols": []any{"udp"}})}, env)
	if err != nil {
		t.Fatal(err)
	}
	src := c.(component.Source)
	if err := c.(component.Starter).Start(ctx); err != nil {
		t.Fatal(err)
	}
	pids := pluginChildren(t, os.Getpid())
	if len(pids) != 1 {
		t.Fatalf("plugin processes %v, want the conntrack source's one", pids)
	}
	out := &componenttest.Collector{}
	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- src.Run(runCtx, out) }()

	variants := []map[string]any{
		{"protocols": []any{"udp", "tcp"}, "batch_size": 64, "flush_interval": "20ms"},
		{"protocols": []any{"udp"}, "read_buffer": "8MiB", "max_pending": 100000},
		{"protocols": []any{"udp", "icmp"}, "exclude_prefixes": []any{"192.0.2.0/24"}, "batch_size": 4096},
		{"protocols": []any{"17", "tcp"}, "local_prefixes": []any{b.p.A4 + "/32"}, "flush_interval": "5ms"},
	}
	rc := c.(component.Reconfigurer)
	const rounds, per, first = 12, 400, 20000
	for i := 0; i < rounds; i++ {
		flooded := make(chan error, 1)
		go func() { flooded <- b.flood(first+i*per, per) }()
		if err := rc.Reconfigure(ctx, opts(variants[i%len(variants)])); err != nil {
			t.Fatalf("reconfigure %d: %v", i, err)
		}
		if err := <-flooded; err != nil {
			t.Fatalf("flood %d: %v", i, err)
		}
	}
	const n = rounds * per
	eventually(t, "every start and end", func() bool {
		s, e := b.counted(out.Events(), first, n)
		if e < n {
			b.reap()
			time.Sleep(50 * time.Millisecond)
		}
		return s >= n && e >= n
	})
	// A change the running source cannot make in place is refused, and changes nothing.
	if err := rc.Reconfigure(ctx, opts(map[string]any{"activate": false})); !errors.Is(err, component.ErrRestartNeeded) {
		t.Errorf("activate changed: got %v, want ErrRestartNeeded", err)
	}
	// Options that need other capabilities than the process has (no netns: no
	// CAP_SYS_ADMIN) are refused by the host before they reach the plugin.
	noNS := opts(nil)
	delete(noNS, "netns")
	if err := rc.Reconfigure(ctx, noNS); !errors.Is(err, component.ErrRestartNeeded) || !strings.Contains(err.Error(), "capabilities") {
		t.Errorf("capabilities changed: got %v, want ErrRestartNeeded naming the capabilities", err)
	}
	// Problems come back at their keys.
	err = rc.Reconfigure(ctx, opts(map[string]any{"protocols": []any{"udb"}}))
	if fe, ok := options.FieldErrorsOf(err); !ok || len(fe) != 1 || fe[0].Path != "protocols[0]" {
		t.Errorf("bad protocol: got %v, want one problem at protocols[0]", err)
	}
	if now := pluginChildren(t, os.Getpid()); len(now) != 1 || now[0] != pids[0] {
		t.Errorf("plugin processes %v before, %v after: Reconfigure must keep the process", pids, now)
	}
	stop()
	if err := <-ran; err != nil {
		t.Fatalf("Run: %v", err)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.(component.Closer).Close(cctx); err != nil {
		t.Errorf("Close: %v", err)
	}
	b.checkOnce(t, out.Events(), first, n)
}

// ctLogCount counts flowpipe's --log-format json records with message msg and every
// attribute of attrs.
func ctLogCount(log, msg string, attrs map[string]string) int {
	n := 0
	for _, l := range strings.Split(log, "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(l), &rec) != nil || rec["msg"] != msg {
			continue
		}
		ok := true
		for k, v := range attrs {
			ok = ok && fmt.Sprint(rec[k]) == v
		}
		if ok {
			n++
		}
	}
	return n
}

// readFlows reads the complete lines of a file sink's output written so far.
func readFlows(t *testing.T, path string) []flow.Event {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []flow.Event
	lines := bytes.Split(b, []byte("\n"))
	for _, l := range lines[:len(lines)-1] { // the last is empty or still being written
		var e flow.Event
		if err := flow.ParseJSON(l, &e); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		out = append(out, e)
	}
	return out
}

// TestReloadConntrackOnSIGHUP: `flowpipe run` (the default isolation: the conntrack source
// in its own plugin process) reads a namespace while it is flooded with short UDP flows;
// between rounds of the flood, pipeline.yaml gets other protocols (and batch options) and
// flowpipe a SIGHUP. Each reload reconfigures the running source in place (its plugin
// process stays), and every flow has exactly one start and one end with the same flow ID.
func TestReloadConntrackOnSIGHUP(t *testing.T) {
	b := newBurstNS(t)
	dir := t.TempDir()
	pipeline := func(extra string) string {
		return `
admin: {listen: ""}
data_dir: state
sources:
  kernel: {type: conntrack, netns: ` + b.p.A + `, activate: true, ` + extra + `}
sinks:
  out: {type: file, path: flows.jsonl}
`
	}
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), pipeline(`protocols: [udp], flush_interval: 20ms`))
	cmd, stderr := runUntilRunning(t, dir, "--log-format", "json")
	plugins := pluginChildren(t, cmd.Process.Pid)
	if len(plugins) != 2 {
		t.Fatalf("plugin processes %v, want the source's and the sink's", plugins)
	}
	variants := []string{
		`protocols: [udp, tcp], batch_size: 64, flush_interval: 20ms`,
		`protocols: [udp], read_buffer: 8MiB, flush_interval: 50ms`,
		`protocols: [udp, icmp], exclude_prefixes: [192.0.2.0/24], flush_interval: 20ms`,
		`protocols: ["17"], flush_interval: 10ms`,
	}
	const rounds, per, first = 8, 400, 30000
	for i := 0; i < rounds; i++ {
		b.floodDuringReload(t, cmd, stderr, dir, pipeline(variants[i%len(variants)]), i+1, first+i*per, per)
	}
	if n := ctLogCount(stderr.String(), "reload: changed", map[string]string{"component": "source/kernel", "how": "reconfigured"}); n != rounds {
		t.Errorf("the source was reconfigured in place %d times of %d reloads:\n%s", n, rounds, stderr.String())
	}
	if now := pluginChildren(t, cmd.Process.Pid); !slices.Equal(now, plugins) {
		t.Errorf("plugin processes %v after the reloads, %v before: a reconfigured source keeps its process", now, plugins)
	}
	const n = rounds * per
	out := filepath.Join(dir, "flows.jsonl")
	eventually(t, "every start and end in the file", func() bool {
		s, e := b.counted(readFlows(t, out), first, n)
		if e < n {
			b.reap()
			time.Sleep(50 * time.Millisecond)
		}
		return s >= n && e >= n
	})
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, cmd, stderr, time.Minute); code != 0 {
		t.Fatalf("exit %d:\n%s", code, stderr.String())
	}
	b.checkOnce(t, componenttest.ReadJSONLines(t, out), first, n)
}

// TestReloadConntrackReplacedOnSIGHUP: as TestReloadConntrackOnSIGHUP, but each reload
// changes an option the running source cannot take in place (timestamps: it changes the
// namespace's nf_conntrack_timestamp), so the source is replaced by a new plugin process,
// with overlap, while the namespace is flooded. No flow is lost across the swaps: every flow
// has a start and an end, and every end the flow ID of one of its starts (the new instance
// reports the flows still open as reconstructed starts; during the overlap both instances
// may report one, so a flow may have two).
func TestReloadConntrackReplacedOnSIGHUP(t *testing.T) {
	b := newBurstNS(t)
	dir := t.TempDir()
	pipeline := func(timestamps bool) string {
		return fmt.Sprintf(`
admin: {listen: ""}
data_dir: state
sources:
  kernel: {type: conntrack, netns: %s, activate: true, protocols: [udp], flush_interval: 20ms, timestamps: %v}
sinks:
  out: {type: file, path: flows.jsonl}
`, b.p.A, timestamps)
	}
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), pipeline(true))
	cmd, stderr := runUntilRunning(t, dir, "--log-format", "json")
	const rounds, per, first = 4, 400, 40000
	seen := map[int]bool{}
	for _, pid := range pluginChildren(t, cmd.Process.Pid) {
		seen[pid] = true
	}
	for i := 0; i < rounds; i++ {
		b.floodDuringReload(t, cmd, stderr, dir, pipeline(i%2 == 1), i+1, first+i*per, per)
		fresh := 0
		for _, pid := range pluginChildren(t, cmd.Process.Pid) {
			if !seen[pid] {
				fresh++
				seen[pid] = true
			}
		}
		if fresh != 1 {
			t.Errorf("reload %d: %d new plugin processes, want 1 (the source's replacement)", i+1, fresh)
		}
	}
	if n := ctLogCount(stderr.String(), "reload: changed", map[string]string{"component": "source/kernel", "how": "replaced"}); n != rounds {
		t.Errorf("the source was replaced %d times of %d reloads:\n%s", n, rounds, stderr.String())
	}
	const n = rounds * per
	out := filepath.Join(dir, "flows.jsonl")
	deadline := time.Now().Add(30 * time.Second)
	for {
		s, e := b.counted(readFlows(t, out), first, n)
		if s >= n && e >= n || time.Now().After(deadline) {
			break // what is missing then is reported below
		}
		b.reap()
		time.Sleep(50 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, cmd, stderr, time.Minute); code != 0 {
		t.Fatalf("exit %d:\n%s", code, stderr.String())
	}
	starts := map[uint16][]uuid.UUID{}
	ended := map[uint16]int{}
	var twice int
	for _, e := range componenttest.ReadJSONLines(t, out) {
		if e.Protocol != flow.ProtoUDP || e.DstPort != uint16(b.sink.Port) || int(e.SrcPort) < first || int(e.SrcPort) >= first+n {
			continue
		}
		switch e.Type {
		case flow.TypeStart:
			starts[e.SrcPort] = append(starts[e.SrcPort], e.FlowID)
		case flow.TypeEnd:
			ended[e.SrcPort]++
			if !slices.Contains(starts[e.SrcPort], e.FlowID) {
				t.Errorf("end of port %d has flow ID %v, none of its starts' %v", e.SrcPort, e.FlowID, starts[e.SrcPort])
			}
		}
	}
	for p, ids := range starts {
		if len(ids) > 1 || ended[p] > 1 {
			twice++
		}
	}
	t.Logf("%d flows over %d replacements: %d with a start, %d with an end, %d reported twice (the overlap)", n, rounds, len(starts), len(ended), twice)
	if len(starts) != n || len(ended) != n {
		var noStart, noEnd []int
		for p := first; p < first+n; p++ {
			if len(starts[uint16(p)]) == 0 {
				noStart = append(noStart, p)
			}
			if ended[uint16(p)] == 0 {
				noEnd = append(noEnd, p)
			}
		}
		t.Fatalf("%d of %d flows have a start, %d an end; without a start: %d from port %v; without an end: %d from port %v\n%s",
			len(starts), n, len(ended), len(noStart), noStart[:min(1, len(noStart))], len(noEnd), noEnd[:min(1, len(noEnd))], stderr.String())
	}
}
