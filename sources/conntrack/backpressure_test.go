package conntrack

import (
	"context"
	"net/netip"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/sources/conntrack/internal/flood"
)

// gatedEmitter blocks every Emit until the gate opens, like a pipeline whose sinks are stuck.
type gatedEmitter struct {
	gate chan struct{}
	collector
}

func (g *gatedEmitter) Emit(ctx context.Context, b *flow.Batch) error {
	select {
	case <-g.gate:
	case <-ctx.Done():
		b.Release(flow.ErrShutdown)
		return ctx.Err()
	}
	return g.collector.Emit(ctx, b)
}

// TestBackpressureDoesNotStopReading blocks Emit while 2,000 flows are opened: the reader
// must keep draining the kernel socket into its queue meanwhile, and everything must be
// emitted once the pipeline moves again.
func TestBackpressureDoesNotStopReading(t *testing.T) {
	p := newPair(t)
	out := &gatedEmitter{gate: make(chan struct{})}
	r := startSourceWith(t, map[string]any{"netns": p.A, "activate": true, "batch_size": 100}, out)
	s := r.src
	// Open the gate before stopping, so the final flush is not stuck behind it.
	defer r.stop()
	defer func() {
		select {
		case <-out.gate:
		default:
			close(out.gate)
		}
	}()

	srv, stop := udpSink(t, p.B, p.B4+":0")
	defer stop()
	const n, first = 2000, 30000
	inNS(t, p.A, func() error { return flood.UDP(netip.Addr{}, srv.AddrPort(), first, n, 16) })
	waitFor(t, "the reader to read 2,000 NEW events while Emit is blocked",
		func() bool { return s.stats.newEvents.Load() >= n }, nil)
	if q := s.q.len(); q < n-100 { // one batch may be inside the blocked Emit
		t.Fatalf("%d events queued while the pipeline was blocked, want about %d", q, n)
	}
	close(out.gate)
	waitFor(t, "2,000 starts emitted", func() bool {
		st, _ := byFlow(out.Events(), func(e *flow.Event) bool { return e.SrcPort >= first && e.SrcPort < first+n })
		return len(st) == n
	}, nil)
	if o := s.stats.overruns.Load(); o != 0 {
		t.Logf("note: %d overruns (resynced)", o)
	}
}

// TestReconnect closes the event socket under the reader, as a netlink error would end it:
// the reader reopens it with backoff, resyncs, and keeps reporting flows.
func TestReconnect(t *testing.T) {
	p := newPair(t)
	r := startSource(t, map[string]any{"netns": p.A, "activate": true, "flush_interval": "10ms"})
	r.src.currentEvents().close()
	waitFor(t, "the reader to reconnect", func() bool { return r.src.stats.reconnects.Load() >= 1 }, nil)
	srv, stop := udpEcho(t, p, p.B, p.B4+":0")
	defer stop()
	client := udpExchange(t, p.A, srv, 1, 10)
	match := func(e *flow.Event) bool { return e.Protocol == flow.ProtoUDP && e.SrcPort == client.Port() }
	waitFor(t, "the flow's end after the reconnect", func() bool {
		_, e := byFlow(r.out.Events(), match)
		return len(e) == 1
	}, dumpNS(p, p.A))
	r.stop()
	if s, e := byFlow(r.out.Events(), match); len(s) != 1 || len(e) != 1 || s[0].FlowID != e[0].FlowID {
		t.Fatalf("%d starts %d ends after reconnect", len(s), len(e))
	}
	if r.met.ErrorCount("netlink_read") == 0 {
		t.Error("the socket failure was not counted")
	}
}
