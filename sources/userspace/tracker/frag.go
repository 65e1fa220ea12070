package tracker

import (
	"sync"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/flow"
)

// The kernel reassembles fragments before it tracks a datagram, and counts it as one packet
// of its reassembled length. A tracker fed by captured packets sees the fragments instead:
// the first carries the transport header and is tracked like a whole packet; the table below
// remembers, per datagram, which connection it went to, so that the later fragments, which
// carry no ports, add their data to the same connection (and no packet). A later fragment
// captured before its first one cannot be attributed and is counted as untracked.

// fragTimeout is how long a datagram's fragments are waited for (Linux ipfrag_time).
const fragTimeout = 30 * flow.Time(1e9)

// maxFragDatagrams bounds the table, so that a flood of first fragments cannot grow it.
const maxFragDatagrams = 8192

type fragKey struct {
	src, dst [16]byte
	id       uint32
	proto    uint8
}

type fragRef struct {
	sh     *shard
	entry  int32
	flowID uuid.UUID
	orig   bool
	at     flow.Time
}

type fragTable struct {
	mu sync.Mutex
	m  map[fragKey]fragRef
}

func keyOfFragment(p *Packet) fragKey {
	return fragKey{src: p.Src, dst: p.Dst, id: p.FragID, proto: p.Proto}
}

// remember records the connection of a first fragment.
func (ft *fragTable) remember(p *Packet, ref fragRef) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	if ft.m == nil {
		ft.m = make(map[fragKey]fragRef)
	}
	if len(ft.m) >= maxFragDatagrams {
		for k, r := range ft.m {
			if ref.at-r.at >= fragTimeout {
				delete(ft.m, k)
			}
		}
		if len(ft.m) >= maxFragDatagrams {
			return // still full: this datagram's later fragments will count as untracked
		}
	}
	ft.m[keyOfFragment(p)] = ref
}

// lookup returns the connection of a later fragment's datagram; the last fragment forgets it.
func (ft *fragTable) lookup(p *Packet, now flow.Time) (fragRef, bool) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	k := keyOfFragment(p)
	r, ok := ft.m[k]
	if !ok {
		return r, false
	}
	if now-r.at >= fragTimeout {
		delete(ft.m, k)
		return r, false
	}
	if !p.MoreFragments {
		delete(ft.m, k)
	}
	return r, true
}
