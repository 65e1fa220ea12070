package conntrack

import (
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// BenchmarkDecodeAndTrack measures the reader's per-event work on messages captured from a
// real kernel: netlink parsing, conntrack decoding, tracking and event building, and the
// queue. One op is one datagram (half NEW, half DESTROY). cpu-ns/op is the process's CPU time
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
			for evs, _ := q.pop(0, true); evs != nil; evs, _ = q.pop(0, true) {
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
