package tracker

import (
	"math/rand/v2"
	"testing"
)

// TestIndexAgainstMap inserts and deletes random keys, many colliding (hashes squeezed into
// a few home slots so that probe runs wrap and interleave), and checks every lookup against
// a Go map.
func TestIndexAgainstMap(t *testing.T) {
	for _, squeeze := range []uint32{0xffffffff, 0x7, 0x3ff} {
		tr := New(Config{MaxEntries: 1 << 20, Shards: 1}).shards[0]
		ref := map[key]int32{}
		rng := rand.New(rand.NewPCG(1, uint64(squeeze)))
		keys := make([]key, 3000)
		for i := range keys {
			keys[i] = key{a0: rng.Uint64() % 50, rest: uint64(i)}
		}
		hash := func(k *key) uint32 { return tr.ix.hash(k) & squeeze }
		for step := range 200000 {
			k := keys[rng.IntN(len(keys))]
			h := hash(&k)
			i, ok := tr.find(&k, h)
			want, wantOK := ref[k]
			if ok != wantOK || ok && i != want {
				t.Fatalf("squeeze %x step %d: find %d %v, want %d %v", squeeze, step, i, ok, want, wantOK)
			}
			if ok {
				tr.delete(i, h)
				delete(ref, k)
				tr.free = append(tr.free, i)
				continue
			}
			var e int32
			if n := len(tr.free); n > 0 {
				e, tr.free = tr.free[n-1], tr.free[:n-1]
			} else {
				e = tr.nEntries
				if int(e)>>pageShift == len(tr.pages) {
					tr.pages = append(tr.pages, make([]entry, pageSize))
				}
				tr.nEntries++
			}
			tr.ent(e).key = k
			tr.insert(e, h)
			ref[k] = e
			if tr.ix.n != len(ref) {
				t.Fatalf("count %d, want %d", tr.ix.n, len(ref))
			}
		}
	}
}
