package dedup

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// BenchmarkWindowSteadyState: a window of a million delivered IDs (full, so that every
// settled batch pushes as many out), batches of 1,024 new IDs admitted and then settled as
// delivered, as the gRPC collector does; ns/op and cpu-ns/op are per event (the process's
// CPU time, which a loaded machine inflates less than the wall clock). "maps" is the structure of
// before (a map of IDs in flight, a map of delivered ones, the same ring).
func BenchmarkWindowSteadyState(b *testing.B) {
	const window, batch = 1_000_000, 1024
	ids := make([]uuid.UUID, window+batch*64)
	for i := range ids {
		ids[i] = uuid.New()
	}
	now := time.Unix(1_700_000_000, 0)
	b.Run("table", func(b *testing.B) {
		w := NewWindow(time.Hour, window)
		defer w.Close()
		for i := 0; i < window; i += batch {
			w.Add(ids[i:i+batch], now)
		}
		b.ResetTimer()
		cpu0 := testenv.CPUNanos()
		defer func() { b.ReportMetric(float64(testenv.CPUNanos()-cpu0)/float64(b.N), "cpu-ns/op") }()
		next := window
		for done := 0; done < b.N; done += batch {
			if next+batch > len(ids) {
				next = 0
			}
			run := ids[next : next+batch]
			next += batch
			for _, id := range run {
				w.Admit(id)
			}
			w.Settle(run, true, now, nil)
		}
	})
	b.Run("maps", func(b *testing.B) {
		g := &refGate{dur: time.Hour, max: window, pending: map[uuid.UUID]bool{}, ids: map[uuid.UUID]bool{}}
		for i := 0; i < window; i += batch {
			for _, id := range ids[i : i+batch] {
				g.admit(id)
			}
			g.settle(ids[i:i+batch], true, now)
		}
		b.ResetTimer()
		cpu0 := testenv.CPUNanos()
		defer func() { b.ReportMetric(float64(testenv.CPUNanos()-cpu0)/float64(b.N), "cpu-ns/op") }()
		next := window
		for done := 0; done < b.N; done += batch {
			if next+batch > len(ids) {
				next = 0
			}
			run := ids[next : next+batch]
			next += batch
			for _, id := range run {
				g.admit(id)
			}
			g.settle(run, true, now)
			if len(g.done) > 2*window { // the reference's FIFO is a slice: keep it bounded
				g.done = append([]Rec(nil), g.done...)
			}
		}
	})
}
