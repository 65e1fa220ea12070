package dedup

import (
	"encoding/binary"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/uuid"
)

// FuzzTableAgainstMap runs a sequence of operations, from the fuzzer's bytes, on a Table and
// on a Go map, and checks that they agree after each one. IDs come from a small set so that
// the same ones are inserted, changed and deleted again and again (long probe runs,
// backward shifts across the end of the array, growth).
func FuzzTableAgainstMap(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add(make([]byte, 300))
	r := rand.New(rand.NewPCG(3, 4))
	long := make([]byte, 4000)
	for i := range long {
		long[i] = byte(r.Uint32())
	}
	f.Add(long)
	f.Fuzz(func(t *testing.T, ops []byte) {
		// 16 home slots of 1,024, the last 16: runs wrap around the end of the array.
		tab := Table{weak: 0x0f, flip: 0x3f0}
		tab.init()
		ref := map[uuid.UUID]State{}
		for i := 0; i+1 < len(ops); i += 2 {
			id := testID(int(ops[i+1]) % 97)
			switch op := ops[i] % 4; op {
			case 0, 1:
				st := State(ops[i]/4%3 + 1)
				if got, want := tab.Set(id, st), ref[id]; got != want {
					t.Fatalf("op %d: Set returned %v, map had %v", i, got, want)
				}
				ref[id] = st
			case 2:
				if got, want := tab.Set(id, Absent), ref[id]; got != want {
					t.Fatalf("op %d: delete returned %v, map had %v", i, got, want)
				}
				delete(ref, id)
			case 3:
				if got, want := tab.Admit(id), ref[id]; got != want {
					t.Fatalf("op %d: Admit returned %v, map had %v", i, got, want)
				}
				if ref[id] == Absent {
					ref[id] = InFlight
				}
			}
			if tab.Len() != len(ref) {
				t.Fatalf("op %d: %d IDs, map %d", i, tab.Len(), len(ref))
			}
		}
		for k := range 97 {
			id := testID(k)
			if got, want := tab.Get(id), ref[id]; got != want {
				t.Fatalf("ID %d: table %v, map %v", k, got, want)
			}
		}
	})
}

// testID is an ID whose low bits repeat, so that many IDs share probe runs in a small table.
func testID(k int) uuid.UUID {
	var id uuid.UUID
	binary.LittleEndian.PutUint64(id[:8], uint64(k))
	return id
}

func TestTableManyIDs(t *testing.T) {
	var tab Table
	ref := map[uuid.UUID]bool{}
	r := rand.New(rand.NewPCG(1, 2))
	var live []uuid.UUID
	for i := range 200_000 {
		if len(live) > 0 && r.IntN(3) == 0 {
			k := r.IntN(len(live))
			id := live[k]
			live[k] = live[len(live)-1]
			live = live[:len(live)-1]
			if tab.Set(id, Absent) != Delivered {
				t.Fatalf("step %d: a present ID was not found for deletion", i)
			}
			delete(ref, id)
			continue
		}
		id := uuid.New()
		if tab.Admit(id) != Absent {
			t.Fatalf("step %d: a new ID was found", i)
		}
		tab.Set(id, Delivered)
		ref[id] = true
		live = append(live, id)
	}
	if tab.Len() != len(ref) {
		t.Fatalf("%d IDs, want %d", tab.Len(), len(ref))
	}
	for id := range ref {
		if tab.Get(id) != Delivered {
			t.Fatal("an ID went missing")
		}
	}
}

// refGate is the de-duplication of before the Table (Gate and Window: a map of IDs in flight,
// a map of delivered IDs, a FIFO of delivered records), the semantics Window must keep.
type refGate struct {
	dur     time.Duration
	max     int
	pending map[uuid.UUID]bool
	ids     map[uuid.UUID]bool
	done    []Rec
	journal []Rec // what the state file holds
}

func (g *refGate) admit(id uuid.UUID) bool {
	if g.pending[id] || g.ids[id] {
		return false
	}
	g.pending[id] = true
	return true
}

func (g *refGate) settle(ids []uuid.UUID, delivered bool, now time.Time) {
	for _, id := range ids {
		delete(g.pending, id)
	}
	if !delivered || g.dur <= 0 || g.max <= 0 {
		return
	}
	for _, id := range ids {
		g.journal = append(g.journal, Rec{ID: id, At: now.UnixNano()})
	}
	for _, id := range ids {
		if g.ids[id] {
			continue
		}
		if len(g.done) == g.max {
			g.pop()
		}
		g.done = append(g.done, Rec{ID: id, At: now.UnixNano()})
		g.ids[id] = true
	}
	g.expire(now)
}

func (g *refGate) pop() {
	delete(g.ids, g.done[0].ID)
	g.done = g.done[1:]
}

func (g *refGate) expire(now time.Time) {
	cutoff := now.Add(-g.dur).UnixNano()
	for len(g.done) > 0 && g.done[0].At < cutoff {
		g.pop()
	}
	if len(g.journal) > 2*g.max+1024 {
		g.journal = append([]Rec(nil), g.done...) // compacted
	}
}

// restart is a new process reading the state file: the records inside the window's
// duration, the last max of them (which may bring back IDs that had left by count).
func (g *refGate) restart(now time.Time) {
	cutoff := now.Add(-g.dur).UnixNano()
	var recs []Rec
	for _, r := range g.journal {
		if r.At >= cutoff {
			recs = append(recs, r)
		}
	}
	if len(recs) > g.max {
		recs = recs[len(recs)-g.max:]
	}
	g.journal, g.pending, g.ids, g.done = recs, map[uuid.UUID]bool{}, map[uuid.UUID]bool{}, nil
	for _, r := range recs {
		if g.ids[r.ID] {
			continue
		}
		if len(g.done) == g.max {
			g.pop()
		}
		g.done = append(g.done, r)
		g.ids[r.ID] = true
	}
}

func (g *refGate) setBounds(dur time.Duration, max int, now time.Time) {
	g.dur, g.max = dur, max
	for len(g.done) > max {
		g.pop()
	}
	g.expire(now)
}

// FuzzGateAgainstReference drives Gate (on the Table) and the reference with the same
// operations — admit, settle delivered or failed, time passing, new bounds, a restart from
// the journal — and checks after each that they admit the same IDs and remember the same.
func FuzzGateAgainstReference(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 200, 3, 0, 1})
	f.Add([]byte{0, 0, 0, 0, 64, 1, 1, 1, 128, 2, 2, 2, 192, 9, 9, 9})
	f.Fuzz(func(t *testing.T, ops []byte) {
		fuzzAgainstReference(t, ops, false, func(g *Gate, id uuid.UUID) bool { return g.Admit(id) },
			func(g *Gate, ids []uuid.UUID, delivered bool, now time.Time) error {
				return g.Settle(ids, delivered, now)
			})
	})
}

// FuzzSeeRememberForgetAgainstReference is the same for the gRPC collector's use of Window:
// See on arrival, then Remember (delivered) or Forget (failed), the flight kept by the caller.
func FuzzSeeRememberForgetAgainstReference(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 200, 3, 0, 1})
	f.Add([]byte{0, 0, 0, 0, 64, 1, 1, 1, 128, 2, 2, 2, 192, 9, 9, 9})
	f.Fuzz(func(t *testing.T, ops []byte) {
		fuzzAgainstReference(t, ops, true, func(g *Gate, id uuid.UUID) bool { return !g.window.See(id) },
			func(g *Gate, ids []uuid.UUID, delivered bool, now time.Time) error {
				if delivered {
					return g.window.Remember(ids, now)
				}
				g.window.Forget(ids)
				return nil
			})
	})
}

// fuzzAgainstReference runs ops on g through admit and settle and on the reference. With
// see, IDs in flight are in the table as delivered (Has reports them).
func fuzzAgainstReference(t *testing.T, ops []byte, see bool, admit func(*Gate, uuid.UUID) bool, settle func(*Gate, []uuid.UUID, bool, time.Time) error) {
	dir := t.TempDir()
	resolve := func(p string) string { return filepath.Join(dir, p) }
	now := time.Unix(1_700_000_000, 0)
	cfg := Config{Window: 10 * time.Second, MaxEvents: 8, StateFile: "ids"}
	g := NewGate(cfg)
	if err := g.Load(cfg.StateFile, resolve, now); err != nil {
		t.Fatal(err)
	}
	defer func() { g.Close() }()
	ref := &refGate{dur: cfg.Window, max: cfg.MaxEvents, pending: map[uuid.UUID]bool{}, ids: map[uuid.UUID]bool{}}
	var inflight []uuid.UUID
	for i := 0; i+1 < len(ops); i += 2 {
		arg := int(ops[i+1])
		switch ops[i] % 8 {
		case 0, 1, 2:
			id := testID(arg % 24)
			got, want := admit(g, id), ref.admit(id)
			if got != want {
				t.Fatalf("op %d: admit(%d) = %v, reference %v", i, arg%24, got, want)
			}
			if got {
				inflight = append(inflight, id) // admitted now: in flight until settled
			}
		case 3, 4:
			// Settle a run of the IDs in flight, delivered or not.
			n := min(arg%5, len(inflight))
			var ids []uuid.UUID
			for _, id := range inflight[:n] {
				if ref.pending[id] {
					ids = append(ids, id)
				}
			}
			inflight = inflight[n:]
			delivered := ops[i]%8 == 3
			if err := settle(g, ids, delivered, now); err != nil {
				t.Fatal(err)
			}
			ref.settle(ids, delivered, now)
		case 5:
			now = now.Add(time.Duration(arg) * 100 * time.Millisecond)
		case 6:
			dur, max := time.Duration(arg%16)*time.Second, arg/16
			if dur == 0 || max == 0 {
				continue // turning the window off is a restart in every source
			}
			g.window.SetBounds(dur, max, now)
			ref.setBounds(dur, max, now)
		case 7:
			// A restart: what was in flight is forgotten; the journal restores the rest.
			g.Close()
			g = NewGate(Config{Window: ref.dur, MaxEvents: ref.max, StateFile: cfg.StateFile})
			if err := g.Load(cfg.StateFile, resolve, now); err != nil {
				t.Fatal(err)
			}
			ref.restart(now)
			inflight = nil
		}
		if g.Remembered() != len(ref.done) {
			t.Fatalf("op %d: remembers %d IDs, reference %d", i, g.Remembered(), len(ref.done))
		}
		for k := range 24 {
			id := testID(k)
			got, want := g.window.Has(id), ref.ids[id] || (see && ref.pending[id])
			if got != want {
				t.Fatalf("op %d: Has(%d) = %v, reference %v", i, k, got, want)
			}
		}
	}
}
