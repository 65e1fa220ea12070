package tracker

import (
	"crypto/rand"
	"encoding/binary"
	"math/bits"
)

// index maps keys to entries: open addressing with linear probing over 8-byte slots, and
// deletion by shifting the following slots back, so that no tombstones build up however many
// connections come and go. It replaces a Go map because a tracker deletes as often as it
// inserts (Go's maps leave tombstones that lengthen every miss until the next rehash) and
// because hashing a 40-byte key through the generic map path costs more than the keyed
// three-multiply hash below. The hash is seeded at random so that an outsider who picks
// addresses and ports cannot aim for collisions.
type index struct {
	slots []slot
	mask  uint32
	n     int
	seed  [6]uint64
}

// slot holds the hash of an entry's key and the entry's number plus one; zero is empty.
type slot struct {
	hash uint32
	ref  int32
}

const minSlots = 1024

// newSeed returns a random hash seed.
func newSeed() [6]uint64 {
	var b [48]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("tracker: no randomness for the hash seed: " + err.Error())
	}
	var seed [6]uint64
	for i := range seed {
		seed[i] = binary.LittleEndian.Uint64(b[i*8:])
	}
	return seed
}

func newIndex(capacity int, seed *[6]uint64) index {
	ix := index{seed: *seed}
	n := minSlots
	for n < 2*capacity {
		n *= 2
	}
	ix.slots = make([]slot, n)
	ix.mask = uint32(n - 1)
	return ix
}

func mix(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	return hi ^ lo
}

func (ix *index) hash(k *key) uint32 { return hashKey(&ix.seed, k) }

func hashKey(seed *[6]uint64, k *key) uint32 {
	x := mix(k.a0^seed[0], k.a1^seed[1])
	y := mix(k.b0^seed[2], k.b1^seed[3])
	return uint32(mix(k.rest^seed[4], x^y^seed[5]))
}

// find returns the entry with key k, whose hash is h.
func (t *shard) find(k *key, h uint32) (int32, bool) {
	ix := &t.ix
	for i := h & ix.mask; ; i = (i + 1) & ix.mask {
		s := ix.slots[i]
		if s.ref == 0 {
			return 0, false
		}
		if s.hash == h && t.ent(s.ref-1).key == *k {
			return s.ref - 1, true
		}
	}
}

// insert adds entry e (not yet in the index) with hash h.
func (t *shard) insert(e int32, h uint32) {
	ix := &t.ix
	if 2*(ix.n+1) > len(ix.slots) {
		ix.grow()
	}
	ix.put(slot{hash: h, ref: e + 1})
	ix.n++
}

func (ix *index) put(s slot) {
	i := s.hash & ix.mask
	for ix.slots[i].ref != 0 {
		i = (i + 1) & ix.mask
	}
	ix.slots[i] = s
}

func (ix *index) grow() {
	old := ix.slots
	ix.slots = make([]slot, 2*len(old))
	ix.mask = uint32(len(ix.slots) - 1)
	for _, s := range old {
		if s.ref != 0 {
			ix.put(s)
		}
	}
}

// delete removes entry e, whose hash is h.
func (t *shard) delete(e int32, h uint32) {
	ix := &t.ix
	i := h & ix.mask
	for ix.slots[i].ref != e+1 {
		i = (i + 1) & ix.mask
	}
	// Shift back every following slot of the probe run that may move closer to its home.
	j := i
	for {
		ix.slots[i] = slot{}
		for {
			j = (j + 1) & ix.mask
			s := ix.slots[j]
			if s.ref == 0 {
				ix.n--
				return
			}
			home := s.hash & ix.mask
			// s may fill the hole at i when its home is not in (i, j] (cyclically).
			if (j > i && (home <= i || home > j)) || (j < i && home <= i && home > j) {
				ix.slots[i] = s
				i = j
				break
			}
		}
	}
}
