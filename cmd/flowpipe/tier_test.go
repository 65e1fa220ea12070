package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// tierProc is one flowpipe process of the tier, restartable with the same configuration.
type tierProc struct {
	t      *testing.T
	name   string
	dir    string
	cmd    *exec.Cmd
	exited chan error // receives the exit status of cmd
	stderr *testenv.SyncBuffer
	logs   strings.Builder // every earlier run's log
}

func startProc(t *testing.T, dir, name, yaml string) *tierProc {
	t.Helper()
	writeFile(t, filepath.Join(dir, name+".yaml"), yaml)
	p := &tierProc{t: t, name: name, dir: dir}
	p.start()
	t.Cleanup(func() {
		if p.cmd != nil {
			p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("%s log:\n%s%s", name, p.logs.String(), p.stderr.String())
		}
	})
	return p
}

func (p *tierProc) start() {
	p.t.Helper()
	if p.stderr != nil {
		p.logs.WriteString(p.stderr.String())
	}
	p.cmd = exec.Command(binary, "run", "-c", p.name+".yaml", "--log-format", "json")
	p.cmd.Dir = p.dir
	p.stderr = &testenv.SyncBuffer{}
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	exited := make(chan error, 1)
	p.exited = exited
	cmd := p.cmd
	go func() { exited <- cmd.Wait() }()
	eventually(p.t, p.name+" running", func() bool {
		select {
		case err := <-exited:
			exited <- err
			p.t.Fatalf("%s exited at start (%v):\n%s", p.name, err, p.stderr.String())
		default:
		}
		return strings.Contains(p.stderr.String(), "pipeline running")
	})
}

// usedBatchStream checks that the agents streamed to the collectors with flowpipe's batch
// stream (the grpc sink's default, protocol: auto, between two flowpipes), never NetBird's.
func usedBatchStream(t *testing.T, agents ...*tierProc) {
	t.Helper()
	for _, a := range agents {
		log := a.logs.String() + a.stderr.String()
		if !strings.Contains(log, `"protocol":"flowpipe"`) || strings.Contains(log, `"protocol":"netbird"`) {
			t.Errorf("%s did not stream with flowpipe's batch stream only:\n%s", a.name, log)
		}
	}
}

// kill kills the process and its plugin processes with SIGKILL and waits until they are gone,
// so that a restart finds its port free.
func (p *tierProc) kill() {
	p.t.Helper()
	if err := testenv.KillTree(p.cmd.Process.Pid, time.Minute); err != nil {
		p.t.Fatal(err)
	}
	<-p.exited
	p.cmd = nil
}

// wait waits for the process to exit by itself (an agent whose count is done) and fails on
// a non-zero status.
func (p *tierProc) wait() {
	p.t.Helper()
	select {
	case err := <-p.exited:
		p.cmd = nil
		if err != nil {
			p.t.Fatalf("%s: %v\n%s", p.name, err, p.stderr.String())
		}
	case <-time.After(90 * time.Second):
		p.t.Fatalf("%s did not finish", p.name)
	}
}

// tierCollectorYAML is collector i of a tier: a grpc source on listen (de-duplicating) into
// the log sink whose type and options are sink (YAML lines indented for the sink's block).
func tierCollectorYAML(i int, listen, sink string) string {
	return fmt.Sprintf(`
admin: {listen: ""}
data_dir: state
sources:
  agents: {type: grpc, listen: %q, auth: none, dedup: {state_file: collector%d.ids}}
sinks:
  log:%s
    retry: {initial_interval: 50ms, max_interval: 500ms}
`, listen, i, sink)
}

// tierAgentYAML is agent i of a tier: count generated events at rate, each into its own file
// (what the agent produced) and to the collectors named by target ("url: …" or "urls: […]").
func tierAgentYAML(i, count, rate int, target string) string {
	return fmt.Sprintf(`
admin: {listen: ""}
sources:
  gen: {type: generate, rate: %d, count: %d, batch_size: 500, seed: %d}
sinks:
  local: {type: file, path: agent%d.jsonl, max_size: 0}
  collector:
    type: grpc
    %s
    reconnect_min: 50ms
    reconnect_max: 300ms
    retry: {initial_interval: 50ms, max_interval: 500ms}
`, rate, count, i+1, i, target)
}

// tierWriterYAML is the tier's writer: the log source whose type and options are source
// (de-duplicating) into out.jsonl.
func tierWriterYAML(source string) string {
	return fmt.Sprintf(`
admin: {listen: ""}
sources:
  log:%s
    dedup: {state_file: writer.ids}
sinks:
  store: {type: file, path: out.jsonl, max_size: 0, resume_scan: 16MiB}
`, source)
}

// agentEvents is every event agents 1..n wrote to their local files.
func agentEvents(t *testing.T, dir string, n int) map[string]bool {
	t.Helper()
	want := map[string]bool{}
	for i := 1; i <= n; i++ {
		for _, e := range componenttest.ReadJSONLines(t, filepath.Join(dir, fmt.Sprintf("agent%d.jsonl", i))) {
			want[e.EventID.String()] = true
		}
	}
	return want
}

// exactlyOnceInFile fails unless the JSON lines file out holds every event of want exactly
// once and nothing else; it logs where the first duplicates are.
func exactlyOnceInFile(t *testing.T, want map[string]bool, out string) {
	t.Helper()
	events := componenttest.ReadJSONLines(t, out)
	seen := map[string]int{}
	first := map[string]int{}
	var where []string
	for i, e := range events {
		id := e.EventID.String()
		if seen[id] == 0 {
			first[id] = i + 1
		} else {
			if len(where) < 5 {
				where = append(where, fmt.Sprintf("line %d repeats line %d", i+1, first[id]))
			}
		}
		seen[id]++
	}
	if len(where) > 0 {
		t.Logf("duplicates: %s", strings.Join(where, "; "))
	}
	dups := 0
	for _, n := range seen {
		dups += n - 1
	}
	missing := 0
	for id := range want {
		if seen[id] == 0 {
			missing++
		}
	}
	if missing != 0 || len(seen) != len(want) || dups != 0 {
		t.Fatalf("%d events generated; in the file: %d distinct, %d missing, %d not generated, %d duplicates",
			len(want), len(seen), missing, len(seen)+missing-len(want), dups)
	}
	t.Logf("%d events generated, each in the file exactly once", len(want))
}

func countLines(path string) int {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return strings.Count(string(data), "\n")
}

// TestCollectorTierExactlyOnceThroughJetStream runs the collector tier with real processes,
// each component in its own plugin process (the default isolation): two agents (generate →
// grpc), two collectors (grpc → jetstream) and a writer (jetstream → file) over a 3-node
// nats-server cluster with an R3 stream; each agent lists both collectors (grpc sink urls).
// One collector is killed with SIGKILL mid-stream (its agents move to the other) and
// restarted, then a JetStream node is killed, then the writer is killed and restarted; every
// event the agents generated must be in the file exactly once.
func TestCollectorTierExactlyOnceThroughJetStream(t *testing.T) {
	// The formats have their own round trips in sources/jetstream; the kills run once.
	collectorTier(t, "packed")
}

func collectorTier(t *testing.T, format string) {
	cl := testenv.StartNATSCluster(t, 3, testenv.NATSAuth{})
	servers := "[" + strings.Join(cl.URLs(), ", ") + "]"
	dir := t.TempDir()
	// generated starts; the ends of flows still open at the end come on top. At 5,000 events/s
	// an agent produces for about 20 s, so the kills below happen while the agents are still
	// sending, however quickly the writer catches up with the log.
	const perAgent = 100_000
	collectorYAML := func(i int, listen string) string {
		return tierCollectorYAML(i, listen, fmt.Sprintf(`
    type: jetstream
    servers: %s
    stream: FLOWS
    subject: flows.in
    format: %s
    create_stream: {replicas: 3, max_age: 1h}`, servers, format))
	}
	// Each agent lists both collectors: the one it is on dies, it moves to the other.
	agentYAML := func(i int, urls string) string { return tierAgentYAML(i, perAgent, 5000, "urls: "+urls) }
	writerYAML := tierWriterYAML(fmt.Sprintf(`
    type: jetstream
    servers: %s
    stream: FLOWS
    durable: writers
    ack_wait: 5s`, servers))

	addr1, addr2 := testenv.FreeTCPAddr(t), testenv.FreeTCPAddr(t)
	c1 := startProc(t, dir, "collector1", collectorYAML(1, addr1))
	startProc(t, dir, "collector2", collectorYAML(2, addr2))
	w := startProc(t, dir, "writer", writerYAML)
	urls := fmt.Sprintf("[http://%s, http://%s]", addr1, addr2)
	a1 := startProc(t, dir, "agent1", agentYAML(1, urls))
	a2 := startProc(t, dir, "agent2", agentYAML(2, urls))
	out := filepath.Join(dir, "out.jsonl")

	eventually(t, "a tenth of the events in the file", func() bool { return countLines(out) > 2*perAgent/10 })
	c1.kill()
	t.Logf("collector1 killed at %d lines", countLines(out))
	c1.start()
	cl.Kill(0)
	nodeKilledAt := countLines(out)
	t.Logf("JetStream node %s killed at %d lines", cl.Nodes[0].Name, nodeKilledAt)
	eventually(t, "progress with one JetStream node down", func() bool { return countLines(out) > nodeKilledAt+2*perAgent/10 })
	w.kill()
	killedAt := countLines(out)
	t.Logf("writer killed at %d lines", killedAt)
	w.start()
	a1.wait()
	a2.wait()
	usedBatchStream(t, a1, a2)
	// The agents ran to their end without a kill: their local files are what they produced.
	want := agentEvents(t, dir, 2)
	eventually(t, "every event in the file", func() bool { return countLines(out) >= len(want) })
	// A duplicate would come from a message not yet acknowledged: wait until the writer's
	// consumer has acknowledged everything, so that nothing more can come.
	nc, err := nats.Connect(strings.Join(cl.URLs()[1:], ","))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	jsc, _ := jetstream.New(nc)
	eventually(t, "the writer's consumer acknowledged everything", func() bool {
		c, err := jsc.Consumer(context.Background(), "FLOWS", "writers")
		if err != nil {
			return false
		}
		info, err := c.Info(context.Background())
		return err == nil && info.NumPending == 0 && info.NumAckPending == 0
	})
	exactlyOnceInFile(t, want, out)
}

// TestCollectorTierExactlyOnceThroughKafka is the same shape through Kafka: two agents, two
// collectors (grpc → kafka) and a writer (kafka → file) as real flowpipe processes. No Kafka
// broker can be installed on the test machines, so the brokers are franz-go's kfake (an
// in-process implementation of the Kafka protocol), run by the test on loopback, 3 brokers
// and a topic of 3 partitions; the flowpipe processes speak to it over TCP as they would to
// Kafka. A collector is killed mid-stream and restarted, then the writer: every event in the
// file exactly once.
func TestCollectorTierExactlyOnceThroughKafka(t *testing.T) {
	kc, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.SeedTopics(3, "flows"))
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	brokers := "[" + strings.Join(kc.ListenAddrs(), ", ") + "]"
	dir := t.TempDir()
	const perAgent = 50_000
	collectorYAML := func(i int, listen string) string {
		return tierCollectorYAML(i, listen, fmt.Sprintf(`
    type: kafka
    brokers: %s
    topic: flows
    compression: lz4`, brokers))
	}
	agentYAML := func(i int, url string) string { return tierAgentYAML(i, perAgent, 15000, "url: "+url) }
	writerYAML := tierWriterYAML(fmt.Sprintf(`
    type: kafka
    brokers: %s
    topics: [flows]
    group: writers
    session_timeout: 6s`, brokers))
	addr1, addr2 := testenv.FreeTCPAddr(t), testenv.FreeTCPAddr(t)
	c1 := startProc(t, dir, "collector1", collectorYAML(1, addr1))
	startProc(t, dir, "collector2", collectorYAML(2, addr2))
	w := startProc(t, dir, "writer", writerYAML)
	a1 := startProc(t, dir, "agent1", agentYAML(1, "http://"+addr1))
	a2 := startProc(t, dir, "agent2", agentYAML(2, "http://"+addr2))
	out := filepath.Join(dir, "out.jsonl")

	eventually(t, "events in the file", func() bool { return countLines(out) > 2*perAgent/5 })
	c1.kill()
	t.Logf("collector1 killed at %d lines", countLines(out))
	c1.start()
	eventually(t, "progress after the collector restart", func() bool { return countLines(out) > 2*perAgent*3/5 })
	w.kill()
	t.Logf("writer killed at %d lines", countLines(out))
	w.start()
	a1.wait()
	a2.wait()
	usedBatchStream(t, a1, a2)
	want := agentEvents(t, dir, 2)
	eventually(t, "every event in the file", func() bool { return countLines(out) >= len(want) })
	// Nothing more can come once the group has committed every offset.
	adm, err := kgo.NewClient(kgo.SeedBrokers(kc.ListenAddrs()...))
	if err != nil {
		t.Fatal(err)
	}
	defer adm.Close()
	eventually(t, "every offset committed", func() bool { return committedAll(t, adm, "writers", "flows") })
	exactlyOnceInFile(t, want, out)
}

// committedAll reports whether group has committed, for every partition of topic, the
// partition's end offset.
func committedAll(t *testing.T, cl *kgo.Client, group, topic string) bool {
	ctx := context.Background()
	lo := kmsg.NewPtrListOffsetsRequest()
	lt := kmsg.NewListOffsetsRequestTopic()
	lt.Topic = topic
	for p := int32(0); p < 3; p++ {
		lp := kmsg.NewListOffsetsRequestTopicPartition()
		lp.Partition, lp.Timestamp = p, -1
		lt.Partitions = append(lt.Partitions, lp)
	}
	lo.Topics = append(lo.Topics, lt)
	ends, err := lo.RequestWith(ctx, cl)
	if err != nil {
		return false
	}
	of := kmsg.NewPtrOffsetFetchRequest()
	of.Group = group
	ft := kmsg.NewOffsetFetchRequestTopic()
	ft.Topic, ft.Partitions = topic, []int32{0, 1, 2}
	of.Topics = append(of.Topics, ft)
	got, err := of.RequestWith(ctx, cl)
	if err != nil || len(got.Topics) == 0 {
		return false
	}
	committed := map[int32]int64{}
	for _, p := range got.Topics[0].Partitions {
		committed[p.Partition] = p.Offset
	}
	for _, tp := range ends.Topics {
		for _, p := range tp.Partitions {
			if committed[p.Partition] != p.Offset {
				return false
			}
		}
	}
	return true
}
