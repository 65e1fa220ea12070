package diskqueue

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// rec is one record of the base queue the damage tests start from.
type rec struct {
	seg         int // index into the segment list
	off, end    int64
	first, size int // event numbers first .. first+size-1
}

// baseQueue writes a queue of batches of 10..39 events over several segments and closes it.
func baseQueue(t *testing.T) (dir string, segs []string, recs []rec, total int) {
	t.Helper()
	dir = t.TempDir()
	q := open(t, dir, nil)
	r := rand.New(rand.NewPCG(1, 2))
	n := 0
	for range 120 {
		size := 10 + r.IntN(30)
		if err := q.Append(context.Background(), events(n, size)); err != nil {
			t.Fatal(err)
		}
		n += size
	}
	q.Close()
	segs = segments(t, dir)
	if len(segs) < 5 {
		t.Fatalf("only %d segments", len(segs))
	}
	num := 0
	for i, s := range segs {
		offs, counts := records(t, s)
		st, _ := os.Stat(s)
		for j := range offs {
			end := st.Size()
			if j+1 < len(offs) {
				end = offs[j+1]
			}
			recs = append(recs, rec{seg: i, off: offs[j], end: end, first: num, size: counts[j]})
			num += counts[j]
		}
	}
	if num != n {
		t.Fatalf("records hold %d events, wrote %d", num, n)
	}
	return dir, segs, recs, n
}

func copyDir(t *testing.T, from string) string {
	t.Helper()
	to := t.TempDir()
	entries, _ := os.ReadDir(from)
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return to
}

// expectation is which records a damaged queue must still deliver, and how many events it
// must count as queue_corrupt.
type expectation struct {
	lost    map[int]bool // record indexes that cannot be delivered
	counted int          // events counted as queue_corrupt
}

func check(t *testing.T, name, dir string, recs []rec, want expectation) {
	t.Helper()
	before, err := Inspect(dir)
	if err != nil {
		t.Fatalf("%s: inspect: %v", name, err)
	}
	repaired := copyDir(t, dir)

	var c counter
	q := open(t, dir, &c) // must start whatever the damage
	got := drain(t, q)
	q.Close()
	wantEvents := map[int]bool{}
	for i, r := range recs {
		if !want.lost[i] {
			for n := r.first; n < r.first+r.size; n++ {
				wantEvents[n] = true
			}
		}
	}
	seen := map[int]bool{}
	for _, n := range got {
		if seen[n] {
			t.Fatalf("%s: event %d delivered twice", name, n)
		}
		seen[n] = true
		if !wantEvents[n] {
			t.Fatalf("%s: event %d delivered, but its record was damaged", name, n)
		}
	}
	if len(seen) != len(wantEvents) {
		t.Fatalf("%s: delivered %d events, want every one of the %d undamaged", name, len(seen), len(wantEvents))
	}
	if got := c.get("queue_corrupt"); got != want.counted {
		t.Fatalf("%s: counted %d events as queue_corrupt, want %d", name, got, want.counted)
	}

	if len(want.lost) > 0 && before.Clean() && len(before.Missing) == 0 {
		t.Fatalf("%s: inspect found nothing wrong: %+v", name, before)
	}
	after, err := Repair(repaired)
	if err != nil {
		t.Fatalf("%s: repair: %v", name, err)
	}
	_ = after
	fixed, err := Inspect(repaired)
	if err != nil {
		t.Fatal(err)
	}
	if !fixed.Clean() {
		t.Fatalf("%s: still damaged after repair: %+v", name, fixed.Damage)
	}
	if fixed.Pending != int64(len(wantEvents)) {
		t.Fatalf("%s: repaired queue holds %d events, want the %d undamaged", name, fixed.Pending, len(wantEvents))
	}
	var c2 counter
	q = open(t, repaired, &c2)
	if got := drain(t, q); len(got) != len(wantEvents) {
		t.Fatalf("%s: repaired queue delivered %d, want %d", name, len(got), len(wantEvents))
	}
	q.Close()
}

func recsIn(recs []rec, seg int) []int {
	var out []int
	for i, r := range recs {
		if r.seg == seg {
			out = append(out, i)
		}
	}
	return out
}

func TestDamagedQueueStartsAndDeliversEveryUndamagedRecord(t *testing.T) {
	base, segs, recs, _ := baseQueue(t)
	newest := len(segs) - 1
	rnd := rand.New(rand.NewPCG(3, 4))

	t.Run("truncate the newest segment", func(t *testing.T) {
		in := recsIn(recs, newest)
		st, _ := os.Stat(segs[newest])
		for range 6 {
			cut := int64(segHdrSize) + rnd.Int64N(st.Size()-segHdrSize)
			dir := copyDir(t, base)
			if err := os.Truncate(filepath.Join(dir, filepath.Base(segs[newest])), cut); err != nil {
				t.Fatal(err)
			}
			want := expectation{lost: map[int]bool{}}
			for _, i := range in {
				r := recs[i]
				if r.end > cut {
					want.lost[i] = true
					// The record cut in two is counted when its header survived; records
					// wholly past the cut left no trace to count.
					if r.off < cut && cut-r.off >= recHdrSize {
						want.counted += r.size
					}
				}
			}
			check(t, fmt.Sprintf("cut at %d", cut), dir, recs, want)
		}
	})

	t.Run("truncate a middle segment", func(t *testing.T) {
		for range 6 {
			seg := 1 + rnd.IntN(newest-1)
			st, _ := os.Stat(segs[seg])
			cut := int64(segHdrSize) + rnd.Int64N(st.Size()-segHdrSize)
			dir := copyDir(t, base)
			if err := os.Truncate(filepath.Join(dir, filepath.Base(segs[seg])), cut); err != nil {
				t.Fatal(err)
			}
			want := expectation{lost: map[int]bool{}}
			for _, i := range recsIn(recs, seg) {
				if recs[i].end > cut {
					want.lost[i] = true
					want.counted += recs[i].size // the sequence numbers after tell exactly
				}
			}
			check(t, fmt.Sprintf("segment %d cut at %d", seg, cut), dir, recs, want)
		}
	})

	t.Run("flip bytes inside records", func(t *testing.T) {
		for range 8 {
			i := rnd.IntN(len(recs))
			r := recs[i]
			dir := copyDir(t, base)
			path := filepath.Join(dir, filepath.Base(segs[r.seg]))
			b, _ := os.ReadFile(path)
			at := r.off + rnd.Int64N(r.end-r.off)
			b[at] ^= 0x40
			os.WriteFile(path, b, 0o640)
			want := expectation{lost: map[int]bool{i: true}, counted: r.size}
			if at-r.off < recHdrSize && r.seg == newest && i == len(recs)-1 {
				// The newest record's header gone: a torn tail, counted in bytes only.
				want.counted = 0
			}
			check(t, fmt.Sprintf("record %d byte %d flipped", i, at-r.off), dir, recs, want)
		}
	})

	t.Run("delete a middle segment", func(t *testing.T) {
		seg := newest / 2
		dir := copyDir(t, base)
		os.Remove(filepath.Join(dir, filepath.Base(segs[seg])))
		want := expectation{lost: map[int]bool{}}
		for _, i := range recsIn(recs, seg) {
			want.lost[i] = true
			want.counted += recs[i].size
		}
		check(t, "middle segment deleted", dir, recs, want)
	})

	t.Run("junk files", func(t *testing.T) {
		dir := copyDir(t, base)
		os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("hello"), 0o644)
		os.WriteFile(filepath.Join(dir, "00000000000000000001.seg.bak"), []byte("old"), 0o644)
		os.WriteFile(filepath.Join(dir, "1.seg"), []byte("x"), 0o644)
		os.Mkdir(filepath.Join(dir, "sub"), 0o755)
		junk := make([]byte, 10000)
		for i := range junk {
			junk[i] = byte(rnd.IntN(256))
		}
		os.WriteFile(filepath.Join(dir, "00000000000000099999.seg"), junk, 0o644)
		check(t, "junk", dir, recs, expectation{})
		for _, name := range []string{"notes.txt", "00000000000000000001.seg.bak", "1.seg"} {
			if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
				t.Fatalf("a file that is not the queue's was touched: %s: %v", name, err)
			}
		}
	})

	t.Run("damaged cursor", func(t *testing.T) {
		dir := copyDir(t, base)
		os.WriteFile(filepath.Join(dir, cursorName), []byte("garbage"), 0o640)
		check(t, "cursor", dir, recs, expectation{})
	})
}

// TestNewerSegmentIsLeftAlone: a segment a newer flowpipe wrote (after a downgrade) is not
// misread and not deleted; the rest of the queue is delivered.
func TestNewerSegmentIsLeftAlone(t *testing.T) {
	base, segs, recs, total := baseQueue(t)
	dir := copyDir(t, base)
	newer := filepath.Join(dir, filepath.Base(segs[len(segs)-1]))
	b, _ := os.ReadFile(newer)
	b[4] = FormatVersion + 1 // the version, then a valid header checksum
	binary.LittleEndian.PutUint32(b[20:], crc(b[:20]))
	os.WriteFile(newer, b, 0o640)
	var c counter
	q := open(t, dir, &c)
	got := drain(t, q)
	q.Close()
	want := 0
	for _, r := range recs {
		if r.seg != len(segs)-1 {
			want += r.size
		}
	}
	if len(got) != want || want == total {
		t.Fatalf("delivered %d events, want the %d outside the newer segment", len(got), want)
	}
	if _, err := os.Stat(newer); err != nil {
		t.Fatalf("the newer segment was removed: %v", err)
	}
	if r, err := Inspect(dir); err != nil || r.Clean() {
		t.Fatalf("inspect does not report the newer segment: %v %+v", err, r)
	}
}
