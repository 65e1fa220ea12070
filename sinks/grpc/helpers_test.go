package grpcsink_test

import (
	"context"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

// memEmitter stands in for a pipeline behind the receiver: it keeps every event it is given
// and acknowledges each batch as delivered.
type memEmitter struct {
	mu     sync.Mutex
	seen   map[uuid.UUID]int
	events int
	fail   error // when set, batches are acknowledged with it instead
	change chan struct{}
}

func newMemEmitter() *memEmitter {
	return &memEmitter{seen: map[uuid.UUID]int{}, change: make(chan struct{}, 1)}
}

func (m *memEmitter) Emit(_ context.Context, b *flow.Batch) error {
	m.mu.Lock()
	err := m.fail
	if err == nil {
		for _, e := range b.Events {
			m.seen[e.EventID]++
			m.events++
		}
	}
	m.mu.Unlock()
	b.Release(err)
	select {
	case m.change <- struct{}{}:
	default:
	}
	return nil
}

// counts returns distinct IDs and total events seen.
func (m *memEmitter) counts() (distinct, total int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.seen), m.events
}

func (m *memEmitter) duplicates() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, c := range m.seen {
		if c > 1 {
			n += c - 1
		}
	}
	return n
}

// startReceiver runs a receiver on a loopback port until the test ends.
func startReceiver(t testing.TB, cfg *grpcsrc.Config, out component.Emitter) *grpcsrc.Receiver {
	t.Helper()
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	fillSourceDefaults(t, cfg)
	r, err := grpcsrc.New(component.Env{Name: "collector"}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	componenttest.RunSource(t, r, out)
	return r
}

// fillSourceDefaults decodes cfg over the factory's defaults so tests set only what matters.
func fillSourceDefaults(t testing.TB, cfg *grpcsrc.Config) {
	t.Helper()
	def := grpcsrc.Factory().NewConfig().(*grpcsrc.Config)
	if cfg.MaxStreams == 0 {
		cfg.MaxStreams = def.MaxStreams
	}
	if cfg.MaxMessageSize == 0 {
		cfg.MaxMessageSize = def.MaxMessageSize
	}
	if cfg.MaxBatchMessageSize == 0 {
		cfg.MaxBatchMessageSize = def.MaxBatchMessageSize
	}
	if cfg.MaxUnackedPerStrm == 0 {
		cfg.MaxUnackedPerStrm = def.MaxUnackedPerStrm
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = def.BatchSize
	}
	if cfg.InitiatorTimeout == 0 {
		cfg.InitiatorTimeout, cfg.IdleTimeout, cfg.MaxTokenLifetime = def.InitiatorTimeout, def.IdleTimeout, def.MaxTokenLifetime
	}
	if cfg.BatchDelay == 0 {
		cfg.BatchDelay = def.BatchDelay
	}
	if cfg.Dedup.Window == 0 {
		cfg.Dedup = def.Dedup
	}
	if cfg.KeepaliveTime == 0 {
		cfg.KeepaliveTime, cfg.KeepaliveTimeout, cfg.KeepaliveMinTime = def.KeepaliveTime, def.KeepaliveTimeout, def.KeepaliveMinTime
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
}

func newSink(t testing.TB, cfg *grpcsink.Config) *grpcsink.Sink {
	t.Helper()
	def := grpcsink.Factory().NewConfig().(*grpcsink.Config)
	url, tok, secret, ca, cert, key, sn, inflight, ackTO, proto := cfg.URL, cfg.Token, cfg.HMACSecret, cfg.CAFile, cfg.CertFile, cfg.KeyFile, cfg.ServerName, cfg.MaxInFlight, cfg.AckTimeout, cfg.Protocol
	*cfg = *def
	cfg.URL, cfg.Token, cfg.HMACSecret, cfg.CAFile, cfg.CertFile, cfg.KeyFile, cfg.ServerName = url, tok, secret, ca, cert, key, sn
	if proto != "" {
		cfg.Protocol = proto
	}
	if inflight > 0 {
		cfg.MaxInFlight = inflight
	}
	if ackTO > 0 {
		cfg.AckTimeout = ackTO
	}
	cfg.ReconnectMin, cfg.ReconnectMax = 20*time.Millisecond, 500*time.Millisecond
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := grpcsink.New(component.Env{Name: "agent"}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, cc := context.WithTimeout(context.Background(), 5*time.Second)
		defer cc()
		s.Close(c)
	})
	return s
}

// protocols are the sink's two protocols; the tests that exercise delivery run over each.
var protocols = []string{"flowpipe", "netbird"}

// eachProtocol runs f as a subtest per protocol.
func eachProtocol(t *testing.T, f func(t *testing.T, protocol string)) {
	for _, p := range protocols {
		t.Run(p, func(t *testing.T) { f(t, p) })
	}
}

// makeEvents returns n distinct events.
func makeEvents(n int) []flow.Event {
	ids := flow.NewIDGen()
	now := flow.Now()
	ev := make([]flow.Event, n)
	for i := range ev {
		ev[i] = flow.Event{
			EventID: ids.New(), FlowID: ids.New(), Timestamp: now + flow.Time(i), Type: flow.TypeStart,
			Direction: flow.Egress, Protocol: flow.ProtoTCP,
			SrcAddr: netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}), DstAddr: netip.MustParseAddr("100.64.0.1"),
			SrcPort: uint16(1024 + i%60000), DstPort: 443, RxPackets: uint64(i), TxBytes: uint64(i) * 100,
			RuleID: "rule-7",
		}
	}
	return ev
}

// writeAll writes events through the sink in batches of size, with par Writes in flight.
func writeAll(ctx context.Context, t testing.TB, s component.Sink, events []flow.Event, size, par int) {
	t.Helper()
	var wg sync.WaitGroup
	work := make(chan []flow.Event)
	errs := make(chan error, par)
	for range par {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for evs := range work {
				b := flow.NewBatch(evs, nil)
				if err := s.Write(ctx, b); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for i := 0; i < len(events); i += size {
		select {
		case work <- events[i:min(i+size, len(events))]:
		case err := <-errs:
			close(work)
			wg.Wait()
			t.Fatalf("write: %v", err)
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatalf("write: %v", err)
	default:
	}
}

// waitListening waits until this process (an in-process pipeline) listens on addr: a dial
// would also succeed against another process that took the port after the test chose it.
func waitListening(t testing.TB, addr string) {
	t.Helper()
	if err := testenv.WaitListening(os.Getpid(), "tcp", testenv.Port(t, addr), nil, time.Minute); err != nil {
		t.Fatal(err)
	}
}
