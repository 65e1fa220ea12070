package dedup

import (
	"crypto/rand"
	"encoding/binary"
	"math/bits"

	"github.com/google/uuid"
)

// State is what a Table knows of an event ID.
type State uint32

const (
	Absent    State = iota // not in the table
	Delivered              // delivered within the window
	InFlight               // admitted, not yet settled
	Waiting                // in flight, and duplicates of it wait for its outcome (the owner keeps them)
)

const stateBits = 2

// Table is an open-addressing hash table from event ID to State, with linear probing in one
// flat array of 20-byte slots (the ID and 30 bits of its hash next to the state) and
// backward-shift deletion (no tombstones, so probes stay short however many IDs come and
// go). It exists because the de-duplication window is large (up to dedup.max_events IDs) and
// hit by every event: a Go map costs several times as much per access, and allocates as it
// grows. Large tables are mapped with huge pages (slots_linux.go): Free gives them back. The hash is keyed per table with random keys, so that a client cannot choose IDs
// that collide. Not safe for concurrent use.
type Table struct {
	slots  []slot
	mask   uint64
	n      int
	k0, k1 uint64
	// weak and flip are for tests, which make IDs collide on purpose: the hash bits kept (all
	// otherwise) and bits flipped after (none).
	weak, flip uint32
}

type slot struct {
	id [16]byte
	v  uint32 // hash<<stateBits | state; 0 = empty
}

const minSlots = 1024

func (t *Table) init() {
	var k [16]byte
	if _, err := rand.Read(k[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	t.k0, t.k1 = binary.LittleEndian.Uint64(k[:8])|1, binary.LittleEndian.Uint64(k[8:])|1
	t.slots = allocSlots(minSlots)
	t.mask = minSlots - 1
	if t.weak == 0 {
		t.weak = ^uint32(0)
	}
}

// hash is 30 bits of a keyed hash of id.
func (t *Table) hash(id *uuid.UUID) uint32 {
	lo := binary.LittleEndian.Uint64(id[:8])
	hi := binary.LittleEndian.Uint64(id[8:])
	h, l := bits.Mul64(lo^t.k0, hi^t.k1)
	h, l = bits.Mul64(h^l, 0x9E3779B97F4A7C15^t.k0)
	return uint32(h^l)>>stateBits&t.weak ^ t.flip
}

// find returns the slot index of id, or of the empty slot where it would go.
func (t *Table) find(id *uuid.UUID, h uint32) (uint64, bool) {
	want := h << stateBits
	for i := uint64(h) & t.mask; ; i = (i + 1) & t.mask {
		s := &t.slots[i]
		if s.v == 0 {
			return i, false
		}
		if s.v&^(1<<stateBits-1) == want && s.id == *id {
			return i, true
		}
	}
}

// Free gives back the table's memory (on Linux, large tables are mapped outside the Go heap)
// and empties it; the table may be used again.
func (t *Table) Free() {
	freeSlots(t.slots)
	t.slots, t.mask, t.n = nil, 0, 0
}

// Len is the number of IDs in the table.
func (t *Table) Len() int { return t.n }

// Get returns the state of id.
func (t *Table) Get(id uuid.UUID) State {
	if t.slots == nil {
		return Absent
	}
	i, ok := t.find(&id, t.hash(&id))
	if !ok {
		return Absent
	}
	return State(t.slots[i].v & (1<<stateBits - 1))
}

// Set sets the state of id (Absent removes it) and returns the one it had.
func (t *Table) Set(id uuid.UUID, st State) State {
	if t.slots == nil {
		if st == Absent {
			return Absent
		}
		t.init()
	}
	h := t.hash(&id)
	i, ok := t.find(&id, h)
	switch {
	case ok && st == Absent:
		old := State(t.slots[i].v & (1<<stateBits - 1))
		t.deleteAt(i)
		t.n--
		return old
	case ok:
		old := State(t.slots[i].v & (1<<stateBits - 1))
		t.slots[i].v = h<<stateBits | uint32(st)
		return old
	case st == Absent:
		return Absent
	}
	if (t.n+1)*8 > len(t.slots)*5 { // above 5/8 full: twice the slots
		t.grow()
		i, _ = t.find(&id, h)
	}
	t.slots[i] = slot{id: id, v: h<<stateBits | uint32(st)}
	t.n++
	return Absent
}

// Remove removes id if its state is a or b, and returns the state it had.
func (t *Table) Remove(id uuid.UUID, a, b State) State {
	if t.slots == nil {
		return Absent
	}
	i, ok := t.find(&id, t.hash(&id))
	if !ok {
		return Absent
	}
	st := State(t.slots[i].v & (1<<stateBits - 1))
	if st == a || st == b {
		t.deleteAt(i)
		t.n--
	}
	return st
}

// Admit marks id in flight if it is absent, and returns the state it had: one probe for the
// check and the insert.
func (t *Table) Admit(id uuid.UUID) State { return t.AdmitAs(id, InFlight) }

// Reset empties the table and keeps its slots.
func (t *Table) Reset() {
	if t.n > 0 {
		clear(t.slots)
		t.n = 0
	}
}

// AdmitAs sets id to st (not Absent) if it is absent, and returns the state it had.
func (t *Table) AdmitAs(id uuid.UUID, st State) State {
	if t.slots == nil {
		t.init()
	}
	h := t.hash(&id)
	i, ok := t.find(&id, h)
	if ok {
		return State(t.slots[i].v & (1<<stateBits - 1))
	}
	if (t.n+1)*8 > len(t.slots)*5 {
		t.grow()
		i, _ = t.find(&id, h)
	}
	t.slots[i] = slot{id: id, v: h<<stateBits | uint32(st)}
	t.n++
	return Absent
}

// deleteAt empties slot i and moves back the later slots of its run that may not stay
// behind a hole (so that every ID stays reachable from its home slot without tombstones).
func (t *Table) deleteAt(i uint64) {
	for {
		t.slots[i].v = 0
		j := i
		for {
			j = (j + 1) & t.mask
			v := t.slots[j].v
			if v == 0 {
				return
			}
			home := uint64(v>>stateBits) & t.mask
			// Slot j may stay if its home lies cyclically within (i, j].
			if (i < j && i < home && home <= j) || (i > j && (home > i || home <= j)) {
				continue
			}
			t.slots[i] = t.slots[j]
			i = j
			break
		}
	}
}

func (t *Table) grow() {
	old := t.slots
	t.slots = allocSlots(2 * len(old))
	t.mask = uint64(len(t.slots) - 1)
	for _, s := range old {
		if s.v == 0 {
			continue
		}
		i := uint64(s.v>>stateBits) & t.mask
		for t.slots[i].v != 0 {
			i = (i + 1) & t.mask
		}
		t.slots[i] = s
	}
	freeSlots(old)
}
