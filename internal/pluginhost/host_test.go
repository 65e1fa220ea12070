package pluginhost

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// pluginDir holds the test plugin under each of its names (built once in TestMain).
var pluginDir string

func TestMain(m *testing.M) {
	if os.Getenv("FLOWPIPE_TEST_HOST_PROCESS") != "" {
		os.Exit(hostProcess())
	}
	dir, err := os.MkdirTemp("", "flowpipe-plugin-test")
	if err != nil {
		panic(err)
	}
	bin := filepath.Join(dir, "testplugin")
	out, err := exec.Command("go", "build", "-o", bin, "./internal/testplugin").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build test plugin: %v\n%s", err, out)
		os.Exit(1)
	}
	for _, name := range []string{"flowpipe-sink-jsonl", "flowpipe-source-seq", "flowpipe-enricher-tag", "flowpipe-sink-future",
		"flowpipe-sink-jsonlv1", "flowpipe-source-seqv1", "flowpipe-enricher-tagv1",
		"flowpipe-enricher-tagwhole", "flowpipe-enricher-tagwholev1", "flowpipe-enricher-corrupt",
		"flowpipe-sink-lazy", "flowpipe-sink-lazyv1"} {
		if err := os.Link(bin, filepath.Join(dir, name)); err != nil {
			panic(err)
		}
	}
	pluginDir = dir
	restartBackoff.Initial = 200 * time.Millisecond // restarts in tests need not wait a second
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// counts is a component.Metrics that remembers what it was told.
type counts struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *counts) add(k string, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]int{}
	}
	c.m[k] += n
}
func (c *counts) Filtered(r string, n int) { c.add("filtered/"+r, n) }
func (c *counts) Dropped(r string, n int)  { c.add("dropped/"+r, n) }
func (c *counts) Errors(r string, n int)   { c.add("errors/"+r, n) }
func (c *counts) get(k string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[k]
}

// logBuf collects log records as text.
type logBuf = testenv.SyncBuffer

type fixture struct {
	host *Host
	env  component.Env
	reg  *prometheus.Registry
	m    *counts
	logs *logBuf
}

func newFixture(t *testing.T, kind component.Kind, name string) *fixture {
	t.Helper()
	f := &fixture{reg: prometheus.NewRegistry(), m: &counts{}, logs: &logBuf{}}
	f.host = NewHost(HostOptions{Registry: component.NewRegistry(), PluginDir: pluginDir})
	f.env = component.Env{
		Name: name, Kind: kind, ConfigDir: t.TempDir(),
		Logger:  slog.New(slog.NewTextHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug})).With(string(kind), name),
		Metrics: f.m, Registerer: f.reg,
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log:\n%s", f.logs.String())
		}
	})
	return f
}

func (f *fixture) instantiate(t *testing.T, plugin string, opts map[string]any) (any, error) {
	t.Helper()
	spec := config.Component{Kind: f.env.Kind, Name: f.env.Name, Plugin: plugin, Options: opts}
	if p, ok := opts["process"]; ok { // as the config loader does: process: is the host's
		spec.Process = p
		spec.Options = maps.Clone(opts)
		delete(spec.Options, "process")
	}
	c, err := f.host.Instantiate(context.Background(), spec, f.env)
	if err == nil {
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = c.(component.Closer).Close(ctx)
		})
	}
	return c, err
}

// started is instantiate, then Start; any failure fails the test.
func (f *fixture) started(t *testing.T, plugin string, opts map[string]any) any {
	t.Helper()
	c, err := f.instantiate(t, plugin, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.(component.Starter).Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return c
}

func (f *fixture) metric(t *testing.T, name string) float64 {
	t.Helper()
	mfs, err := f.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			if m.Counter != nil {
				return m.Counter.GetValue()
			}
			return m.Gauge.GetValue()
		}
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

func seqEvents(from, n int) []flow.Event {
	evs := make([]flow.Event, n)
	for i := range evs {
		evs[i] = testEvent(from + i)
	}
	return evs
}

func testEvent(i int) flow.Event {
	var e flow.Event
	e.EventID[8], e.EventID[9], e.EventID[10], e.EventID[11] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
	e.EventID[6] = 0x40
	e.FlowID = e.EventID
	e.Type = flow.TypeEnd
	e.Timestamp = flow.Time(1_700_000_000_000_000_000 + int64(i))
	e.SrcPort, e.DstPort, e.Protocol = uint16(i), 53, flow.ProtoUDP
	e.Source = "test"
	e.RxBytes = uint64(i) * 3
	return e
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
}

func TestSinkPluginWritesBatches(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	path := filepath.Join(t.TempDir(), "out.jsonl")
	c, err := f.instantiate(t, "jsonl", map[string]any{"path": path})
	if err != nil {
		t.Fatal(err)
	}
	sink := c.(component.Sink)
	if err := c.(component.Starter).Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	var want []string
	for i := 0; i < 5; i++ {
		evs := seqEvents(i*1000, 1000)
		for j := range evs {
			want = append(want, string(flow.AppendJSON(nil, &evs[j])))
		}
		if err := sink.Write(context.Background(), flow.NewBatch(evs, nil)); err != nil {
			t.Fatal(err)
		}
	}
	// What the plugin registered with its Env.Registerer is scraped through the host.
	if n := f.metric(t, "testplugin_writes_total"); n != 5 {
		t.Errorf("testplugin_writes_total = %v through the host, want 5", n)
	}
	if err := c.(component.Closer).Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := readLines(t, path)
	if len(got) != len(want) {
		t.Fatalf("got %d lines, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("line %d:\n got %s\nwant %s", i, got[i], want[i])
		}
	}
	// The plugin's own log lines land in the host's log with the component's name.
	logs := f.logs.String()
	if !strings.Contains(logs, "jsonl sink started") || !strings.Contains(logs, "sink=out") {
		t.Errorf("plugin log lines missing from the host log:\n%s", logs)
	}
	// ... formatted as the same line would be in process: attributes in order, a duration
	// as a duration, an integer as an integer.
	if want := `msg="jsonl sink started" sink=out path=` + path + ` timeout=1.5s batch=3 z=last`; !strings.Contains(logs, want) {
		t.Errorf("plugin log line not as in process, want %q in:\n%s", want, logs)
	}
	// The plugin is not pinned: one warning, at start.
	if n := strings.Count(logs, "plugin runs without a sha256: pin"); n != 1 {
		t.Errorf("%d warnings about the missing sha256: pin, want 1:\n%s", n, logs)
	}
}

// A sink plugin that decodes only what it needs (component.EncodedWriter) is handed each
// batch in the encoding the host sent, over the data channel and over gRPC, and writes the
// same events as one that is handed them decoded.
func TestEncodedWriterPluginDecodesItself(t *testing.T) {
	for _, plugin := range []string{"lazy", "lazyv1"} {
		t.Run(plugin, func(t *testing.T) {
			f := newFixture(t, component.KindSink, "out")
			path := filepath.Join(t.TempDir(), "out.jsonl")
			c := f.started(t, plugin, map[string]any{"path": path})
			var want []string
			for i := range 4 {
				evs := seqEvents(i*700, 700)
				for j := range evs {
					want = append(want, string(flow.AppendJSON(nil, &evs[j])))
				}
				if err := c.(component.Sink).Write(context.Background(), flow.NewBatch(evs, nil)); err != nil {
					t.Fatal(err)
				}
			}
			if n := f.metric(t, "testplugin_undecoded_total"); n != 4 {
				t.Errorf("%v of 4 batches reached the plugin's Write undecoded", n)
			}
			if err := c.(component.Closer).Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := readLines(t, path); !slices.Equal(got, want) {
				t.Fatalf("the plugin wrote %d lines, not the %d events written to it (first: %.200q)", len(got), len(want), got[0])
			}
		})
	}
}

func TestSinkPluginValidation(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	_, err := f.instantiate(t, "jsonl", map[string]any{"path": "relative.jsonl", "colour": "red"})
	var fe config.FieldErrors
	if !errors.As(err, &fe) {
		t.Fatalf("got %v, want config.FieldErrors", err)
	}
	if msg := fe.Error(); !strings.Contains(msg, "colour") {
		t.Errorf("unknown key not reported: %s", msg)
	}
	_, err = f.instantiate(t, "jsonl", map[string]any{"path": "relative.jsonl"})
	if !errors.As(err, &fe) || len(fe) != 1 || fe[0].Path != "path" || !strings.Contains(fe[0].Msg, "must be absolute") {
		t.Fatalf("got %#v, want one error at path", err)
	}
	_, err = f.instantiate(t, "jsonl", map[string]any{})
	if !errors.As(err, &fe) || len(fe) != 1 || fe[0].Path != "path" {
		t.Fatalf("got %#v, want a missing path", err)
	}
	_, err = f.instantiate(t, "jsonl", map[string]any{"path": "/tmp/x", "process": map[string]any{"call_timeout": "0s"}})
	if !errors.As(err, &fe) || fe[0].Path != "process.call_timeout" {
		t.Fatalf("got %#v, want process.call_timeout", err)
	}
}

func TestEnricherPlugin(t *testing.T) {
	f := newFixture(t, component.KindEnricher, "tag")
	c, err := f.instantiate(t, "tag", map[string]any{"rule": "r-1", "drop_every": 10})
	if err != nil {
		t.Fatal(err)
	}
	en := c.(component.Enricher)
	b := flow.NewBatch(seqEvents(0, 1000), nil)
	if err := en.Enrich(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	if len(b.Events) != 900 {
		t.Fatalf("kept %d events, want 900", len(b.Events))
	}
	for _, e := range b.Events {
		if e.RuleID != "r-1" || e.SrcPort%10 == 0 {
			t.Fatalf("event not enriched or not filtered: %+v", e)
		}
	}
	if n := f.m.get("filtered/port_multiple"); n != 100 {
		t.Errorf("filtered count %d, want 100", n)
	}
}

// ackingEmitter acknowledges every batch once it is emitted, as a pipeline whose sinks all
// succeed would.
type ackingEmitter struct {
	mu     sync.Mutex
	events []flow.Event
}

func (e *ackingEmitter) Emit(_ context.Context, b *flow.Batch) error {
	e.mu.Lock()
	e.events = append(e.events, b.Events...)
	e.mu.Unlock()
	b.Release(nil)
	return nil
}

func TestSourcePluginAcksEndToEnd(t *testing.T) {
	f := newFixture(t, component.KindSource, "seq")
	acks := filepath.Join(t.TempDir(), "acks")
	c, err := f.instantiate(t, "seq", map[string]any{"count": 10_000, "batch": 1000, "acks": acks})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.(component.Starter).Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	out := &ackingEmitter{}
	// Run returns only once the plugin's source returned, which it does after every batch
	// was acknowledged through the host.
	if err := c.(component.Source).Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	if len(out.events) != 10_000 {
		t.Fatalf("got %d events, want 10000", len(out.events))
	}
	for i, e := range out.events {
		if e.SrcPort != uint16(i) {
			t.Fatalf("event %d out of order: %+v", i, e)
		}
	}
	lines := readLines(t, acks)
	if len(lines) != 10 {
		t.Fatalf("plugin saw %d acknowledgements, want 10: %q", len(lines), lines)
	}
	for _, l := range lines {
		if !strings.HasSuffix(l, " 1000 <nil>") {
			t.Fatalf("acknowledgement %q is not a success", l)
		}
	}
}

// TestSinkPluginKilled kills -9 a sink plugin while 100,000 events stream through it, and
// retries failed writes the way the runtime does: every event ends up in the output, and
// duplicates come only from batches counted as redelivered.
func TestSinkPluginKilled(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	path := filepath.Join(t.TempDir(), "out.jsonl")
	c, err := f.instantiate(t, "jsonl", map[string]any{"path": path})
	if err != nil {
		t.Fatal(err)
	}
	sink := c.(*remoteSink)
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	const total, size = 100_000, 1000
	failed, killed := 0, 0
	for i := 0; i < total; i += size {
		b := flow.NewBatch(seqEvents(i, size), nil)
		if i == total/2 {
			p, _ := sink.in.get(context.Background())
			killed = p.pid()
			if err := syscall.Kill(killed, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
		for {
			err := sink.Write(context.Background(), b)
			if err == nil {
				break
			}
			failed++
			if failed > 1000 {
				t.Fatalf("too many failed writes, last: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// Whether a Write failed depends on whether the host noticed the death (Watch) and
	// restarted the plugin before the next Write: either is right. What must hold: the
	// process was replaced, nothing is missing, and duplicates are only of batches counted
	// as redelivered.
	if p, err := sink.in.get(context.Background()); err != nil || p.pid() == killed {
		t.Fatalf("the killed plugin process %d was not replaced (%v)", killed, err)
	}
	if err := sink.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, l := range readLines(t, path) {
		seen[l]++
	}
	dups := 0
	for i := 0; i < total; i++ {
		e := testEvent(i)
		n := seen[string(flow.AppendJSON(nil, &e))]
		if n == 0 {
			t.Fatalf("event %d missing after the restart", i)
		}
		dups += n - 1
	}
	redelivered := f.metric(t, "flowpipe_plugin_redelivered_events_total")
	if float64(dups) > redelivered {
		t.Fatalf("%d duplicate events, but only %v counted as redelivered", dups, redelivered)
	}
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r < 1 {
		t.Fatalf("restarts_total = %v after a kill", r)
	}
	t.Logf("%d failed writes, %d duplicates, %v redelivered events counted", failed, dups, redelivered)
}

func TestPluginStartErrors(t *testing.T) {
	dir := t.TempDir()
	notPlugin := filepath.Join(dir, "flowpipe-sink-echo")
	if err := os.WriteFile(notPlugin, []byte("#!/bin/sh\necho hello, I am not a plugin\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	sum, err := FileSHA256(filepath.Join(pluginDir, "flowpipe-sink-jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	good := fmt.Sprintf("%x", sum)
	bad := strings.Repeat("ab", 32)
	cases := []struct {
		name, plugin, sha string
		want              string
	}{
		{"checksum mismatch", "jsonl", bad, "but pipeline.yaml pins " + bad},
		{"missing binary", "nosuch", "", "plugin \"nosuch\" not found: looked for"},
		{"missing path", "./nosuch/flowpipe-sink-x", "", "does not exist"},
		{"not a plugin", notPlugin, "", "is not a flowpipe plugin"},
		{"wrong protocol", "future", "", "another version of the flowpipe plugin protocol"},
		{"wrong kind", filepath.Join(pluginDir, "flowpipe-source-seq"), "", "is a source plugin"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, component.KindSink, "out")
			spec := config.Component{Kind: component.KindSink, Name: "out", Plugin: c.plugin, SHA256: c.sha, Options: map[string]any{"path": "/tmp/x"}}
			_, err := f.host.Instantiate(context.Background(), spec, f.env)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error containing %q", err, c.want)
			}
		})
	}
	t.Run("pinned", func(t *testing.T) {
		f := newFixture(t, component.KindSink, "out")
		spec := config.Component{Kind: component.KindSink, Name: "out", Plugin: "jsonl", SHA256: good, Options: map[string]any{"path": "/tmp/x"}}
		c, err := f.host.Instantiate(context.Background(), spec, f.env)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.(component.Closer).Close(context.Background())
	})
}

// TestPluginStartTimeout: process.start_timeout bounds every phase of a start, whatever
// the plugin does, and the error names the plugin; nothing the plugin started is left.
func TestPluginStartTimeout(t *testing.T) {
	dir, err := os.MkdirTemp("", "fp-start") // short: it holds a Unix socket
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// A listener that never accepts: connections to it wait for ever.
	deaf := filepath.Join(dir, "deaf.sock")
	lis, err := net.Listen("unix", deaf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	cases := []struct{ name, script string }{
		// The plugin exits at once, but its child keeps the plugin's standard output open.
		{"child keeps stdout open", "sleep 3600 &\necho $! > " + dir + "/pid-stdout\nexit 0\n"},
		// A valid handshake line naming an address where nobody answers.
		{"handshake to a dead address", "echo '1|1|unix|" + deaf + "|grpc|'\nsleep 3600 &\necho $! > " + dir + "/pid-dead\nwait\n"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			bin := filepath.Join(dir, fmt.Sprintf("flowpipe-sink-hang%d", i))
			if err := os.WriteFile(bin, []byte("#!/bin/sh\n"+c.script), 0o755); err != nil {
				t.Fatal(err)
			}
			f := newFixture(t, component.KindSink, "out")
			spec := config.Component{Kind: component.KindSink, Name: "out", Plugin: bin, Process: map[string]any{"start_timeout": "1s"}}
			got := make(chan error, 1)
			go func() {
				_, err := f.host.Instantiate(context.Background(), spec, f.env)
				got <- err
			}()
			var err error
			select {
			case err = <-got:
			case <-time.After(60 * time.Second):
				t.Fatal("Instantiate still waiting on a plugin with start_timeout: 1s after a minute")
			}
			if err == nil || !strings.Contains(err.Error(), bin) || !strings.Contains(err.Error(), "process.start_timeout") {
				t.Fatalf("got %v, want an error naming %s and process.start_timeout", err, bin)
			}
			pids, _ := filepath.Glob(filepath.Join(dir, "pid-*"))
			for _, pf := range pids {
				data, _ := os.ReadFile(pf)
				var pid int
				if _, err := fmt.Sscan(string(data), &pid); err == nil {
					waitGone(t, pid)
				}
				os.Remove(pf)
			}
		})
	}
}

// TestHungPlugin: a plugin that stops answering altogether (its process is stopped) during a
// Write is found hung once call_timeout passes, reported, and restarted.
func TestHungPlugin(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	c, err := f.instantiate(t, "jsonl", map[string]any{
		"path": filepath.Join(t.TempDir(), "out.jsonl"), "freeze": true,
		"process": map[string]any{"call_timeout": "500ms", "ping_interval": "300ms"},
	})
	if err != nil {
		t.Fatal(err)
	}
	sink := c.(*remoteSink)
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	old, _ := sink.in.get(context.Background())
	err = sink.Write(context.Background(), flow.NewBatch(seqEvents(0, 10), nil))
	if err == nil || !strings.Contains(err.Error(), "the plugin is hung") {
		t.Fatalf("got %v, want a hung plugin", err)
	}
	// The next write goes to a new process (which hangs too: same options).
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := sink.in.get(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p == old || p.pid() == old.pid() {
		t.Fatal("the hung plugin was not replaced")
	}
	if processAlive(old.pid()) {
		t.Errorf("hung plugin process %d still alive", old.pid())
	}
}

// TestSlowSinkPluginIsNotHung: a sink plugin whose Write waits on its destination (a
// collector that is down) while the plugin answers health checks is not killed as hung,
// however often call_timeout passes; its own health and counts reach the host while the
// Write is in progress; and when the destination is back the Write succeeds, once.
func TestSlowSinkPluginIsNotHung(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	dir := t.TempDir()
	path, release := filepath.Join(dir, "out.jsonl"), filepath.Join(dir, "collector-up")
	c, err := f.instantiate(t, "jsonl", map[string]any{
		"path": path, "block_until": release,
		"process": map[string]any{"call_timeout": "200ms", "ping_interval": "100ms"},
	})
	if err != nil {
		t.Fatal(err)
	}
	sink := c.(*remoteSink)
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	written := make(chan error, 1)
	go func() { written <- sink.Write(context.Background(), flow.NewBatch(seqEvents(0, 10), nil)) }()

	// While the Write waits: the sink's own health and its error count come through, and
	// call_timeout passes several times without the plugin being taken for hung.
	waitFor(t, "the sink's health, its errors and three call_timeouts to reach the host", func() bool {
		err := sink.Health()
		return err != nil && strings.Contains(err.Error(), "collector unreachable") &&
			f.m.get("errors/stream") >= 1 &&
			strings.Count(f.logs.String(), "plugin call still in progress") >= 3
	})
	select {
	case err := <-written:
		t.Fatalf("Write returned while the collector is down: %v", err)
	default:
	}
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r != 0 {
		t.Fatalf("a live plugin waiting on its collector was restarted %v times", r)
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil { // the collector is back
		t.Fatal(err)
	}
	if err := <-written; err != nil {
		t.Fatalf("Write after the collector came back: %v", err)
	}
	waitFor(t, "the sink to report healthy again", func() bool { return sink.Health() == nil })
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r != 0 {
		t.Errorf("restarts_total = %v, want 0", r)
	}
	if r := f.metric(t, "flowpipe_plugin_redelivered_events_total"); r != 0 {
		t.Errorf("redelivered_events_total = %v, want 0: nothing failed", r)
	}
	if n := len(readLines(t, path)); n != 10 {
		t.Errorf("the output has %d lines, want the batch once (10)", n)
	}
}

// waitFor waits for cond, failing the test if it does not hold within 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func processAlive(pid int) bool {
	// A zombie is dead for our purpose; /proc/<pid>/stat says Z.
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(data))
	return len(f) > 2 && f[2] != "Z"
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for processAlive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("plugin process %d still running", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCloseStopsProcess(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	c, err := f.instantiate(t, "jsonl", map[string]any{"path": filepath.Join(t.TempDir(), "o")})
	if err != nil {
		t.Fatal(err)
	}
	p, _ := c.(*remoteSink).in.get(context.Background())
	pid := p.pid()
	if err := c.(component.Closer).Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitGone(t, pid)
	if !strings.Contains(f.logs.String(), "jsonl sink closing") {
		t.Error("Close did not reach the plugin's component")
	}
}

// TestPluginDiesWithHost kills -9 a host process and checks that its plugin goes too.
func TestPluginDiesWithHost(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "FLOWPIPE_TEST_HOST_PROCESS=1", "FLOWPIPE_TEST_PLUGIN_DIR="+pluginDir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pid int
	if _, err := fmt.Fscanf(bufio.NewReader(out), "plugin %d\n", &pid); err != nil {
		_ = cmd.Process.Kill()
		t.Fatalf("host process did not report its plugin: %v", err)
	}
	if !processAlive(pid) {
		t.Fatalf("plugin %d not running", pid)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	waitGone(t, pid)
}

// hostProcess is the child of TestPluginDiesWithHost: it starts a plugin, reports its PID
// and waits to be killed.
func hostProcess() int {
	h := NewHost(HostOptions{Registry: component.NewRegistry(), PluginDir: os.Getenv("FLOWPIPE_TEST_PLUGIN_DIR")})
	env := component.Env{Name: "out", Kind: component.KindSink, ConfigDir: os.TempDir(), Logger: slog.Default(), Metrics: component.NopMetrics{}}
	spec := config.Component{Kind: component.KindSink, Name: "out", Plugin: "jsonl", Options: map[string]any{"path": "/dev/null"}}
	c, err := h.Instantiate(context.Background(), spec, env)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	p, _ := c.(*remoteSink).in.get(context.Background())
	fmt.Printf("plugin %d\n", p.pid())
	select {}
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func configComponent(kind component.Kind, name, plugin string, opts map[string]any) config.Component {
	return config.Component{Kind: kind, Name: name, Plugin: plugin, Options: opts}
}

// TestEnricherPluginKilled: batches being enriched when the plugin dies are enriched again
// by the restarted plugin; none fails and none is lost.
func TestEnricherPluginKilled(t *testing.T) {
	f := newFixture(t, component.KindEnricher, "tag")
	c, err := f.instantiate(t, "tag", map[string]any{"rule": "r-2"})
	if err != nil {
		t.Fatal(err)
	}
	en := c.(*remoteEnricher)
	for i := 0; i < 50; i++ {
		if i == 20 {
			p, _ := en.in.get(context.Background())
			if err := syscall.Kill(p.pid(), syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
		b := flow.NewBatch(seqEvents(i*100, 100), nil)
		if err := en.Enrich(context.Background(), b); err != nil {
			t.Fatalf("batch %d: %v", i, err)
		}
		if len(b.Events) != 100 || b.Events[99].RuleID != "r-2" || b.Events[0].SrcPort != uint16(i*100) {
			t.Fatalf("batch %d not enriched: %d events", i, len(b.Events))
		}
	}
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r < 1 {
		t.Fatalf("restarts_total = %v after a kill", r)
	}
}

// TestPipelinedEnricherPluginKilled: with two batches in flight (StartEnrich, as the
// runtime pipelines a plugin enricher), a kill -9 between the starts and the finishes loses
// neither: each finishes enriched, by the restarted plugin, in its own events.
func TestPipelinedEnricherPluginKilled(t *testing.T) {
	f := newFixture(t, component.KindEnricher, "tag")
	c, err := f.instantiate(t, "tag", map[string]any{"rule": "r-3"})
	if err != nil {
		t.Fatal(err)
	}
	en := c.(*remoteEnricher)
	var _ component.Pipeliner = en
	for round := range 3 {
		batches := []*flow.Batch{flow.NewBatch(seqEvents(0, 300), nil), flow.NewBatch(seqEvents(300, 300), nil)}
		var finish []func() error
		for _, b := range batches {
			finish = append(finish, en.StartEnrich(context.Background(), b))
		}
		if round == 1 {
			p, _ := en.in.get(context.Background())
			if err := syscall.Kill(p.pid(), syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
		for i, b := range batches {
			if err := finish[i](); err != nil {
				t.Fatalf("round %d, batch %d: %v", round, i, err)
			}
			if len(b.Events) != 300 || b.Events[0].SrcPort != uint16(i*300) || b.Events[299].RuleID != "r-3" {
				t.Fatalf("round %d, batch %d not enriched: %d events", round, i, len(b.Events))
			}
		}
	}
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r < 1 {
		t.Fatalf("restarts_total = %v after a kill", r)
	}
}

// TestSourcePluginKilled: a source plugin killed while it streams is restarted and runs
// again; the pipeline sees every event (the restarted seq source starts over, so events
// before the kill arrive twice, which is the source's own redelivery).
func TestSourcePluginKilled(t *testing.T) {
	f := newFixture(t, component.KindSource, "seq")
	c, err := f.instantiate(t, "seq", map[string]any{"count": 20_000, "batch": 100})
	if err != nil {
		t.Fatal(err)
	}
	src := c.(*remoteSource)
	if err := src.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	out := &killingEmitter{after: 5_000, kill: func() {
		p, _ := src.in.get(context.Background())
		_ = syscall.Kill(p.pid(), syscall.SIGKILL)
	}}
	if err := src.Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	seen := map[uint16]bool{}
	for _, e := range out.events {
		seen[e.SrcPort] = true
	}
	for i := 0; i < 20_000; i++ {
		if !seen[uint16(i)] {
			t.Fatalf("event %d never arrived", i)
		}
	}
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r < 1 {
		t.Fatalf("restarts_total = %v after a kill", r)
	}
}

// killingEmitter acknowledges batches and calls kill once, after `after` events.
type killingEmitter struct {
	ackingEmitter
	after  int
	kill   func()
	killed bool
}

func (k *killingEmitter) Emit(ctx context.Context, b *flow.Batch) error {
	if err := k.ackingEmitter.Emit(ctx, b); err != nil {
		return err
	}
	k.mu.Lock()
	n := len(k.events)
	k.mu.Unlock()
	if !k.killed && n >= k.after {
		k.killed = true
		k.kill()
	}
	return nil
}

// A plugin that crashes on every call is restarted each time and, after three failures in a
// row, reports itself unhealthy (what /readyz shows).
func TestCrashLoopIsUnhealthy(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	c, err := f.instantiate(t, "jsonl", map[string]any{"path": filepath.Join(t.TempDir(), "o"), "crash": true})
	if err != nil {
		t.Fatal(err)
	}
	sink := c.(*remoteSink)
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := sink.Health(); err != nil {
		t.Fatalf("healthy plugin reports %v", err)
	}
	for i := 0; sink.Health() == nil; i++ {
		if i > 100 {
			t.Fatal("a crash-looping plugin never reported unhealthy")
		}
		if err := sink.Write(context.Background(), flow.NewBatch(seqEvents(0, 10), nil)); err == nil {
			t.Fatal("Write to a crashing plugin succeeded")
		}
	}
	if err := sink.Health(); !strings.Contains(err.Error(), "keeps failing") {
		t.Fatalf("health: %v", err)
	}
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r < 2 {
		t.Fatalf("restarts_total = %v", r)
	}
}
