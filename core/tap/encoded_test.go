package tap

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
)

func portEvents(from, n int) []flow.Event {
	evs := make([]flow.Event, n)
	for i := range evs {
		evs[i] = flow.Event{SrcPort: uint16(from + i), Source: "src"}
	}
	return evs
}

// A tap point with a ring and no subscriber keeps an undecoded batch's encoding and decodes
// it only when the ring is read; batches decoded and undecoded, in any order, end in the
// ring in the order they passed. A subscriber has undecoded batches decoded for it.
func TestPublishBatchDecodesOnlyWhenNeeded(t *testing.T) {
	var decodes atomic.Int32
	decode := func(dst []flow.Event, data []byte, n int) ([]flow.Event, error) {
		decodes.Add(1)
		return codec.Decode(dst, data, n)
	}
	encoded := func(from, n int) *flow.Batch {
		return flow.NewEncodedBatch(codec.Append(nil, portEvents(from, n)), n, true, decode, nil)
	}
	h := NewRegistry(10).Point("src", "source")
	var batches []*flow.Batch
	from := 0
	for i, n := range []int{3, 3, 12, 3, 3, 3} { // the third is decoded (by a sink, say)
		b := encoded(from, n)
		from += n
		if i == 2 {
			if err := b.Decode(); err != nil {
				t.Fatal(err)
			}
		}
		h.PublishBatch(b)
		batches = append(batches, b)
	}
	for i, b := range batches {
		if want := i != 2; b.Undecoded() != want {
			t.Fatalf("batch %d: undecoded %v after publishing, want %v", i, b.Undecoded(), want)
		}
	}
	if n := decodes.Load(); n != 1 {
		t.Fatalf("%d decodings while publishing, want 1 (the batch decoded by its sinks)", n)
	}
	recs := h.Last(nil, 0, 0)
	if len(recs) != 10 {
		t.Fatalf("ring holds %d records, want 10", len(recs))
	}
	for i, r := range recs {
		if want := uint16(from - 10 + i); r.Event.SrcPort != want {
			t.Fatalf("ring record %d is event %d, want %d", i, r.Event.SrcPort, want)
		}
	}
	if n := decodes.Load(); n != 4 {
		t.Fatalf("%d decodings once the ring was read, want 4 (the three kept after the decoded batch)", n)
	}
	// Kept batches that later ones fill the ring without are never decoded.
	for range 5 {
		h.PublishBatch(encoded(from, 10))
		from += 10
	}
	if recs := h.Last(nil, 0, 0); len(recs) != 10 || recs[0].Event.SrcPort != uint16(from-10) || decodes.Load() != 5 {
		t.Fatalf("ring after five batches of 10: %d records from %d, %d decodings; want 10 from %d, 5 decodings",
			len(recs), recs[0].Event.SrcPort, decodes.Load(), from-10)
	}

	sub, _ := h.Subscribe(nil, 100, false, 0, 0)
	defer sub.Close()
	b := encoded(100, 4)
	h.PublishBatch(b)
	if b.Undecoded() {
		t.Fatal("a batch published to a subscriber was not decoded")
	}
	got, _, err := sub.Next(context.Background())
	if err != nil || len(got) != 4 || got[3].Event.SrcPort != 103 {
		t.Fatalf("subscriber got %d records (%v)", len(got), err)
	}
}
