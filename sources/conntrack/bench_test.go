package conntrack

import (
	"net/netip"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// BenchmarkDecodeAndTrack measures the reader's per-event work on messages captured from a
// real kernel: netlink parsing, conntrack decoding, tracking and event building, and the
// queue, whose chunks come back once acknowledged. One op is one datagram (half NEW, half
// DESTROY). cpu-ns/op is the process's CPU time
// per op (the GC's included).
func BenchmarkDecodeAndTrack(b *testing.B) {
	seeds := kernelSeeds(b)
	cfg := defaultConfig()
	if err := cfg.Validate(); err != nil {
		b.Fatal(err)
	}
	q := newQueue(cfg.BatchSize, 1<<30)
	tr := newTracker(cfg, func(e *flow.Event, _ bool) { q.push(e) })
	var st stats
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := testenv.CPUNanos()
	for i := 0; b.Loop(); i++ {
		tr.onMessages(seeds[i%len(seeds)], flow.Time(i), &st)
		if i%cfg.BatchSize == 0 {
			// What the pipeline's acknowledgement does: the chunk comes back.
			for evs, _ := q.pop(0, true); evs != nil; evs, _ = q.pop(0, true) {
				q.recycle(evs)
			}
		}
	}
	b.ReportMetric(float64(testenv.CPUNanos()-cpu0)/float64(b.N), "cpu-ns/op")
}

// BenchmarkDecode measures the native decoder alone on the same datagrams: one op is one
// datagram.
func BenchmarkDecode(b *testing.B) {
	seeds := kernelSeeds(b)
	var d ctDecoder
	var f ctFlow
	n := 0
	b.ReportAllocs()
	cpu0 := testenv.CPUNanos()
	for i := 0; b.Loop(); i++ {
		sp := nlSplit{b: seeds[i%len(seeds)]}
		for {
			typ, flags, data, ok := sp.next()
			if !ok {
				break
			}
			if _, ok := d.decodeMessage(typ, flags, data, &f); ok {
				n++
			}
		}
	}
	b.ReportMetric(float64(testenv.CPUNanos()-cpu0)/float64(b.N), "cpu-ns/op")
	if n == 0 {
		b.Fatal("nothing decoded")
	}
}

// BenchmarkTrackBurst measures the tracker on a burst as scripts/bench-conntrack.sh makes
// one: 20,000 connections opened (NEW), then all of them ended (DESTROY), so that the table
// of known connections grows to the burst's size and empties again. One op is one event;
// decoding is left out (BenchmarkDecode).
func BenchmarkTrackBurst(b *testing.B) {
	const flows = 20000
	cfg := defaultConfig()
	if err := cfg.Validate(); err != nil {
		b.Fatal(err)
	}
	q := newQueue(cfg.BatchSize, 1<<30)
	tr := newTracker(cfg, func(e *flow.Event, _ bool) { q.push(e) })
	fs := make([]ctFlow, flows)
	for i := range fs {
		f := &fs[i]
		f.id = uint32(i * 2654435761)
		f.orig.src, f.orig.dst = netip.AddrFrom4([4]byte{10, 250, 0, 1}), netip.AddrFrom4([4]byte{10, 250, 0, 2})
		f.orig.proto, f.orig.sport, f.orig.dport = flow.ProtoUDP, uint16(20000+i), 9000
		f.reply = f.orig
	}
	drain := func() {
		for evs, _ := q.pop(0, true); evs != nil; evs, _ = q.pop(0, true) {
			q.recycle(evs)
		}
	}
	b.ReportAllocs()
	cpu0 := testenv.CPUNanos()
	n := 0
	for b.Loop() {
		if n%(2*flows) < flows {
			tr.onNew(&fs[n%flows], flow.Time(n))
		} else {
			tr.onDestroy(&fs[n%flows], flow.Time(n))
		}
		if n++; n%cfg.BatchSize == 0 {
			drain()
		}
	}
	b.ReportMetric(float64(testenv.CPUNanos()-cpu0)/float64(b.N), "cpu-ns/op")
}
