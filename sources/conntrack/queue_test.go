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
