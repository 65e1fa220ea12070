package flow

import (
	"errors"
	"sync"
	"testing"

	"github.com/google/uuid"
)

func TestBatchAckAfterLastRelease(t *testing.T) {
	var got []error
	b := NewBatch(make([]Event, 3), func(err error) { got = append(got, err) })
	b.Retain()
	b.Retain()
	b.Release(nil) // the producer's reference
	if len(got) != 0 {
		t.Fatal("acknowledged while two holders remain")
	}
	b.Release(nil)
	if len(got) != 0 {
		t.Fatal("acknowledged while one holder remains")
	}
	b.Release(nil)
	if len(got) != 1 || got[0] != nil {
		t.Fatalf("want one nil ack, got %v", got)
	}
}

func TestBatchFirstErrorWins(t *testing.T) {
	var got error
	b := NewBatch(nil, func(err error) { got = err })
	b.Retain()
	b.Retain()
	drop := &DropError{Component: "s", Reason: "queue_full"}
	b.Release(drop)
	b.Release(ErrShutdown)
	b.Release(nil)
	if !errors.Is(got, drop) || !IsDrop(got) {
		t.Fatalf("ack = %v, want the first error %v", got, drop)
	}
}

func TestBatchConcurrentReleases(t *testing.T) {
	acks := 0
	b := NewBatch(nil, func(error) { acks++ })
	const n = 1000
	var wg sync.WaitGroup
	for range n {
		b.Retain()
	}
	for range n {
		wg.Add(1)
		go func() { defer wg.Done(); b.Release(nil) }()
	}
	wg.Wait()
	if acks != 0 {
		t.Fatal("acknowledged before the producer released")
	}
	b.Release(nil)
	if acks != 1 || !b.Acked() {
		t.Fatalf("acks = %d, want 1", acks)
	}
}

func TestBatchOverReleasePanics(t *testing.T) {
	b := NewBatch(nil, nil)
	b.Release(nil)
	defer func() {
		if recover() == nil {
			t.Fatal("a second Release did not panic")
		}
	}()
	b.Release(nil)
}

func TestIDGenMakesVersion4UUIDs(t *testing.T) {
	g := NewIDGen()
	seen := map[[16]byte]bool{}
	for range 10000 {
		u := g.New()
		if u.Version() != 4 || u.Variant() != uuid.RFC4122 {
			t.Fatalf("%s: version %d variant %d", u, u.Version(), u.Variant())
		}
		if seen[u] {
			t.Fatalf("duplicate %s", u)
		}
		seen[u] = true
	}
}

// A kept encoding holds only while the events are those it was decoded into.
func TestBatchEncodedIsDroppedWhenEventsChange(t *testing.T) {
	enc := []byte{3, 1, 2}
	b := NewBatch([]Event{{Source: "a"}, {Source: "b"}}, nil)
	b.SetEncoded(enc)
	b.StampSource("gen") // names nothing new: the encoding holds
	if got := b.Encoded(); &got[0] != &enc[0] {
		t.Fatal("StampSource that named no event dropped the encoding")
	}
	b.Events = b.Events[:1] // filtered
	if b.Encoded() != nil {
		t.Fatal("the encoding survived a change of the number of events")
	}
	b = NewBatch([]Event{{Source: "a"}, {}}, nil)
	b.SetEncoded(enc)
	b.StampSource("gen") // names the second event
	if b.Encoded() != nil || b.Events[1].Source != "gen" {
		t.Fatal("StampSource changed an event and kept the encoding")
	}
	b.SetEncoded(enc)
	b.DropEncoded()
	if b.Encoded() != nil {
		t.Fatal("DropEncoded kept the encoding")
	}
}
