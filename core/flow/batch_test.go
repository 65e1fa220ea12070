package flow

import (
	"errors"
	"strings"
	"sync"
	"sync/atomic"
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

// byteDecoder is a stand-in for the plugin host's codec: one byte per event, its SrcPort;
// a zero byte is malformed. It counts its calls.
type byteDecoder struct{ calls atomic.Int32 }

func (d *byteDecoder) decode(dst []Event, data []byte, n int) ([]Event, error) {
	d.calls.Add(1)
	if len(data) != n {
		return dst, errors.New("wrong count")
	}
	for _, c := range data {
		if c == 0 {
			return dst, errors.New("zero byte")
		}
		dst = append(dst, Event{SrcPort: uint16(c), Source: "src"})
	}
	return dst, nil
}

// An undecoded batch counts its events, keeps its encoding, and is decoded once however
// many goroutines ask at the same time (run with -race); every one of them then sees the
// events.
func TestEncodedBatchDecodesOnceForConcurrentReaders(t *testing.T) {
	d := &byteDecoder{}
	acked := make(chan error, 1)
	b := NewEncodedBatch([]byte{1, 2, 3, 4}, 4, true, d.decode, func(err error) { acked <- err })
	if !b.Undecoded() || b.Len() != 4 || b.Events != nil || string(b.Encoded()) != "\x01\x02\x03\x04" {
		t.Fatalf("undecoded batch: Undecoded %v, Len %d, Events %v, Encoded %v", b.Undecoded(), b.Len(), b.Events, b.Encoded())
	}
	b.StampSource("src") // every event names its source: nothing to decode for
	if !b.Undecoded() || d.calls.Load() != 0 || b.Source != "src" {
		t.Fatalf("StampSource decoded a batch whose events name their source (calls %d), or did not name the batch (%q)", d.calls.Load(), b.Source)
	}
	var wg sync.WaitGroup
	for range 8 {
		b.Retain()
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = b.Len()
			_ = b.Encoded()
			if err := b.Decode(); err != nil {
				t.Error(err)
			}
			sum := 0
			for _, e := range b.Events {
				sum += int(e.SrcPort)
			}
			if sum != 10 || b.Len() != 4 {
				t.Errorf("after Decode: %d events summing to %d, want 4 summing to 10", b.Len(), sum)
			}
			b.Release(nil)
		}()
	}
	wg.Wait()
	b.Release(nil)
	if err := <-acked; err != nil {
		t.Fatal(err)
	}
	if n := d.calls.Load(); n != 1 {
		t.Fatalf("decoded %d times, want once", n)
	}
	if b.Undecoded() || b.Encoded() == nil {
		t.Fatal("a decoded batch whose events did not change lost its encoding")
	}
}

// A malformed encoding: Decode fails, the same way every time, without decoding again; the
// batch still counts its events (so that dropping it counts them) and its encoding is not
// passed on.
func TestEncodedBatchMalformed(t *testing.T) {
	d := &byteDecoder{}
	b := NewEncodedBatch([]byte{1, 0, 3}, 3, true, d.decode, nil)
	err := b.Decode()
	if err == nil || !strings.Contains(err.Error(), "malformed batch of 3 events: zero byte") {
		t.Fatalf("Decode: %v", err)
	}
	if again := b.Decode(); again != err || d.calls.Load() != 1 {
		t.Fatalf("second Decode: %v after %d decodings", again, d.calls.Load())
	}
	if b.Len() != 3 || b.Events != nil || b.Encoded() != nil || b.Undecoded() {
		t.Fatalf("malformed batch: Len %d, Events %v, Encoded %v, Undecoded %v", b.Len(), b.Events, b.Encoded(), b.Undecoded())
	}
}

// StampSource decodes an undecoded batch whose events may not name their source, stamps
// them and drops the encoding; DropEncoded refuses to drop the only form of an undecoded
// batch.
func TestEncodedBatchStampAndDrop(t *testing.T) {
	d := &byteDecoder{}
	b := NewEncodedBatch([]byte{5, 6}, 2, false, func(dst []Event, data []byte, n int) ([]Event, error) {
		evs, err := d.decode(dst, data, n)
		for i := range evs {
			evs[i].Source = "" // the plugin named none
		}
		return evs, err
	}, nil)
	b.StampSource("gen")
	if b.Undecoded() || len(b.Events) != 2 || b.Events[1].Source != "gen" || b.Encoded() != nil {
		t.Fatalf("after StampSource: Undecoded %v, events %+v, Encoded %v", b.Undecoded(), b.Events, b.Encoded())
	}
	u := NewEncodedBatch([]byte{5}, 1, true, d.decode, nil)
	defer func() {
		if recover() == nil {
			t.Fatal("DropEncoded on an undecoded batch did not panic")
		}
	}()
	u.DropEncoded()
}

// EncodingCopy is a copy, made once, of an undecoded batch's encoding, which decodes to the
// same events; a decoded batch has none.
func TestEncodingCopy(t *testing.T) {
	d := &byteDecoder{}
	data := []byte{7, 8, 9}
	b := NewEncodedBatch(data, 3, true, d.decode, nil)
	c1, ok1 := b.EncodingCopy()
	c2, _ := b.EncodingCopy()
	if !ok1 || &c1.Data[0] == &data[0] || &c1.Data[0] != &c2.Data[0] {
		t.Fatal("EncodingCopy did not copy, or copied twice")
	}
	data[0] = 1 // the batch's buffer goes back to a pool once it is acknowledged
	evs, err := c1.Events()
	if err != nil || len(evs) != 3 || evs[0].SrcPort != 7 {
		t.Fatalf("copy decodes to %+v, %v", evs, err)
	}
	if _, ok := NewBatch(nil, nil).EncodingCopy(); ok {
		t.Fatal("a decoded batch has an encoding copy")
	}
}
