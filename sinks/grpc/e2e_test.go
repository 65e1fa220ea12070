package grpcsink_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/flowwire"
	"github.com/flowpipe/flowpipe/internal/testenv"
	pb "github.com/flowpipe/flowpipe/proto/flow"
	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
)

// These tests run the collector as the real flowpipe binary (grpc source → file sink), a
// child process that can be killed with SIGKILL.

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

func flowpipeBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "flowpipe-grpc-e2e-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "flowpipe")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/flowpipe/flowpipe/cmd/flowpipe").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("build flowpipe: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

const e2eSecret = "e2e-secret-0123456789abcdef"

// collector is a flowpipe process receiving on addr and writing out.jsonl in dir. Its log,
// every run's, is collector.log in dir, and the test's output when the test fails.
type collector struct {
	t       *testing.T
	dir     string
	addr    string
	cmd     *exec.Cmd
	exited  chan struct{} // closed when cmd has ended
	runs    int
	started bool // once: its address is in use (the agents point at it)
}

func newCollector(t *testing.T, dir string) *collector {
	c := &collector{t: t, dir: dir}
	c.listenOn(testenv.FreeTCPAddr(t))
	t.Cleanup(func() {
		if c.cmd != nil {
			c.cmd.Process.Kill()
			<-c.exited
		}
		if t.Failed() {
			t.Logf("collector log (%s):\n%s", c.logPath(), c.logText())
		}
	})
	return c
}

func (c *collector) listenOn(addr string) {
	c.addr = addr
	cfg := fmt.Sprintf(`admin:
  listen: ""
sources:
  agents:
    type: grpc
    listen: %s
    auth: hmac
    secrets: [%q]
    dedup:
      state_file: dedup.state
sinks:
  out:
    type: file
    path: out.jsonl
    max_size: 0
`, addr, e2eSecret)
	if err := os.WriteFile(filepath.Join(c.dir, "collector.yaml"), []byte(cfg), 0o644); err != nil {
		c.t.Fatal(err)
	}
}

func (c *collector) logPath() string { return filepath.Join(c.dir, "collector.log") }

func (c *collector) logText() string {
	b, _ := os.ReadFile(c.logPath())
	return string(b)
}

// start runs the collector and waits until it listens: until its own process tree (the
// grpc source listens in its plugin process) holds the listening socket. A dial cannot tell:
// another process that took the port after FreeTCPAddr chose it answers as well, while the
// collector exits with "address already in use" (a CI run then hung, its agent sending to
// the other process for ever). A collector that exits is noticed at once: on its first start,
// when its port was taken, it moves to another one (nothing points at it yet); any other
// exit fails the test with its log. (kill waits until the killed process tree is gone, so a
// restart does not find the port still held by its dying plugin process.)
func (c *collector) start() {
	c.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		c.runs++
		log, err := os.OpenFile(c.logPath(), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			c.t.Fatal(err)
		}
		fmt.Fprintf(log, "=== run %d, listening on %s\n", c.runs, c.addr)
		before, _ := log.Seek(0, io.SeekCurrent)
		c.cmd = exec.Command(flowpipeBinary(c.t), "run", "-c", "collector.yaml")
		c.cmd.Dir = c.dir
		c.cmd.Stdout, c.cmd.Stderr = log, log
		c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // no orphan if the test binary dies
		err = c.cmd.Start()
		log.Close()
		if err != nil {
			c.t.Fatal(err)
		}
		c.exited = make(chan struct{})
		go func(cmd *exec.Cmd, exited chan struct{}) { cmd.Wait(); close(exited) }(c.cmd, c.exited)
		err = testenv.WaitListening(c.cmd.Process.Pid, "tcp", testenv.Port(c.t, c.addr), c.exited, time.Until(deadline))
		if err == nil {
			c.started = true
			return
		}
		c.cmd = nil
		run := c.logText()[before:]
		if !errors.Is(err, testenv.ErrExited) || !strings.Contains(run, "address already in use") {
			c.t.Fatalf("collector does not start: %v", err)
		}
		if c.started {
			c.t.Fatalf("collector does not start again on %s: another process took the port", c.addr)
		}
		c.listenOn(testenv.FreeTCPAddr(c.t))
	}
}

// kill kills the collector and its plugin processes with SIGKILL and waits until they are gone.
func (c *collector) kill() {
	c.t.Helper()
	if err := testenv.KillTree(c.cmd.Process.Pid, time.Minute); err != nil {
		c.t.Fatal(err)
	}
	<-c.exited
	c.cmd = nil
}

func (c *collector) stop() {
	c.cmd.Process.Signal(syscall.SIGTERM)
	<-c.exited
	c.cmd = nil
}

// agentBound keeps an agent that cannot finish (its collector gone, say) from hanging the
// test until CI's limit: not a timing assertion, the agents here finish in seconds.
const agentBound = 5 * time.Minute

// agent is a flowpipe process running agent.yaml in dir, its log in agent.log there.
type agent struct {
	t      *testing.T
	dir    string
	ctx    context.Context
	cmd    *exec.Cmd
	exited chan error
}

func startAgent(t *testing.T, dir string) *agent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), agentBound)
	a := &agent{t: t, dir: dir, ctx: ctx, exited: make(chan error, 1)}
	log, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	a.cmd = exec.CommandContext(ctx, flowpipeBinary(t), "run", "-c", "agent.yaml")
	a.cmd.Dir = dir
	a.cmd.Stdout, a.cmd.Stderr = log, log
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.exited <- a.cmd.Wait() }()
	t.Cleanup(func() {
		cancel()
		<-a.exited
		a.exited <- nil
		if t.Failed() {
			t.Logf("agent log (%s):\n%s", filepath.Join(dir, "agent.log"), a.log())
		}
	})
	return a
}

func (a *agent) log() string {
	b, _ := os.ReadFile(filepath.Join(a.dir, "agent.log"))
	return string(b)
}

// wait waits for the agent to finish and fails the test (both logs follow) unless it exits 0.
func (a *agent) wait() {
	a.t.Helper()
	err := <-a.exited
	a.exited <- err
	if a.ctx.Err() != nil {
		a.t.Fatalf("agent still running after %s: killed", agentBound)
	}
	if err != nil {
		a.t.Fatalf("agent: %v", err)
	}
}

// outputIDs counts each event ID in the collector's output.
func outputIDs(t *testing.T, path string) map[string]int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ids := map[string]int{}
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var e struct {
			ID string `json:"event_id"`
		}
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("%s: %v in %q", path, err, sc.Text())
		}
		ids[e.ID]++
	}
	return ids
}

func lineCount(path string) int {
	b, _ := os.ReadFile(path)
	return bytes.Count(b, []byte{'\n'})
}

// TestAgentToCollectorBinaries runs both ends as flowpipe processes: an agent (generate →
// grpc sink, plus a local file of what it generated) and a collector (grpc source → file).
// Every generated event arrives exactly once.
func TestAgentToCollectorBinaries(t *testing.T) { eachProtocol(t, testAgentToCollectorBinaries) }

func testAgentToCollectorBinaries(t *testing.T, protocol string) {
	dir := t.TempDir()
	c := newCollector(t, dir)
	c.start()
	addr := c.addr
	agent := fmt.Sprintf(`admin:
  listen: ""
sources:
  gen:
    type: generate
    count: 100000
    batch_size: 1000
sinks:
  collector:
    type: grpc
    protocol: %s
    url: http://%s
    hmac_secret: %q
  local:
    type: file
    path: sent.jsonl
    max_size: 0
`, protocol, addr, e2eSecret)
	if err := os.WriteFile(filepath.Join(dir, "agent.yaml"), []byte(agent), 0o644); err != nil {
		t.Fatal(err)
	}
	startAgent(t, dir).wait()
	// The agent exits once the collector ACKed everything; the collector wrote it before.
	c.stop()
	sent := outputIDs(t, filepath.Join(dir, "sent.jsonl"))
	got := outputIDs(t, filepath.Join(dir, "out.jsonl"))
	if len(sent) < 100000 {
		t.Fatalf("agent generated %d events, want at least 100000", len(sent))
	}
	checkExactlyOnce(t, sent, got)
}

// streamEvents writes n new events to s in the background (4 writers, 500 events a write)
// and returns them, their IDs, and a wait that returns once every write has, failing the test
// if they have not within 5 minutes.
// streamEvents writes n events to s in the background (batches of 500, four at a time);
// the function it returns waits for the writes to end. With hold not nil, the writes stop
// after the first third, whose Writes all returned (every event ACKed) when paused is
// closed, until hold is closed.
func streamEvents(t *testing.T, s *grpcsink.Sink, n int, hold <-chan struct{}) (events []flow.Event, sent map[string]int, paused <-chan struct{}, writesDone func()) {
	events = makeEvents(n)
	sent = map[string]int{}
	for _, e := range events {
		sent[e.EventID.String()] = 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	done, pause := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		cut := len(events)
		if hold != nil {
			cut = len(events) / 3
		}
		writeAll(ctx, t, s, events[:cut], 500, 4)
		close(pause)
		if cut == len(events) {
			return
		}
		select {
		case <-hold:
		case <-ctx.Done():
			return
		}
		writeAll(ctx, t, s, events[cut:], 500, 4)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return events, sent, pause, func() {
		t.Helper()
		<-done
		if ctx.Err() != nil {
			t.Fatal("writes did not finish")
		}
	}
}

func checkExactlyOnce(t *testing.T, sent, got map[string]int) {
	t.Helper()
	missing, twice := 0, 0
	for id := range sent {
		switch n := got[id]; {
		case n == 0:
			missing++
		case n > 1:
			twice += n - 1
		}
	}
	extra := 0
	for id := range got {
		if sent[id] == 0 {
			extra++
		}
	}
	if missing > 0 || twice > 0 || extra > 0 {
		t.Fatalf("of %d events sent: %d missing, %d duplicates, %d unknown in the collector's output", len(sent), missing, twice, extra)
	}
}

// sinkWithMetrics is an in-process agent sink whose counters the test reads.
func sinkWithMetrics(t *testing.T, protocol, url string, window int) (*grpcsink.Sink, *prometheus.Registry) {
	t.Helper()
	cfg := grpcsink.Factory().NewConfig().(*grpcsink.Config)
	cfg.URL, cfg.HMACSecret, cfg.MaxInFlight, cfg.Protocol = url, e2eSecret, window, protocol
	cfg.ReconnectMin, cfg.ReconnectMax = 20*time.Millisecond, 300*time.Millisecond
	cfg.AckTimeout = 10 * time.Minute // resends here come from reconnects only
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	s, err := grpcsink.New(component.Env{Name: "agent", Registerer: reg}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	return s, reg
}

func metric(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// waitFor polls cond until it holds; the bound only keeps a broken test from hanging.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestCollectorKilledWithEventsUnacked kills the collector with SIGKILL at a moment the test
// arranges: every event the agent sent is durable in the collector's output and recorded in
// its de-duplication state, but none of the last window's ACKs reached the agent (a proxy
// holds them back). After the restart the agent resends that window; the collector
// recognises every resent event from its state file, and the output has every event exactly
// once.
func TestCollectorKilledWithEventsUnacked(t *testing.T) {
	eachProtocol(t, testCollectorKilledWithEventsUnacked)
}

func testCollectorKilledWithEventsUnacked(t *testing.T, protocol string) {
	dir := t.TempDir()
	c := newCollector(t, dir)
	c.start()
	addr := c.addr
	px := newProxy(t, addr)
	const window = 1000 // below the 4×500 events the writers have in flight, so it fills
	s, reg := sinkWithMetrics(t, protocol, "http://"+px.Addr(), window)

	// The writes stop after a third of the events until the proxy holds the ACKs back, so
	// that however fast the machine, the rest is sent while no ACK can come (on a quiet
	// machine the agent once had all 100,000 ACKed before the test froze the proxy).
	hold := make(chan struct{})
	events, sent, paused, writesDone := streamEvents(t, s, 100_000, hold)

	out := filepath.Join(dir, "out.jsonl")
	state := filepath.Join(dir, "dedup.state")
	<-paused // the first third written and ACKed
	px.Freeze(true)
	close(hold)
	// Every event of the first third was ACKed before the freeze (paused), so
	// what is unacked now was queued after it, and no ACK can free room for more. The sink
	// cuts writes into chunks of at most a quarter of its window and queues a chunk only
	// while the window has room for it, so it queues no more once over three quarters of the
	// window are unacked (the rest of the stream is far longer). Wait until then, until all it
	// queued is sent (sent counts a send on the stream, unacked a chunk queued), and until
	// the collector has everything sent in its output and its state file: the events unacked
	// are then exactly the ones it must resend, and the collector must know them all.
	cut := len(events) / 3
	waitFor(t, "the window full and sent, and everything sent durable and recorded", func() bool {
		firstSends := int(metric(t, reg, "flowpipe_grpc_sink_events_sent_total"))
		unacked := int(metric(t, reg, "flowpipe_grpc_sink_unacked_events"))
		st, err := os.Stat(state)
		return err == nil && unacked > window*3/4 && firstSends == cut+unacked &&
			lineCount(out) == firstSends && int(st.Size()/24) == firstSends
	})
	unacked := metric(t, reg, "flowpipe_grpc_sink_unacked_events")
	if unacked == 0 || unacked > window {
		t.Fatalf("%v events unacked at the agent with the ACKs held back, want 1..%d", unacked, window)
	}
	resentBefore := metric(t, reg, "flowpipe_grpc_sink_events_resent_total")
	c.kill()
	// Cut before thawing: thawed first, the proxy would hand the agent the ACKs it held
	// back before the cut, and the agent would then rightly resend fewer than the unacked
	// count read above (a race this test lost now and then). Cut first, they are lost with
	// the connections, as in a network failure.
	px.Cut()
	px.Freeze(false)
	c.start()
	writesDone()
	if resent := metric(t, reg, "flowpipe_grpc_sink_events_resent_total") - resentBefore; resent < unacked {
		t.Fatalf("agent resent %v events after the restart, want at least the %v it had unacked", resent, unacked)
	}
	c.stop()
	checkExactlyOnce(t, sent, outputIDs(t, out))
}

// TestCollectorKilledMidStream kills the collector with SIGKILL at an arbitrary moment and
// starts it again: every event arrives. Events the collector had written but not yet recorded
// as delivered when it died (the instant between its sink's write and its state file's) may
// arrive twice; the test reports how many, and the exactly-once guarantee for everything
// recorded is TestCollectorKilledWithEventsUnacked's.
func TestCollectorKilledMidStream(t *testing.T) { eachProtocol(t, testCollectorKilledMidStream) }

func testCollectorKilledMidStream(t *testing.T, protocol string) {
	dir := t.TempDir()
	c := newCollector(t, dir)
	c.start()
	addr := c.addr
	s, _ := sinkWithMetrics(t, protocol, "http://"+addr, 5000)
	events, sent, _, writesDone := streamEvents(t, s, 100_000, nil)
	out := filepath.Join(dir, "out.jsonl")
	waitFor(t, "40% of the events at the collector", func() bool { return lineCount(out) >= len(events)*2/5 })
	c.kill()
	c.start()
	writesDone()
	c.stop()
	got := outputIDs(t, out)
	missing, twice := 0, 0
	for id := range sent {
		switch n := got[id]; {
		case n == 0:
			missing++
		case n > 1:
			twice += n - 1
		}
	}
	if missing > 0 || len(got) != len(sent) {
		t.Fatalf("%d of %d events missing after the collector was killed (%d distinct in output)", missing, len(sent), len(got))
	}
	t.Logf("all %d events arrived; %d written twice (unrecorded at the kill)", len(sent), twice)
	if strings.Contains(c.logText(), "panic") {
		t.Fatal("the collector panicked")
	}
}

// TestNetBirdClientAndAgentIntoOneCollector: a NetBird client (generated code, NetBird's
// protocol) and a flowpipe agent (the binary, default protocol: flowpipe's batch stream)
// stream into one collector binary at the same time, on its one listener; every event of
// both arrives exactly once.
func TestNetBirdClientAndAgentIntoOneCollector(t *testing.T) {
	dir := t.TempDir()
	c := newCollector(t, dir)
	c.start()
	addr := c.addr
	agent := fmt.Sprintf(`admin:
  listen: ""
sources:
  gen:
    type: generate
    count: 50000
    batch_size: 500
    rate: 25000
sinks:
  collector:
    type: grpc
    url: http://%s
    hmac_secret: %q
  local:
    type: file
    path: sent.jsonl
    max_size: 0
`, addr, e2eSecret)
	if err := os.WriteFile(filepath.Join(dir, "agent.yaml"), []byte(agent), 0o644); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, dir)

	// The NetBird client streams while the agent does.
	nb := makeEvents(20_000)
	sent := map[string]int{}
	for _, e := range nb {
		sent[e.EventID.String()] = 1
	}
	waitFor(t, "the agent's first events at the collector", func() bool { return lineCount(filepath.Join(dir, "out.jsonl")) > 0 })
	if err := streamNetBird(addr, e2eSecret, nb); err != nil {
		t.Fatalf("NetBird client: %v", err)
	}
	a.wait()
	if !strings.Contains(a.log(), "protocol=flowpipe") {
		t.Errorf("the agent did not use flowpipe's protocol")
	}
	c.stop()
	fromAgent := outputIDs(t, filepath.Join(dir, "sent.jsonl"))
	if len(fromAgent) < 50000 {
		t.Fatalf("agent generated %d events, want 50000", len(fromAgent))
	}
	for id := range fromAgent {
		sent[id]++
	}
	checkExactlyOnce(t, sent, outputIDs(t, filepath.Join(dir, "out.jsonl")))
}

// streamNetBird sends events as NetBird's client does (generated code, the standard codec,
// one event per message) and returns once every one is ACKed.
func streamNetBird(addr, secret string, events []flow.Event) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	tok := flowwire.MintToken([]byte(secret), time.Now().Add(time.Hour))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", tok.Authorization())
	stream, err := pb.NewFlowServiceClient(conn).Events(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&pb.FlowEvent{IsInitiator: true}); err != nil {
		return err
	}
	if md, err := stream.Header(); err != nil || len(md) == 0 {
		return fmt.Errorf("no headers: %v", err)
	}
	acked := make(chan error, 1)
	go func() {
		seen := map[uuid.UUID]bool{}
		for len(seen) < len(events) {
			ack, err := stream.Recv()
			if err != nil {
				acked <- fmt.Errorf("after %d ACKs: %w", len(seen), err)
				return
			}
			if !ack.IsInitiator {
				seen[uuid.UUID(ack.EventId)] = true
			}
		}
		acked <- nil
	}()
	for i := range events {
		if err := stream.Send(netbirdEvent(&events[i])); err != nil {
			return err
		}
	}
	return <-acked
}
