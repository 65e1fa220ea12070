package diskqueue

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
)

// events makes n events whose IDs carry their number, from first on.
func events(first, n int) []flow.Event {
	out := make([]flow.Event, n)
	for i := range out {
		e := &out[i]
		binary.BigEndian.PutUint64(e.EventID[:8], uint64(first+i))
		e.FlowID = e.EventID
		e.Type = flow.TypeStart
		e.Protocol = 6
		e.Timestamp = flow.Time(time.Unix(1_700_000_000, 0).Add(time.Duration(first+i) * time.Millisecond).UnixNano())
		e.SrcAddr = netip.MustParseAddr("10.0.0.1")
		e.DstAddr = netip.MustParseAddr("10.0.0.2")
		e.SrcPort, e.DstPort = uint16(first+i), 443
		e.RuleID = "rule-1"
	}
	return out
}

func number(e *flow.Event) int { return int(binary.BigEndian.Uint64(e.EventID[:8])) }

// counter collects what a queue reports as dropped.
type counter struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *counter) add(reason string, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	c.n[reason] += n
}

func (c *counter) get(reason string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[reason]
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func open(t *testing.T, dir string, c *counter, mod ...func(*Options)) *Queue {
	t.Helper()
	o := Options{Dir: dir, MaxSize: 64 << 20, SegmentSize: 16 << 10, Logger: quiet()}
	if c != nil {
		o.Dropped = c.add
	}
	for _, m := range mod {
		m(&o)
	}
	q, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// fill appends batches of size events each, numbered from 0, and returns the batch sizes.
func fill(t *testing.T, q *Queue, batches, size int) {
	t.Helper()
	for i := range batches {
		if err := q.Append(context.Background(), events(i*size, size)); err != nil {
			t.Fatal(err)
		}
	}
}

// drain takes every record the queue hands out until it has none (after CloseWrites) and
// confirms each; it returns the event numbers in order.
func drain(t *testing.T, q *Queue) []int {
	t.Helper()
	q.CloseWrites()
	var got []int
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		b := q.Next(ctx)
		cancel()
		if b == nil {
			return got
		}
		for i := range b.Events {
			got = append(got, number(&b.Events[i]))
		}
		b.Release(nil)
	}
}

func TestAppendDrainInOrderAcrossSegments(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, nil)
	fill(t, q, 200, 50) // about 40 segments of 16KiB
	if st := q.Stats(); st.Events != 10000 || st.Segments < 10 {
		t.Fatalf("stats %+v: want 10000 events in many segments", st)
	}
	got := drain(t, q)
	if len(got) != 10000 {
		t.Fatalf("drained %d events, want 10000", len(got))
	}
	for i, n := range got {
		if n != i {
			t.Fatalf("event %d is number %d: out of order", i, n)
		}
	}
	if st := q.Stats(); st.Events != 0 || st.Segments > 1 {
		t.Fatalf("after draining: %+v, want nothing pending and confirmed segments deleted", st)
	}
	q.Close()
}

func TestReopenDeliversWhatWasNotConfirmed(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, nil)
	fill(t, q, 100, 10)
	// Confirm the first 30 records; take 5 more and give them up at shutdown.
	for range 30 {
		q.Next(context.Background()).Release(nil)
	}
	for range 5 {
		q.Next(context.Background()).Release(flow.ErrShutdown)
	}
	q.Close()

	q = open(t, dir, nil)
	defer q.Close()
	got := drain(t, q)
	if len(got) != 700 || got[0] != 300 || got[len(got)-1] != 999 {
		t.Fatalf("after reopen got %d events from %v to %v, want 700 from 300 to 999", len(got), first(got), last(got))
	}
}

func first(s []int) any {
	if len(s) == 0 {
		return nil
	}
	return s[0]
}

func last(s []int) any {
	if len(s) == 0 {
		return nil
	}
	return s[len(s)-1]
}

func TestSecondOpenOfTheSameDirectoryFails(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, nil)
	defer q.Close()
	if _, err := Open(Options{Dir: dir, Logger: quiet()}); err == nil {
		t.Fatal("a second Open of a queue in use succeeded")
	}
}

func TestConfirmOutOfOrderKeepsTheCursorBehind(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, nil)
	fill(t, q, 10, 10)
	a := q.Next(context.Background())
	b := q.Next(context.Background())
	b.Release(nil) // the second confirmed before the first
	q.Close()      // a is still in flight: it and everything after it come back

	q = open(t, dir, nil)
	defer q.Close()
	got := drain(t, q)
	_ = a
	if len(got) != 100 || got[0] != 0 {
		t.Fatalf("got %d events from %v, want all 100 from 0 (the first record was never confirmed)", len(got), first(got))
	}
}

func TestDropOldestCountsWhatItEvicts(t *testing.T) {
	dir := t.TempDir()
	var c counter
	q := open(t, dir, &c, func(o *Options) { o.MaxSize = 1 << 20; o.SegmentSize = 64 << 10; o.WhenFull = DropOldest })
	defer q.Close()
	const batches, size = 400, 100 // ~ 4MB of records into 1MiB
	fill(t, q, batches, size)
	got := drain(t, q)
	if dropped := c.get("queue_full"); dropped == 0 || dropped+len(got) != batches*size {
		t.Fatalf("delivered %d + dropped %d, want %d in all with some dropped", len(got), dropped, batches*size)
	}
	if c.get("queue_corrupt") != 0 {
		t.Fatalf("eviction counted as corruption: %v", c.n)
	}
	if st := q.Stats(); st.Bytes > 1<<20 {
		t.Fatalf("queue holds %d bytes, above max_size", st.Bytes)
	}
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] {
			t.Fatal("out of order after eviction")
		}
	}
	if last(got) != batches*size-1 {
		t.Fatalf("the newest event %v was not kept", last(got))
	}
}

func TestDropNewestRefusesWhenFull(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, nil, func(o *Options) { o.MaxSize = 1 << 20; o.SegmentSize = 64 << 10; o.WhenFull = DropNewest })
	defer q.Close()
	full := 0
	for i := range 400 {
		if err := q.Append(context.Background(), events(i*100, 100)); err == ErrFull {
			full++
		} else if err != nil {
			t.Fatal(err)
		}
	}
	got := drain(t, q)
	if full == 0 || len(got)+full*100 != 40000 || got[0] != 0 {
		t.Fatalf("delivered %d, refused %d batches: want the oldest kept and the rest refused", len(got), full)
	}
}

func TestBlockWaitsForTheSink(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, nil, func(o *Options) { o.MaxSize = 1 << 20; o.SegmentSize = 64 << 10 })
	defer q.Close()
	done := make(chan error)
	go func() {
		for i := range 400 {
			if err := q.Append(context.Background(), events(i*100, 100)); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	var got []int
	for len(got) < 40000 {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		b := q.Next(ctx)
		cancel()
		if b == nil {
			t.Fatalf("no record after %d events", len(got))
		}
		if st := q.Stats(); st.Bytes > 1<<20+64<<10 {
			t.Fatalf("queue grew to %d bytes under block", st.Bytes)
		}
		for i := range b.Events {
			got = append(got, number(&b.Events[i]))
		}
		b.Release(nil)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for i, n := range got {
		if n != i {
			t.Fatalf("event %d is %d", i, n)
		}
	}
	// A full queue under block gives up when its context does.
	fill(t, q, 0, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	var err error
	for i := 0; err == nil; i++ {
		err = q.Append(ctx, events(i*100, 100))
	}
	if ctx.Err() == nil || err != ctx.Err() {
		t.Fatalf("Append on a full queue returned %v, want the context's error", err)
	}
}

func TestSyncIntervalIsDurableAfterClose(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, nil, func(o *Options) { o.Sync = SyncInterval; o.SyncInterval = 10 * time.Millisecond })
	fill(t, q, 50, 20)
	q.Close()
	q = open(t, dir, nil)
	defer q.Close()
	if got := drain(t, q); len(got) != 1000 {
		t.Fatalf("got %d events, want 1000", len(got))
	}
}

func TestInspectCountsConfirmedAndPending(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, nil)
	fill(t, q, 20, 10)
	for range 5 {
		q.Next(context.Background()).Release(nil)
	}
	q.Close()
	r, err := Inspect(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Clean() || r.Pending != 150 || r.Events != r.Pending+r.Confirmed || len(r.Missing) != 0 {
		t.Fatalf("report %+v: want clean with 150 pending", r)
	}
	if r.OldestEvent.IsZero() || !r.NewestEvent.After(r.OldestEvent) {
		t.Fatalf("event times %v .. %v", r.OldestEvent, r.NewestEvent)
	}
}

// segments lists the queue's segment files in order.
func segments(t *testing.T, dir string) []string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	sort.Strings(m)
	return m
}

// records lists the offsets and event counts of the records of a segment file.
func records(t *testing.T, path string) (offs []int64, counts []int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	for off := int64(segHdrSize); off < st.Size(); {
		kind, h, next, err := scanAt(f, off, st.Size(), nil)
		if kind != recOK || err != nil {
			t.Fatalf("%s: unexpected damage at %d", path, off)
		}
		offs = append(offs, off)
		counts = append(counts, int(h.events))
		off = next
	}
	return offs, counts
}

// AppendEncodedAsync stores a batch already in the queue's codec as it is: what the queue
// hands out is the same as for AppendAsync of the decoded events, in the same space, and it
// is durable when durable runs.
func TestAppendEncodedSameAsAppend(t *testing.T) {
	ctx := context.Background()
	var want, got []flow.Event
	var sizes [2]int64
	for i, encoded := range []bool{false, true} {
		dir := t.TempDir()
		q := open(t, dir, nil)
		for b := range 20 {
			evs := events(b*50, 50)
			evs[7].RuleID, evs[9].Source = "rule-allow", "gen"
			durable := make(chan error, 1)
			var err error
			if encoded {
				err = q.AppendEncodedAsync(ctx, codec.Append(nil, evs), len(evs), func(err error) { durable <- err })
			} else {
				err = q.AppendAsync(ctx, evs, func(err error) { durable <- err })
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := <-durable; err != nil {
				t.Fatal(err)
			}
		}
		sizes[i] = q.Stats().Bytes
		q.CloseWrites()
		for {
			b := q.Next(ctx)
			if b == nil {
				break
			}
			if encoded {
				got = append(got, b.Events...)
			} else {
				want = append(want, b.Events...)
			}
			b.Release(nil)
		}
		q.Close()
	}
	if len(want) != 1000 || !reflect.DeepEqual(got, want) {
		t.Fatalf("encoded: %d events handed out, decoded %d, or they differ", len(got), len(want))
	}
	if sizes[0] != sizes[1] {
		t.Fatalf("encoded records take %d bytes, decoded ones %d", sizes[1], sizes[0])
	}
}
