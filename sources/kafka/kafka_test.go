package kafka_test

import (
	"context"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/kafkaconn"
	"github.com/flowpipe/flowpipe/internal/logcodec"
	kafkasink "github.com/flowpipe/flowpipe/sinks/kafka"
	kafkasource "github.com/flowpipe/flowpipe/sources/kafka"
)

// No Kafka broker can be installed on the test machines: these tests run franz-go's kfake,
// an in-process implementation of the Kafka protocol by the client's author, as a 3-broker
// cluster. The client code is standard franz-go and runs against Kafka or Redpanda as is.

func events(n int) []flow.Event {
	out := make([]flow.Event, n)
	for i := range out {
		out[i] = flow.Event{EventID: uuid.New(), FlowID: uuid.New(), Timestamp: flow.Now(),
			SrcAddr: netip.MustParseAddr("10.0.0.1"), DstAddr: netip.MustParseAddr("10.0.0.2"),
			SrcPort: uint16(1024 + i%60000), DstPort: 53, Type: flow.TypeEnd, Protocol: flow.ProtoUDP, RuleID: "r"}
	}
	return out
}

func cluster(t *testing.T, opts ...kfake.Opt) []string {
	c, err := kfake.NewCluster(append([]kfake.Opt{kfake.NumBrokers(3), kfake.SeedTopics(3, "flows")}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()
}

func newSink(t *testing.T, brokers []string, format string, mut func(*kafkaconn.Config)) *kafkasink.Sink {
	c := kafkasink.Factory().NewConfig().(*kafkasink.Config)
	c.Brokers, c.Topic, c.Format = brokers, "flows", format
	if mut != nil {
		mut(&c.Config)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	s, _ := kafkasink.New(component.Env{Name: "log", Kind: component.KindSink}, c)
	t.Cleanup(func() { s.Close(context.Background()) })
	return s
}

func newSource(t *testing.T, brokers []string, state string, metrics component.Metrics, mut func(*kafkaconn.Config)) *kafkasource.Source {
	c := kafkasource.Factory().NewConfig().(*kafkasource.Config)
	c.Brokers, c.Topics, c.Group, c.SessionTimeout = brokers, []string{"flows"}, "writers", 6*time.Second
	c.Dedup.StateFile = state
	c.RevokeTimeout = time.Second // a killed consumer's held batches never come back
	if mut != nil {
		mut(&c.Config)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := kafkasource.New(component.Env{Name: "log", Kind: component.KindSource, Metrics: metrics}, c)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 20s: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestRoundTripEachFormat(t *testing.T) {
	brokers := cluster(t)
	for _, f := range logcodec.Formats {
		t.Run(string(f), func(t *testing.T) {
			sink := newSink(t, brokers, string(f), nil)
			if err := sink.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			in := events(2000)
			if err := sink.Write(context.Background(), flow.NewBatch(in, nil)); err != nil {
				t.Fatal(err)
			}
			src := newSource(t, brokers, "", nil, func(c *kafkaconn.Config) {})
			var got componenttest.Collector
			componenttest.RunSource(t, src, &got)
			want := map[uuid.UUID]bool{}
			for _, e := range in {
				want[e.EventID] = true
			}
			waitFor(t, "2000 events", func() bool {
				n := 0
				for _, e := range got.Events() {
					if want[e.EventID] {
						n++
					}
				}
				return n == 2000
			})
		})
	}
}

// holdingEmitter acknowledges the first n batches and holds the others (a consumer killed
// while they were in its pipeline).
type holdingEmitter struct {
	mu   sync.Mutex
	n    int
	held []*flow.Batch
	componenttest.Collector
}

func (h *holdingEmitter) Emit(ctx context.Context, b *flow.Batch) error {
	h.mu.Lock()
	if h.n <= 0 {
		h.held = append(h.held, b)
		h.mu.Unlock()
		return nil
	}
	h.n--
	h.mu.Unlock()
	return h.Collector.Emit(ctx, b)
}

func TestConsumerKilledMidStreamLosesNothingAndDuplicatesNothing(t *testing.T) {
	brokers := cluster(t)
	sink := newSink(t, brokers, "packed", nil)
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	in := events(20000)
	for i := 0; i < len(in); i += 1000 {
		if err := sink.Write(context.Background(), flow.NewBatch(in[i:i+1000], nil)); err != nil {
			t.Fatal(err)
		}
	}
	// A record that is not a flowpipe event: counted and skipped.
	raw, _ := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err := raw.ProduceSync(context.Background(), &kgo.Record{Topic: "flows", Value: []byte("garbage"),
		Headers: []kgo.RecordHeader{{Key: "content-type", Value: []byte(logcodec.Packed.ContentType())}}}).FirstErr(); err != nil {
		t.Fatal(err)
	}
	raw.Close()

	state := filepath.Join(t.TempDir(), "writer.ids")
	var metrics componenttest.Metrics
	first := newSource(t, brokers, state, &metrics, nil)
	h := &holdingEmitter{n: 3}
	if err := first.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { first.Run(ctx, h); close(done) }()
	waitFor(t, "batches held", func() bool { h.mu.Lock(); defer h.mu.Unlock(); return len(h.held) > 0 })
	// The consumer dies: its held batches are never acknowledged.
	cancel()
	<-done
	cctx, ccancel := context.WithTimeout(context.Background(), time.Second)
	first.Close(cctx)
	ccancel()
	delivered := h.Events()
	t.Logf("first consumer delivered %d events in 3 batches and held %d batches", len(delivered), len(h.held))

	second := newSource(t, brokers, state, &metrics, nil)
	var got componenttest.Collector
	componenttest.RunSource(t, second, &got)
	seen := map[uuid.UUID]int{}
	for _, e := range delivered {
		seen[e.EventID]++
	}
	waitFor(t, "every event delivered", func() bool {
		n := 0
		for _, e := range got.Events() {
			if seen[e.EventID] == 0 {
				n++
			}
		}
		return n+len(delivered) >= len(in)
	})
	for _, e := range got.Events() {
		seen[e.EventID]++
	}
	dups := 0
	for _, e := range in {
		switch seen[e.EventID] {
		case 0:
			t.Fatalf("event %s lost", e.EventID)
		case 1:
		default:
			dups++
		}
	}
	if dups != 0 {
		t.Fatalf("%d events delivered twice", dups)
	}
	if n := metrics.DroppedCount("malformed_message"); n < 1 {
		t.Fatalf("the garbage record was not counted: %s", metrics.String())
	}
}

func TestStartErrorsAreClear(t *testing.T) {
	brokers := cluster(t, kfake.EnableSASL(), kfake.Superuser("PLAIN", "flowpipe", "right-password"))
	cases := []struct {
		name, want string
		mut        func(*kafkaconn.Config)
	}{
		{"unreachable", "reachable", func(c *kafkaconn.Config) { c.Brokers = []string{"127.0.0.1:1"}; c.DialTimeout = 500 * time.Millisecond }},
		{"wrong password", "credentials", func(c *kafkaconn.Config) {
			c.SASL = &kafkaconn.SASLConfig{Mechanism: "PLAIN", User: "flowpipe", Password: "wrong"}
			c.DialTimeout = time.Second // the start check waits twice this for an answer
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sink := newSink(t, brokers, "packed", tc.mut)
			err := sink.Start(context.Background())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("sink start: %v; want %q", err, tc.want)
			}
			if h := sink.Health(); h == nil {
				t.Fatal("healthy after a failed start")
			}
			src := newSource(t, brokers, "", nil, tc.mut)
			if err := src.Start(context.Background()); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("source start: %v; want %q", err, tc.want)
			}
			t.Log(err)
		})
	}
	t.Run("missing topic", func(t *testing.T) {
		c := kafkasink.Factory().NewConfig().(*kafkasink.Config)
		c.Brokers, c.Topic = brokers, "nope"
		c.SASL = &kafkaconn.SASLConfig{Mechanism: "PLAIN", User: "flowpipe", Password: "right-password"}
		s, _ := kafkasink.New(component.Env{}, c)
		err := s.Start(context.Background())
		if err == nil || !strings.Contains(err.Error(), "does not exist") {
			t.Fatalf("start: %v", err)
		}
		t.Log(err)
	})
}
