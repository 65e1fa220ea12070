package jetstream_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/logcodec"
	"github.com/flowpipe/flowpipe/internal/natsconn"
	"github.com/flowpipe/flowpipe/internal/testenv"
	jssink "github.com/flowpipe/flowpipe/sinks/jetstream"
	jssource "github.com/flowpipe/flowpipe/sources/jetstream"
)

// The tests run real nats-server processes (Debian's nats-server), as a 3-node cluster with
// R3 streams where the test is about replication.

func events(n int) []flow.Event {
	out := make([]flow.Event, n)
	for i := range out {
		out[i] = flow.Event{
			EventID: uuid.New(), FlowID: uuid.New(), Timestamp: flow.Now(),
			SrcAddr: netip.MustParseAddr("100.64.0.1"), DstAddr: netip.MustParseAddr("100.64.0.2"),
			SrcPort: uint16(1024 + i%60000), DstPort: 443, Type: flow.TypeStart, Direction: flow.Egress, Protocol: flow.ProtoTCP,
			RuleID: "r1", SrcResourceID: fmt.Sprintf("res-%d", i%3),
		}
	}
	return out
}

func newSink(t *testing.T, urls []string, stream, subject, format string, mut func(*jssink.Config)) *jssink.Sink {
	t.Helper()
	f := jssink.Factory()
	c := f.NewConfig().(*jssink.Config)
	c.Servers, c.Stream, c.Subject, c.Format = urls, stream, subject, format
	c.CreateStream = &jssink.StreamConfig{Replicas: len(urls)}
	if mut != nil {
		mut(c)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := jssink.New(component.Env{Name: "log", Kind: component.KindSink}, c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	return s
}

func sourceConfig(t *testing.T, urls []string, stream string, mut func(*jssource.Config)) *jssource.Config {
	t.Helper()
	c := jssource.Factory().NewConfig().(*jssource.Config)
	c.Servers, c.Stream, c.Durable = urls, stream, "writers"
	if mut != nil {
		mut(c)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	return c
}

func sourceConfigB(b *testing.B, urls []string, stream string) *jssource.Config {
	c := jssource.Factory().NewConfig().(*jssource.Config)
	c.Servers, c.Stream, c.Durable = urls, stream, "writers"
	return c
}

func newSourceB(b *testing.B, c *jssource.Config) *jssource.Source {
	s, err := jssource.New(component.Env{Name: "log", Kind: component.KindSource}, c)
	if err != nil {
		b.Fatal(err)
	}
	return s
}

func newSource(t *testing.T, env component.Env, c *jssource.Config) *jssource.Source {
	t.Helper()
	env.Name, env.Kind = "log", component.KindSource
	s, err := jssource.New(env, c)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// consumerIdle waits until the consumer has nothing pending or unacknowledged.
func consumerIdle(t *testing.T, urls []string, stream, durable string) {
	t.Helper()
	nc, err := nats.Connect(strings.Join(urls, ","))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	j, _ := js.New(nc)
	var last *js.ConsumerInfo
	waitFor(t, "consumer idle", 15*time.Second, func() bool {
		c, err := j.Consumer(context.Background(), stream, durable)
		if err != nil {
			return false
		}
		last, err = c.Info(context.Background())
		return err == nil && last.NumPending == 0 && last.NumAckPending == 0 && last.NumRedelivered == 0
	})
}

func TestRoundTripEachFormatThroughAnR3Stream(t *testing.T) {
	cl := testenv.StartNATSCluster(t, 3, testenv.NATSAuth{})
	for _, format := range logcodec.Formats {
		t.Run(string(format), func(t *testing.T) {
			stream := "RT_" + strings.ToUpper(string(format))
			sink := newSink(t, cl.URLs(), stream, "rt."+string(format)+".{src_resource_id}", string(format), func(c *jssink.Config) {
				c.MaxMessageSize = 64 << 10 // several messages per batch
			})
			if err := sink.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			in := events(3000)
			for i := 0; i < len(in); i += 1000 {
				if err := sink.Write(context.Background(), flow.NewBatch(in[i:i+1000], nil)); err != nil {
					t.Fatal(err)
				}
			}
			// A batch written again (a retry after a lost acknowledgement) is stored once.
			if err := sink.Write(context.Background(), flow.NewBatch(in[1000:2000], nil)); err != nil {
				t.Fatal(err)
			}
			src := newSource(t, component.Env{}, sourceConfig(t, cl.URLs(), stream, nil))
			var got componenttest.Collector
			componenttest.RunSource(t, src, &got)
			waitFor(t, "3000 events", 15*time.Second, func() bool { return len(got.Events()) >= 3000 })
			consumerIdle(t, cl.URLs(), stream, "writers")
			out := got.Events()
			if len(out) != 3000 {
				t.Fatalf("%d events out of 3000 written (a duplicate passed?)", len(out))
			}
			byID := map[uuid.UUID]flow.Event{}
			for _, e := range out {
				byID[e.EventID] = e
			}
			for _, e := range in {
				g, ok := byID[e.EventID]
				if !ok {
					t.Fatalf("event %s lost", e.EventID)
				}
				g.Source = e.Source
				if g != e {
					t.Fatalf("event changed on the way:\n got %+v\nwant %+v", g, e)
				}
			}
		})
	}
}

// failingEmitter fails the first delivery of each batch it sees for the first time, then
// collects; it stands for a sink that failed once.
type failingEmitter struct {
	mu     sync.Mutex
	seen   map[uuid.UUID]bool
	failed int
	componenttest.Collector
}

func (f *failingEmitter) Emit(ctx context.Context, b *flow.Batch) error {
	f.mu.Lock()
	first := !f.seen[b.Events[0].EventID]
	f.seen[b.Events[0].EventID] = true
	if first {
		f.failed++
	}
	f.mu.Unlock()
	if first {
		b.Release(errors.New("sink failed"))
		return nil
	}
	return f.Collector.Emit(ctx, b)
}

func TestFailedBatchIsRedeliveredAndBadMessagesAreTerminated(t *testing.T) {
	cl := testenv.StartNATSCluster(t, 1, testenv.NATSAuth{})
	sink := newSink(t, cl.URLs(), "BAD", "bad.in", "packed", nil)
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(cl.URLs()[0])
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	j, _ := js.New(nc)
	good, _ := logcodec.Encode(logcodec.Packed, events(10))
	jsonGood, _ := logcodec.Encode(logcodec.JSON, events(3))
	bad := []struct {
		ct   string
		data []byte
	}{
		{logcodec.Packed.ContentType(), []byte("this is not a flowpipe batch")},
		{logcodec.Packed.ContentType(), good[:len(good)-5]}, // truncated
		{"text/plain", []byte("hello")},                     // unknown content type
		{logcodec.Packed.ContentType(), jsonGood},           // wrong format for its header
	}
	for _, b := range bad {
		m := &nats.Msg{Subject: "bad.in", Data: b.data, Header: nats.Header{}}
		m.Header.Set("Content-Type", b.ct)
		if _, err := j.PublishMsg(context.Background(), m); err != nil {
			t.Fatal(err)
		}
	}
	in := events(500)
	if err := sink.Write(context.Background(), flow.NewBatch(in, nil)); err != nil {
		t.Fatal(err)
	}

	var logs testenv.SyncBuffer
	var metrics componenttest.Metrics
	env := component.Env{Logger: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: &metrics}
	src := newSource(t, env, sourceConfig(t, cl.URLs(), "BAD", func(c *jssource.Config) { c.NakDelay = 50 * time.Millisecond }))
	em := &failingEmitter{seen: map[uuid.UUID]bool{}}
	componenttest.RunSource(t, src, em)
	waitFor(t, "the failed batch redelivered", 15*time.Second, func() bool { return len(em.Events()) >= 500 })
	consumerIdle(t, cl.URLs(), "BAD", "writers")
	if n := len(em.Events()); n != 500 || em.failed != 1 {
		t.Fatalf("%d events delivered after %d failures; want 500 after 1", n, em.failed)
	}
	if n := metrics.DroppedCount("malformed_message"); n != len(bad) {
		t.Fatalf("%d messages counted as malformed, want %d; %s", n, len(bad), metrics.String())
	}
	for seq := 1; seq <= len(bad); seq++ {
		want := fmt.Sprintf("subject=bad.in stream_seq=%d", seq)
		if !strings.Contains(logs.String(), want) {
			t.Errorf("no log line naming %q:\n%s", want, logs.String())
		}
	}
	if strings.Count(logs.String(), "terminated") != len(bad) {
		t.Errorf("want %d terminations (each message once, never redelivered):\n%s", len(bad), logs.String())
	}
}

func TestStartErrorsAreClear(t *testing.T) {
	cl := testenv.StartNATSCluster(t, 1, testenv.NATSAuth{User: "flowpipe", Password: "right-password"})
	// A port nobody listens on.
	unreachable := cl.URLs()[0][:strings.LastIndex(cl.URLs()[0], ":")] + ":1"
	cases := []struct {
		name   string
		urls   []string
		user   string
		create bool
		want   string
	}{
		{"unreachable", []string{unreachable}, "right-password", true, "connect to NATS"},
		{"wrong password", cl.URLs(), "wrong-password", true, "refused the credentials"},
		{"missing stream", cl.URLs(), "right-password", false, "does not exist"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			auth := func(c *natsconn.Config) {
				c.Servers, c.User, c.Password, c.ConnectTimeout = tc.urls, "flowpipe", tc.user, time.Second
			}
			sink := newSink(t, tc.urls, "MISSING", "missing.x", "packed", func(c *jssink.Config) {
				auth(&c.Config)
				if !tc.create {
					c.CreateStream = nil
				}
			})
			err := sink.Start(context.Background())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("sink start: %v; want an error with %q", err, tc.want)
			}
			if h := sink.Health(); h == nil || !strings.Contains(h.Error(), tc.want) {
				t.Fatal("sink healthy after a failed start")
			}
			src := newSource(t, component.Env{}, sourceConfig(t, tc.urls, "MISSING", func(c *jssource.Config) { auth(&c.Config) }))
			err = src.Start(context.Background())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("source start: %v; want an error with %q", err, tc.want)
			}
			if h := src.Health(); h == nil || !strings.Contains(h.Error(), tc.want) {
				t.Fatalf("source health %v; want %q", h, tc.want)
			}
			t.Logf("sink: %v", sink.Health())
			t.Logf("source: %v", err)
		})
	}
}

func TestHealthFollowsTheServer(t *testing.T) {
	cl := testenv.StartNATSCluster(t, 1, testenv.NATSAuth{})
	sink := newSink(t, cl.URLs(), "HEALTH", "health.x", "packed", nil)
	if err := sink.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	src := newSource(t, component.Env{}, sourceConfig(t, cl.URLs(), "HEALTH", nil))
	var got componenttest.Collector
	componenttest.RunSource(t, src, &got)
	waitFor(t, "healthy", 5*time.Second, func() bool { return sink.Health() == nil && src.Health() == nil })
	cl.Kill(0)
	waitFor(t, "unhealthy after the server died", 10*time.Second, func() bool { return sink.Health() != nil && src.Health() != nil })
	t.Logf("sink: %v; source: %v", sink.Health(), src.Health())
	cl.Restart(0)
	waitFor(t, "healthy after the server came back", 15*time.Second, func() bool { return sink.Health() == nil && src.Health() == nil })
	if err := sink.Write(context.Background(), flow.NewBatch(events(10), nil)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "events after the restart", 15*time.Second, func() bool { return len(got.Events()) == 10 })
}
