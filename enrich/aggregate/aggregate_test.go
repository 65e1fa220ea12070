package aggregate

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// recorder is a test double for the runtime's downstream emitter (the stages after the
// aggregator): it records every batch it is given and leaves the acknowledgement to the test,
// which calls Release as the runtime does once the sinks have accepted a batch (nil) or
// dropped it (an error). TestEndToEnd runs the real runtime instead.
type recorder struct {
	mu      sync.Mutex
	batches []*flow.Batch
	got     chan struct{}
}

func newRecorder() *recorder { return &recorder{got: make(chan struct{}, 1000)} }

func (r *recorder) Emit(_ context.Context, b *flow.Batch) error {
	r.mu.Lock()
	r.batches = append(r.batches, b)
	r.mu.Unlock()
	r.got <- struct{}{}
	return nil
}

func (r *recorder) take() []*flow.Batch {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.batches
	r.batches = nil
	return out
}

// source is a test source's view of one batch: its acknowledgement.
type source struct {
	acked atomic.Int32
	err   atomic.Pointer[error]
}

func (s *source) ack(err error) {
	s.acked.Add(1)
	if err != nil {
		s.err.Store(&err)
	}
}

func (s *source) result() (int32, error) {
	if p := s.err.Load(); p != nil {
		return s.acked.Load(), *p
	}
	return s.acked.Load(), nil
}

func newAgg(t *testing.T, opts map[string]any) (*Aggregator, *recorder) {
	t.Helper()
	f := Factory()
	cfg := f.NewConfig()
	if errs := config.Decode(opts, cfg, ""); len(errs) > 0 {
		t.Fatal(errs)
	}
	if err := cfg.(*Config).Validate(); err != nil {
		t.Fatal(err)
	}
	c, err := f.New(component.Env{Name: "agg", Metrics: component.NopMetrics{}}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	a := c.(*Aggregator)
	rec := newRecorder()
	a.Attach(rec)
	return a, rec
}

var (
	peer = netip.MustParseAddr("100.64.0.1")
	srv  = netip.MustParseAddr("10.0.0.5")
	srv6 = netip.MustParseAddr("fd00::5")
)

func tcp(typ flow.Type, sport, dport uint16, rx, tx uint64) flow.Event {
	return flow.Event{Type: typ, Protocol: flow.ProtoTCP, Direction: flow.Egress, SrcAddr: peer, DstAddr: srv,
		SrcPort: sport, DstPort: dport, RxPackets: rx, RxBytes: rx * 100, TxPackets: tx, TxBytes: tx * 100, Source: "conntrack"}
}

// runtimeEmit is what the runtime does with a source's batch: run the enricher, pass on what
// is left (here: nowhere, as if every sink accepted it at once) and give up its reference.
func runtimeEmit(t *testing.T, a *Aggregator, b *flow.Batch) []flow.Event {
	t.Helper()
	if err := a.Enrich(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	left := append([]flow.Event(nil), b.Events...)
	b.Release(nil)
	return left
}

func TestAggregatesOneWindow(t *testing.T) {
	a, rec := newAgg(t, map[string]any{"window": "1h"})
	var s1, s2 source
	gre := flow.Event{Type: flow.TypeStart, Protocol: 47, SrcAddr: peer, DstAddr: srv}
	b1 := flow.NewBatch([]flow.Event{
		tcp(flow.TypeStart, 40000, 443, 0, 0),
		gre,
		tcp(flow.TypeEnd, 40000, 443, 10, 20),
		{Type: flow.TypeEnd, Protocol: flow.ProtoUDP, Direction: flow.Egress, SrcAddr: peer, DstAddr: srv, SrcPort: 5000, DstPort: 53, RxPackets: 1, TxPackets: 1},
	}, s1.ack)
	b1.Events[0].Start = 1000
	b1.Events[2].Start, b1.Events[2].End = 1000, 5000
	left := runtimeEmit(t, a, b1)
	if len(left) != 1 || left[0].Protocol != 47 {
		t.Fatalf("passed through %v, want only the GRE event", left)
	}
	if cap(b1.Events) != 1 {
		t.Errorf("a held batch keeps %d events' memory, want only the 1 passing through", cap(b1.Events))
	}
	b2 := flow.NewBatch([]flow.Event{
		tcp(flow.TypeEnd, 40001, 443, 1, 2), // same key, other source port
		tcp(flow.TypeDrop, 40002, 443, 1, 0),
		{Type: flow.TypeStart, Protocol: flow.ProtoICMPv6, Direction: flow.Ingress, SrcAddr: srv6, DstAddr: srv6, ICMPType: 128},
	}, s2.ack)
	b2.Events[0].Start, b2.Events[0].End = 500, 4000
	if left := runtimeEmit(t, a, b2); len(left) != 0 {
		t.Fatalf("passed through %v, want nothing", left)
	}
	if b2.Events != nil {
		t.Error("a fully absorbed batch still references its events while held")
	}
	if n, _ := s1.result(); n != 0 {
		t.Fatal("a batch was acknowledged before its aggregates were emitted")
	}

	a.closeWindow(context.Background(), "tick")
	out := rec.take()
	if len(out) != 1 {
		t.Fatalf("emitted %d batches, want 1", len(out))
	}
	byKey := map[string]flow.Event{}
	for _, ev := range out[0].Events {
		byKey[ev.DstAddr.String()+"/"+flowProto(ev.Protocol)] = ev
		if ev.Type != flow.TypeAggregate || ev.WindowStart == 0 || ev.WindowEnd < ev.WindowStart || ev.EventID == ([16]byte{}) {
			t.Errorf("not a proper aggregate: %+v", ev)
		}
	}
	if len(byKey) != 3 {
		t.Fatalf("got %d aggregates, want 3 (tcp/443, udp/53, icmpv6): %+v", len(out[0].Events), out[0].Events)
	}
	g := byKey["10.0.0.5/tcp"]
	want := flow.Event{NumStarts: 1, NumEnds: 2, NumDrops: 1, RxPackets: 12, RxBytes: 1200, TxPackets: 22, TxBytes: 2200, DstPort: 443, Start: 500, End: 5000, Source: "conntrack"}
	if g.NumStarts != want.NumStarts || g.NumEnds != want.NumEnds || g.NumDrops != want.NumDrops ||
		g.RxPackets != want.RxPackets || g.RxBytes != want.RxBytes || g.TxPackets != want.TxPackets || g.TxBytes != want.TxBytes ||
		g.DstPort != 443 || g.SrcPort != 0 || g.Start != want.Start || g.End != want.End || g.Source != "conntrack" || g.Direction != flow.Egress {
		t.Errorf("tcp aggregate = %+v\nwant counts %+v", g, want)
	}
	if u := byKey["10.0.0.5/udp"]; u.NumEnds != 1 || u.SrcPort != 5000 || u.DstPort != 53 {
		t.Errorf("udp aggregate = %+v", u)
	}
	if ic := byKey["fd00::5/icmpv6"]; ic.NumStarts != 1 || ic.ICMPType != 128 || ic.Direction != flow.Ingress {
		t.Errorf("icmpv6 aggregate = %+v", ic)
	}

	if n, _ := s1.result(); n != 0 {
		t.Fatal("inputs acknowledged before the aggregates were")
	}
	out[0].Release(nil) // the sinks accepted the aggregates
	for _, s := range []*source{&s1, &s2} {
		if n, err := s.result(); n != 1 || err != nil {
			t.Errorf("source ack: %d times, err %v; want once with nil", n, err)
		}
	}

	// An empty window emits nothing.
	a.closeWindow(context.Background(), "tick")
	if out := rec.take(); len(out) != 0 {
		t.Errorf("empty window emitted %d batches", len(out))
	}
}

func flowProto(p uint8) string {
	return map[uint8]string{6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}[p]
}

func TestAckCarriesSinkResult(t *testing.T) {
	for _, tc := range []struct {
		name string
		errs []error // one per emitted batch
		want error
	}{
		{"accepted", []error{nil, nil, nil}, nil},
		{"dropped by a sink", []error{nil, &flow.DropError{Component: "file", Reason: "queue_full"}, nil}, &flow.DropError{}},
		{"shutdown", []error{flow.ErrShutdown, nil, nil}, flow.ErrShutdown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// batch_size 2 with 5 keys: the window goes out as 3 batches, and the input is
			// acknowledged only when all 3 are, with the first error.
			a, rec := newAgg(t, map[string]any{"window": "1h", "batch_size": 2})
			var s source
			var evs []flow.Event
			for p := uint16(1); p <= 5; p++ {
				evs = append(evs, tcp(flow.TypeEnd, 1, p, 1, 1))
			}
			runtimeEmit(t, a, flow.NewBatch(evs, s.ack))
			a.closeWindow(context.Background(), "tick")
			out := rec.take()
			if len(out) != 3 || out[0].Len() != 2 || out[2].Len() != 1 {
				t.Fatalf("emitted %d batches, want sizes 2, 2, 1", len(out))
			}
			for i, b := range out {
				if n, _ := s.result(); n != 0 {
					t.Fatalf("acknowledged after %d of 3 batches", i)
				}
				b.Release(tc.errs[i])
			}
			n, err := s.result()
			if n != 1 {
				t.Fatalf("acknowledged %d times, want once", n)
			}
			switch want := tc.want.(type) {
			case nil:
				if err != nil {
					t.Errorf("ack err = %v, want nil", err)
				}
			case *flow.DropError:
				if !flow.IsDrop(err) {
					t.Errorf("ack err = %v, want a drop", err)
				}
			default:
				if !errors.Is(err, want) {
					t.Errorf("ack err = %v, want %v", err, want)
				}
			}
		})
	}
}

// TestBatchSpansTwoWindows: max_keys closes the window in the middle of a batch, so the
// batch's events end up in two windows; it is acknowledged only after both are.
func TestBatchSpansTwoWindows(t *testing.T) {
	a, rec := newAgg(t, map[string]any{"window": "1h", "max_keys": 2})
	var s0, s1 source
	runtimeEmit(t, a, flow.NewBatch([]flow.Event{tcp(flow.TypeEnd, 1, 1, 1, 1)}, s0.ack))
	runtimeEmit(t, a, flow.NewBatch([]flow.Event{
		tcp(flow.TypeEnd, 1, 1, 1, 1), // existing key: first window
		tcp(flow.TypeEnd, 1, 2, 1, 1), // second key: first window, now full
		tcp(flow.TypeEnd, 1, 3, 1, 1), // third key: closes the first window, opens the second
		tcp(flow.TypeEnd, 1, 1, 1, 1), // key 1 again, now in the second window
	}, s1.ack))
	first := rec.take()
	if len(first) != 1 || first[0].Len() != 2 {
		t.Fatalf("max_keys: emitted %d batches, want one of 2 aggregates", len(first))
	}
	sum := func(bs []*flow.Batch) (n uint64) {
		for _, b := range bs {
			for _, ev := range b.Events {
				n += ev.NumEnds
			}
		}
		return n
	}
	if got := sum(first); got != 3 {
		t.Errorf("first window folded %d events, want 3", got)
	}
	first[0].Release(nil)
	if n, _ := s0.result(); n != 1 {
		t.Errorf("batch 0 (first window only) acked %d times, want 1", n)
	}
	if n, _ := s1.result(); n != 0 {
		t.Fatal("batch 1 acknowledged while its second window is still open")
	}
	a.closeWindow(context.Background(), "tick")
	second := rec.take()
	if got := sum(second); got != 2 {
		t.Errorf("second window folded %d events, want 2", got)
	}
	for _, b := range second {
		b.Release(nil)
	}
	if n, err := s1.result(); n != 1 || err != nil {
		t.Errorf("batch 1 acked %d times (err %v), want once", n, err)
	}
}

func TestByRuleID(t *testing.T) {
	for _, tc := range []struct {
		byRule bool
		rules  []string // rule IDs of the emitted aggregates
	}{
		{false, []string{""}}, // one key; the rule IDs differ, so none is claimed
		{true, []string{"r1", "r2"}},
	} {
		a, rec := newAgg(t, map[string]any{"window": "1h", "by_rule_id": tc.byRule})
		e1, e2, e3 := tcp(flow.TypeEnd, 1, 80, 1, 1), tcp(flow.TypeEnd, 2, 80, 1, 1), tcp(flow.TypeEnd, 3, 80, 1, 1)
		e1.RuleID, e2.RuleID, e3.RuleID = "r1", "r2", "r1"
		runtimeEmit(t, a, flow.NewBatch([]flow.Event{e1, e2, e3}, nil))
		a.closeWindow(context.Background(), "tick")
		out := rec.take()
		var got []string
		for _, ev := range out[0].Events {
			got = append(got, ev.RuleID)
		}
		if len(got) != len(tc.rules) {
			t.Fatalf("by_rule_id=%v: aggregates with rules %q, want %q", tc.byRule, got, tc.rules)
		}
		for i := range got {
			if got[i] != tc.rules[i] {
				t.Errorf("by_rule_id=%v: aggregates with rules %q, want %q", tc.byRule, got, tc.rules)
			}
		}
		if tc.byRule && out[0].Events[0].FlowID == out[0].Events[1].FlowID {
			t.Error("different keys share a flow_id")
		}
		out[0].Release(nil)
	}
}

func TestFlowIDStableAcrossWindows(t *testing.T) {
	a, rec := newAgg(t, map[string]any{"window": "1h"})
	var ids [2]flow.Event
	for i := range ids {
		runtimeEmit(t, a, flow.NewBatch([]flow.Event{tcp(flow.TypeEnd, uint16(i+1), 80, 1, 1)}, nil))
		a.closeWindow(context.Background(), "tick")
		out := rec.take()
		ids[i] = out[0].Events[0]
		out[0].Release(nil)
	}
	if ids[0].FlowID != ids[1].FlowID || ids[0].EventID == ids[1].EventID {
		t.Errorf("flow IDs %v / %v should match, event IDs %v / %v differ", ids[0].FlowID, ids[1].FlowID, ids[0].EventID, ids[1].EventID)
	}
}

func TestCloseFlushesAndThenPassesThrough(t *testing.T) {
	a, rec := newAgg(t, map[string]any{"window": "1h"})
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	var s source
	runtimeEmit(t, a, flow.NewBatch([]flow.Event{tcp(flow.TypeEnd, 1, 80, 1, 1)}, s.ack))
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	out := rec.take()
	if len(out) != 1 || out[0].Len() != 1 {
		t.Fatalf("Close emitted %d batches, want the open window", len(out))
	}
	out[0].Release(nil)
	if n, err := s.result(); n != 1 || err != nil {
		t.Errorf("source acked %d (err %v) after the flushed window was acknowledged", n, err)
	}
	// After Close nothing would flush a window again: events pass through.
	b := flow.NewBatch([]flow.Event{tcp(flow.TypeEnd, 1, 80, 1, 1)}, nil)
	if left := runtimeEmit(t, a, b); len(left) != 1 {
		t.Errorf("after Close: %d events passed through, want 1", len(left))
	}
	if err := a.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestClockClosesWindows runs the real window clock with a short window, several sources
// enriching at once, and the recorder acknowledging as it goes: every event must be counted
// in exactly one aggregate, and every input batch acknowledged once, after its aggregates.
func TestClockClosesWindows(t *testing.T) {
	a, rec := newAgg(t, map[string]any{"window": "10ms", "max_keys": 50})
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	const workers, batches, perBatch = 4, 50, 40
	var acks atomic.Int32
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range batches {
				evs := make([]flow.Event, perBatch)
				for k := range evs {
					evs[k] = tcp(flow.TypeEnd, uint16(w), uint16(1+(i*perBatch+k)%97), 1, 0)
				}
				b := flow.NewBatch(evs, func(err error) {
					if err != nil {
						t.Errorf("ack: %v", err)
					}
					acks.Add(1)
				})
				if err := a.Enrich(context.Background(), b); err != nil {
					t.Error(err)
				}
				b.Release(nil)
			}
		}()
	}
	var folded uint64
	var windows int
	stopAcking := make(chan struct{})
	ackerDone := make(chan struct{})
	go func() {
		defer close(ackerDone)
		for {
			select {
			case <-rec.got:
				for _, b := range rec.take() {
					for _, ev := range b.Events {
						folded += ev.RxPackets
					}
					windows++
					b.Release(nil)
				}
			case <-stopAcking:
				return
			}
		}
	}()
	wg.Wait()
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	close(stopAcking)
	<-ackerDone
	for _, b := range rec.take() {
		for _, ev := range b.Events {
			folded += ev.RxPackets
		}
		b.Release(nil)
	}
	if want := uint64(workers * batches * perBatch); folded != want {
		t.Errorf("aggregates carry %d events, want %d", folded, want)
	}
	if got := acks.Load(); got != workers*batches {
		t.Errorf("%d input batches acknowledged, want %d", got, workers*batches)
	}
	if windows < 2 {
		t.Errorf("only %d batches of aggregates: the clock or max_keys never closed a window", windows)
	}
	if n := a.heldN.Load(); n != 0 {
		t.Errorf("%d input batches still held", n)
	}
}

func TestValidate(t *testing.T) {
	cfg := DefaultConfig()
	if errs := config.Decode(map[string]any{"window": "0s", "max_keys": 0, "batch_size": 0}, cfg, ""); len(errs) > 0 {
		t.Fatal(errs)
	}
	fe, _ := cfg.Validate().(config.FieldErrors)
	paths := map[string]bool{}
	for _, e := range fe {
		paths[e.Path] = true
	}
	for _, p := range []string{"window", "max_keys", "batch_size"} {
		if !paths[p] {
			t.Errorf("no problem reported at %s: %v", p, fe)
		}
	}
}

func BenchmarkEnrichPerEvent(b *testing.B) {
	a, rec := newAggB(b)
	evs := make([]flow.Event, 1000)
	src := make([]flow.Event, 1000)
	for i := range src {
		src[i] = tcp(flow.TypeEnd, uint16(i), uint16(1+i%500), 3, 4)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		copy(evs, src)
		batch := flow.NewBatch(evs, nil)
		_ = a.Enrich(context.Background(), batch)
		batch.Release(nil)
		if i%100 == 99 {
			a.closeWindow(context.Background(), "tick")
			for _, o := range rec.take() {
				o.Release(nil)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(src)), "ns/event")
}

func newAggB(b *testing.B) (*Aggregator, *recorder) {
	a, err := New(component.Env{Name: "agg", Metrics: component.NopMetrics{}}, DefaultConfig())
	if err != nil {
		b.Fatal(err)
	}
	rec := newRecorder()
	rec.got = make(chan struct{}, 1<<20)
	a.Attach(rec)
	return a, rec
}

var _ = time.Second

func TestFlowIDIsUUIDv5OfTheKey(t *testing.T) {
	g := tcp(flow.TypeEnd, 1, 443, 0, 0)
	g.Type = flow.TypeAggregate
	s, d := g.SrcAddr.As16(), g.DstAddr.As16()
	name := append(append(append([]byte{}, s[:]...), d[:]...), 1, 187, flow.ProtoTCP, byte(flow.Egress))
	name = append(name, "r1"...)
	if got, want := flowID(&g, "r1"), uuid.NewSHA1(flowNamespace, name); got != want {
		t.Errorf("flowID = %v, want %v", got, want)
	}
}

// TestRandomizedAcks drives the aggregator with random batches (mixed protocols, random
// keys), random window closes and a small max_keys, acknowledging emitted batches in random
// order with random results. Invariants: every event is either passed through or counted in
// exactly one aggregate; every input batch is acknowledged exactly once, never before every
// aggregate batch carrying its events was acknowledged, and with an error exactly when a
// batch of a window holding its events was acknowledged with one (a window's result is
// shared: when it is unknown which chunk held which events, an error must not be lost).
func TestRandomizedAcks(t *testing.T) {
	rng := rand.New(rand.NewPCG(42, 7))
	for round := 0; round < 30; round++ {
		a, rec := newAgg(t, map[string]any{"window": "1h", "max_keys": 1 + rng.IntN(20), "batch_size": 1 + rng.IntN(8)})
		type input struct {
			src      source
			b        *flow.Batch
			failed   bool // some aggregate carrying its events was acked with an error
			inFlight map[*flow.Batch]bool
		}
		var inputs []*input
		carriers := map[*flow.Batch][]*input{} // emitted batch -> inputs of its window
		type windowID struct{ start, end flow.Time }
		windowOf := map[*flow.Batch]windowID{}
		windowInputs := map[windowID]map[*input]bool{}
		var pending []*flow.Batch
		var absorbed, passed, folded, left uint64
		// collect attributes each new emitted batch to the inputs whose events it carries,
		// by the marker in TxBytes (input index).
		collect := func() {
			for _, out := range rec.take() {
				seen := map[int]bool{}
				w := windowID{out.Events[0].WindowStart, out.Events[0].WindowEnd}
				windowOf[out] = w
				if windowInputs[w] == nil {
					windowInputs[w] = map[*input]bool{}
				}
				for _, ev := range out.Events {
					folded += ev.TxPackets
					// TxBytes sums the input indexes+1 of the events; single-input keys keep it
					// exact: every key below is unique to one input.
					seen[int(ev.TxBytes/ev.TxPackets)-1] = true
				}
				for i := range seen {
					carriers[out] = append(carriers[out], inputs[i])
					inputs[i].inFlight[out] = true
					windowInputs[w][inputs[i]] = true
				}
				pending = append(pending, out)
			}
		}
		for step := 0; step < 60; step++ {
			switch r := rng.IntN(10); {
			case r < 6: // a source batch
				in := &input{inFlight: map[*flow.Batch]bool{}}
				idx := len(inputs)
				inputs = append(inputs, in)
				var evs []flow.Event
				for k := 0; k < rng.IntN(12); k++ {
					proto := []uint8{flow.ProtoTCP, flow.ProtoUDP, flow.ProtoICMP, 47}[rng.IntN(4)]
					ev := flow.Event{Type: flow.TypeEnd, Protocol: proto, SrcAddr: peer,
						DstAddr:   netip.AddrFrom4([4]byte{10, byte(idx >> 8), byte(idx), byte(rng.IntN(4))}),
						TxPackets: 1, TxBytes: uint64(idx + 1)}
					if proto == 47 {
						passed++
					} else {
						absorbed++
					}
					evs = append(evs, ev)
				}
				in.b = flow.NewBatch(evs, in.src.ack)
				for _, ev := range runtimeEmit(t, a, in.b) {
					if ev.Protocol != 47 {
						t.Fatalf("round %d: protocol %d passed through", round, ev.Protocol)
					}
					left++
				}
				collect()
			case r < 7:
				a.closeWindow(context.Background(), "tick")
				collect()
			default: // acknowledge a random emitted batch
				if len(pending) == 0 {
					continue
				}
				i := rng.IntN(len(pending))
				out := pending[i]
				pending = append(pending[:i], pending[i+1:]...)
				var err error
				if rng.IntN(5) == 0 {
					err = flow.ErrShutdown
				}
				for _, in := range carriers[out] {
					delete(in.inFlight, out)
				}
				if err != nil {
					for in := range windowInputs[windowOf[out]] {
						in.failed = true
					}
				}
				out.Release(err)
			}
			// No input may be acknowledged while an aggregate carrying its events is not.
			for i, in := range inputs {
				if n, _ := in.src.result(); n > 0 && len(in.inFlight) > 0 {
					t.Fatalf("round %d: input %d acknowledged with %d aggregate batches outstanding", round, i, len(in.inFlight))
				}
			}
		}
		if err := a.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		collect()
		for _, out := range pending {
			for _, in := range carriers[out] {
				delete(in.inFlight, out)
			}
			out.Release(nil)
		}
		if folded != absorbed {
			t.Errorf("round %d: aggregates carry %d events, %d were absorbed", round, folded, absorbed)
		}
		for i, in := range inputs {
			n, err := in.src.result()
			if n != 1 {
				t.Errorf("round %d: input %d acknowledged %d times", round, i, n)
			}
			if (err != nil) != in.failed {
				t.Errorf("round %d: input %d acknowledged with %v, failed=%v", round, i, err, in.failed)
			}
		}
		if n := a.heldN.Load(); n != 0 {
			t.Errorf("round %d: %d batches still held", round, n)
		}
		if left != passed {
			t.Errorf("round %d: %d events passed through, want %d", round, left, passed)
		}
	}
}
