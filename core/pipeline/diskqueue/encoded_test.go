package diskqueue

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
)

// readBack is what a queue handed out and reported while it was drained.
type readBack struct {
	events  []int          // event numbers, in order
	batches []int          // events per batch handed out
	dropped map[string]int // what Dropped counted
	corrupt int64          // Stats().CorruptBytes
	log     string         // the queue's log, its directory replaced by DIR
}

// drainWith opens the queue in dir, takes every record with next (Next or NextEncoded) and
// confirms each, recording what it handed out and what it counted and logged.
func drainWith(t *testing.T, dir string, encoded bool) readBack {
	t.Helper()
	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
	var c counter
	q := open(t, dir, &c, func(o *Options) { o.Logger = logger })
	q.CloseWrites()
	var r readBack
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var b *flow.Batch
		if encoded {
			b = q.NextEncoded(ctx)
		} else {
			b = q.Next(ctx)
		}
		cancel()
		if b == nil {
			break
		}
		if encoded {
			if !b.Undecoded() || b.Encoded() == nil {
				t.Fatal("NextEncoded handed out a decoded batch")
			}
			if err := b.Decode(); err != nil {
				t.Fatalf("NextEncoded handed out a batch that does not decode: %v", err)
			}
		}
		r.batches = append(r.batches, b.Len())
		for i := range b.Events {
			r.events = append(r.events, number(&b.Events[i]))
		}
		b.Release(nil)
	}
	r.corrupt = q.Stats().CorruptBytes
	q.Close()
	r.dropped = c.n
	r.log = strings.ReplaceAll(logs.String(), dir, "DIR")
	return r
}

// appendRaw appends a record holding payload as n events, whatever payload is (a record whose
// checksums match but whose payload does not decode: written by a buggy or newer build).
func appendRaw(t *testing.T, q *Queue, payload []byte, n int) {
	t.Helper()
	durable := make(chan error, 1)
	if err := q.AppendEncodedAsync(context.Background(), payload, n, func(err error) { durable <- err }); err != nil {
		t.Fatal(err)
	}
	if err := <-durable; err != nil {
		t.Fatal(err)
	}
}

// TestNextEncodedSameAsNext: on a damaged queue NextEncoded hands out the same records as
// Next (undecoded, each decoding to the same events), and skips, counts (queue_corrupt,
// corrupt bytes) and logs every damaged one exactly as Next does, including records whose
// checksums match but whose payload does not decode, which Validate refuses as Decode does.
func TestNextEncodedSameAsNext(t *testing.T) {
	base, segs, recs, _ := baseQueue(t)
	rnd := rand.New(rand.NewPCG(5, 6))
	type scenario struct {
		name   string
		damage func(dir string)
		lost   int // events that must not be handed out, at least
	}
	var scenarios []scenario
	for k := range 4 {
		i := rnd.IntN(len(recs))
		r := recs[i]
		at := r.off + rnd.Int64N(r.end-r.off)
		scenarios = append(scenarios, scenario{fmt.Sprintf("flip byte %d of record %d", at-r.off, i), func(dir string) {
			path := filepath.Join(dir, filepath.Base(segs[r.seg]))
			b, _ := os.ReadFile(path)
			b[at] ^= 0x40 << (k % 2)
			os.WriteFile(path, b, 0o640)
		}, 1})
	}
	newest := filepath.Base(segs[len(segs)-1])
	scenarios = append(scenarios,
		scenario{"torn tail", func(dir string) {
			st, _ := os.Stat(filepath.Join(dir, newest))
			os.Truncate(filepath.Join(dir, newest), st.Size()-5)
		}, 1},
		scenario{"middle segment deleted", func(dir string) {
			os.Remove(filepath.Join(dir, filepath.Base(segs[len(segs)/2])))
		}, 1},
	)
	good := codec.Append(nil, events(100_000, 7))
	undecodable := map[string][]byte{
		"unknown codec version": append([]byte{codec.Version + 1}, good[1:]...),
		"last event truncated":  good[:len(good)-1],
		"bytes after the last":  append(append([]byte(nil), good...), 0),
		"too many events":       append(append([]byte(nil), good...), good[1:]...),
	}
	for what, payload := range undecodable {
		scenarios = append(scenarios, scenario{"checksums match, payload does not decode: " + what, func(dir string) {
			q := open(t, dir, nil)
			appendRaw(t, q, payload, 7)
			if err := q.Append(context.Background(), events(200_000, 3)); err != nil {
				t.Fatal(err)
			}
			q.Close()
		}, 7})
	}
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			dir := copyDir(t, base)
			sc.damage(dir)
			decodedDir, encodedDir := copyDir(t, dir), copyDir(t, dir)
			want := drainWith(t, decodedDir, false)
			got := drainWith(t, encodedDir, true)
			if len(want.events) == 0 || want.dropped["queue_corrupt"] == 0 && want.corrupt == 0 {
				t.Fatalf("the damage went unnoticed: %d events, %v dropped, %d corrupt bytes", len(want.events), want.dropped, want.corrupt)
			}
			if !reflect.DeepEqual(got.events, want.events) || !reflect.DeepEqual(got.batches, want.batches) {
				t.Errorf("NextEncoded handed out %d events in %d batches, Next %d in %d, or other ones",
					len(got.events), len(got.batches), len(want.events), len(want.batches))
			}
			if !reflect.DeepEqual(got.dropped, want.dropped) || got.corrupt != want.corrupt {
				t.Errorf("NextEncoded counted %v and %d corrupt bytes, Next %v and %d", got.dropped, got.corrupt, want.dropped, want.corrupt)
			}
			if got.log != want.log {
				t.Errorf("NextEncoded logged\n%s\nNext logged\n%s", got.log, want.log)
			}
			if strings.HasPrefix(sc.name, "checksums match") && !strings.Contains(got.log, "skipped a damaged disk queue record") {
				t.Errorf("the undecodable record was not logged as damaged:\n%s", got.log)
			}
		})
	}
}

// TestNextEncodedPayloadOwnership: a batch's payload stays as it was read until the batch
// is acknowledged, however many records are read meanwhile and however often the read
// buffers are reused; it can be sent (Encoded) again and again before the ack, as a sink
// plugin's redelivery does; ErrShutdown leaves the record for the next start.
func TestNextEncodedPayloadOwnership(t *testing.T) {
	dir := t.TempDir()
	q := open(t, dir, nil)
	fill(t, q, 40, 25)
	ctx := context.Background()
	held := map[int]*flow.Batch{}
	copies := map[int][]byte{}
	for i := range 40 {
		b := q.NextEncoded(ctx)
		if b == nil {
			t.Fatalf("record %d not handed out", i)
		}
		copies[i] = append([]byte(nil), b.Encoded()...)
		switch {
		case i == 38:
			b.Release(flow.ErrShutdown) // stays in the queue
		case i%2 == 0:
			b.Release(nil) // its read buffer goes back for the next records
		default:
			held[i] = b
		}
	}
	for i := 1; i < 40; i += 2 {
		b := held[i]
		for range 3 {
			if !bytes.Equal(b.Encoded(), copies[i]) {
				t.Fatalf("record %d: its payload changed before its ack", i)
			}
		}
		if err := b.Decode(); err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
		if len(b.Events) != 25 || number(&b.Events[0]) != i*25 || number(&b.Events[24]) != i*25+24 {
			t.Fatalf("record %d decoded to other events", i)
		}
		b.Release(nil)
	}
	q.Close()
	// The record acknowledged with ErrShutdown comes back, with what follows it (the cursor
	// stays before the first record not confirmed: at least once).
	q = open(t, dir, nil)
	got := drain(t, q)
	q.Close()
	var want []int
	for n := 38 * 25; n < 40*25; n++ {
		want = append(want, n)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("after a restart %d events delivered again, want the %d from the record acknowledged with ErrShutdown on", len(got), len(want))
	}
}
