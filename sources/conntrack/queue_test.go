package conntrack

import (
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
)

func TestQueue(t *testing.T) {
	q := newQueue(2, 3)
	for i := 0; i < 3; i++ {
		if !q.push(&flow.Event{SrcPort: uint16(i)}) {
			t.Fatalf("push %d refused below the bound", i)
		}
	}
	if q.push(&flow.Event{}) {
		t.Fatal("push past max_pending accepted")
	}
	evs, _ := q.pop(time.Hour, false)
	if len(evs) != 2 || evs[0].SrcPort != 0 || evs[1].SrcPort != 1 {
		t.Fatalf("first batch %+v", evs)
	}
	// The partial chunk waits for its linger...
	if evs, wait := q.pop(time.Hour, false); evs != nil || wait <= 0 {
		t.Fatalf("partial chunk popped early: %v, wait %v", evs, wait)
	}
	// ...unless forced (shutdown) or past the linger.
	if evs, _ := q.pop(0, false); len(evs) != 1 || evs[0].SrcPort != 2 {
		t.Fatalf("partial chunk %+v", evs)
	}
	if q.len() != 0 || !q.push(&flow.Event{}) {
		t.Fatal("queue not empty and usable after popping everything")
	}
}

// A chunk comes back for reuse only once its batch is acknowledged, and a quiet queue lets
// its free chunks go.
func TestQueueReusesAcknowledgedChunks(t *testing.T) {
	q := newQueue(2, 100)
	fill := func(port uint16) *flow.Batch {
		t.Helper()
		q.push(&flow.Event{SrcPort: port})
		q.push(&flow.Event{SrcPort: port + 1})
		evs, _ := q.pop(time.Hour, false)
		if len(evs) != 2 {
			t.Fatalf("pop: %d events", len(evs))
		}
		return q.batch(evs)
	}
	first := fill(10)
	second := fill(20) // first is not acknowledged: a new chunk
	if &second.Events[0] == &first.Events[0] {
		t.Fatal("an unacknowledged batch's events were reused")
	}
	if first.Events[0].SrcPort != 10 || first.Events[1].SrcPort != 11 {
		t.Fatalf("unacknowledged batch changed: %+v", first.Events)
	}
	first.Release(nil)
	third := fill(30)
	if &third.Events[0] != &first.Events[0] {
		t.Fatal("the acknowledged chunk was not reused")
	}
	if third.Events[0].SrcPort != 30 || second.Events[0].SrcPort != 20 {
		t.Fatalf("events: third %+v, second %+v", third.Events, second.Events)
	}
	second.Release(nil)
	q.trim() // a chunk was reused since the last trim: the free one stays
	if len(q.free) != 1 {
		t.Fatalf("%d free chunks after a busy second, want 1", len(q.free))
	}
	for i := 1; i < freeTrims; i++ {
		q.trim() // quiet seconds, but not yet enough of them
	}
	if len(q.free) != 1 {
		t.Fatalf("%d free chunks after %d quiet seconds, want 1", len(q.free), freeTrims-1)
	}
	q.trim()
	if len(q.free) != 0 {
		t.Fatalf("%d free chunks after %d quiet seconds, want 0", len(q.free), freeTrims)
	}
}
