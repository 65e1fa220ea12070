package tracker

import (
	"math/bits"
	"net/netip"
	"sync/atomic"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Tracker is a connection table. Its methods are safe for concurrent use.
type Tracker struct {
	shards  []*shard
	shift   uint8 // a hash's top bits pick its shard: hash >> shift
	seed    [6]uint64
	local   atomic.Pointer[[]netip.Prefix]
	clock   func() flow.Time
	hint    int
	maxPend int
	ready   chan struct{}
	pending atomic.Int64 // events waiting in all shards
	// invalid counts packets that could not be given to a shard (no key).
	invalid   atomic.Uint64
	fragments atomic.Uint64 // later fragments attributed to a connection
	frags     fragTable
}

// New makes a tracker.
func New(c Config) *Tracker {
	t := &Tracker{
		clock:   c.Clock,
		hint:    c.BatchHint,
		maxPend: c.MaxPending,
		ready:   make(chan struct{}, 1),
		seed:    newSeed(),
	}
	t.SetLocalPrefixes(c.LocalPrefixes)
	if t.clock == nil {
		t.clock = flow.Now
	}
	if t.hint <= 0 {
		t.hint = 1024
	}
	maxEntries := c.MaxEntries
	if maxEntries <= 0 {
		maxEntries = 1 << 18
	}
	n := max(c.Shards, 1)
	n = 1 << bits.Len(uint(n-1)) // round up to a power of two
	t.shift = uint8(32 - bits.TrailingZeros(uint(n)))
	per := (maxEntries + n - 1) / n
	t.shards = make([]*shard, n)
	for i := range t.shards {
		t.shards[i] = newShard(t, &c, per, &t.seed)
	}
	return t
}

// locate returns the shard and hash of key k.
func (t *Tracker) locate(k *key) (*shard, uint32) {
	h := hashKey(&t.seed, k)
	if t.shift == 32 {
		return t.shards[0], h
	}
	return t.shards[h>>t.shift], h
}

// Process tracks a packet at the tracker's clock; see ProcessAt.
func (t *Tracker) Process(p *Packet) Match { return t.ProcessAt(p, t.clock()) }

// ProcessAt tracks a packet seen at now: it finds or opens its connection, advances the
// connection's state and counts the packet in its direction. ICMP errors are counted in the
// connection they quote, in the direction they travel; they open none. It does not allocate
// for a packet of a known connection.
func (t *Tracker) ProcessAt(p *Packet, now flow.Time) Match {
	var v6 bool
	switch p.Proto {
	case 6, 17:
	case 1, 58:
		v6 = p.Proto == 58
		if _, ok := icmpQuery(p.ICMPType, v6); !ok {
			q := &p.Quoted
			if !q.Valid {
				t.invalid.Add(1)
				return MatchNone
			}
			k, quotedFromA := makeKey(&q.Src, &q.Dst, q.SrcPort, q.DstPort, q.Proto, p.IPv6)
			sh, h := t.locate(&k)
			return sh.related(k, h, quotedFromA, p)
		}
	default:
		t.invalid.Add(1)
		return MatchNone
	}
	if p.Fragment == LaterFragment {
		return t.laterFragment(p, now)
	}
	k, fromA := makeKey(&p.Src, &p.Dst, p.SrcPort, p.DstPort, p.Proto, p.IPv6)
	sh, h := t.locate(&k)
	m := sh.process(k, h, fromA, p, now, v6)
	if p.Fragment == FirstFragment && m != MatchNone {
		// Remember the datagram's connection for its later fragments.
		if i, id, ok := sh.entryOf(k, h); ok {
			t.frags.remember(p, fragRef{sh: sh, entry: i, flowID: id, orig: m == MatchNew || m == MatchOriginal, at: now})
		}
	}
	return m
}

// laterFragment counts a fragment after the first in the connection of its first fragment.
func (t *Tracker) laterFragment(p *Packet, now flow.Time) Match {
	ref, ok := t.frags.lookup(p, now)
	if !ok || !ref.sh.addFragment(ref.entry, ref.flowID, ref.orig, p, now) {
		t.invalid.Add(1) // its first fragment was not seen (yet), or the connection is gone
		return MatchNone
	}
	t.fragments.Add(1)
	if ref.orig {
		return MatchOriginal
	}
	return MatchReply
}

// Peek reports what Process would make of p without changing anything.
func (t *Tracker) Peek(p *Packet) Match { return t.PeekAt(p, t.clock()) }

// PeekAt is Peek at a given time.
func (t *Tracker) PeekAt(p *Packet, now flow.Time) Match {
	src, dst, sp, dp, proto := &p.Src, &p.Dst, p.SrcPort, p.DstPort, p.Proto
	related := false
	if flow.IsICMP(p.Proto) {
		if _, ok := icmpQuery(p.ICMPType, p.Proto == 58); !ok {
			if !p.Quoted.Valid {
				return MatchNone
			}
			q := &p.Quoted
			src, dst, sp, dp, proto, related = &q.Src, &q.Dst, q.SrcPort, q.DstPort, q.Proto, true
		}
	} else if p.Proto != 6 && p.Proto != 17 {
		return MatchNone
	}
	k, fromA := makeKey(src, dst, sp, dp, proto, p.IPv6)
	sh, h := t.locate(&k)
	return sh.peek(k, h, fromA, related, p, now)
}

// StateOf returns the state of the connection p belongs to, and false when there is none.
func (t *Tracker) StateOf(p *Packet) (State, bool) {
	k, _ := makeKey(&p.Src, &p.Dst, p.SrcPort, p.DstPort, p.Proto, p.IPv6)
	sh, h := t.locate(&k)
	return sh.stateOf(k, h)
}

// ReportDrop records that the embedding firewall dropped p under rule ruleID: a drop event
// for the packet's connection (its flow ID if the connection is known, else a new one). It
// opens no connection and counts nothing in one.
func (t *Tracker) ReportDrop(p *Packet, ruleID string) { t.ReportDropAt(p, ruleID, t.clock()) }

// ReportDropAt is ReportDrop at a given time.
func (t *Tracker) ReportDropAt(p *Packet, ruleID string, now flow.Time) {
	k, _ := makeKey(&p.Src, &p.Dst, p.SrcPort, p.DstPort, p.Proto, p.IPv6)
	sh, h := t.locate(&k)
	sh.reportDrop(k, h, p, ruleID, now)
}

// Expire ends every connection whose timeout has passed at now and returns how many.
func (t *Tracker) Expire(now flow.Time) int {
	n := 0
	for _, sh := range t.shards {
		sh.mu.Lock()
		n += sh.sweepLocked(now, -1)
		sh.mu.Unlock()
	}
	return n
}

// Flush ends up to max connections (all when max < 0), whatever their state, and returns how
// many remain: for the end of a capture or a shutdown, in slices that a consumer can drain
// between calls.
func (t *Tracker) Flush(now flow.Time, max int) int {
	for _, sh := range t.shards {
		if max == 0 {
			break
		}
		n := sh.flush(now, max)
		if max > 0 {
			max -= n
		}
	}
	return t.Len()
}

// DrainBatches ends every connection at now, whatever its state, and hands their end events
// to emit in batches of at most size events (1,024 when size < 1), for the end of a capture:
// the same events as Flush with DrainEvents, cheaper, because the table is emptied at once
// rather than connection by connection. buffer, when not nil, returns a slice to fill next
// (as DrainEvents' spare; one with less than size room is not used); emit owns each batch it
// is given. Events already waiting for DrainEvents stay there (drain them first to keep a
// connection's events in order), and the end events bypass MaxPending. Each shard's lock is
// held while its batches are emitted: other calls on the tracker wait meanwhile, and emit
// must not call the tracker. It stops at the first error from emit, which it returns, with
// the connections not yet ended still in the table; it returns how many it ended.
func (t *Tracker) DrainBatches(now flow.Time, size int, buffer func() []flow.Event, emit func([]flow.Event) error) (int, error) {
	if size < 1 {
		size = 1024
	}
	total := 0
	for _, sh := range t.shards {
		n, err := sh.drainAll(now, size, buffer, emit)
		total += n
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// Len is the number of connections in the table.
func (t *Tracker) Len() int {
	n := 0
	for _, sh := range t.shards {
		sh.mu.Lock()
		n += sh.ix.n
		sh.mu.Unlock()
	}
	return n
}

// Stats returns the tracker's counters, summed over its shards.
func (t *Tracker) Stats() Stats {
	var s Stats
	for _, sh := range t.shards {
		sh.mu.Lock()
		x := sh.stats
		s.Entries += sh.ix.n
		sh.mu.Unlock()
		s.Started += x.Started
		s.Ended += x.Ended
		s.Expired += x.Expired
		s.Evicted += x.Evicted
		s.Reopened += x.Reopened
		s.Invalid += x.Invalid
		s.Related += x.Related
		s.Drops += x.Drops
		s.EventsDropped += x.EventsDropped
	}
	s.Invalid += t.invalid.Load()
	s.Fragments = t.fragments.Load()
	return s
}

// SetLocalPrefixes replaces Config.LocalPrefixes, for a host whose addresses change. It
// applies to connections opened from then on; known connections keep their direction.
func (t *Tracker) SetLocalPrefixes(p []netip.Prefix) {
	p = append([]netip.Prefix(nil), p...)
	t.local.Store(&p)
}

// LocalPrefixes returns the prefixes in use.
func (t *Tracker) LocalPrefixes() []netip.Prefix {
	return append([]netip.Prefix(nil), *t.local.Load()...)
}

// Shards is the number of parts the table is split into.
func (t *Tracker) Shards() int { return len(t.shards) }

// Ready receives a value when at least Config.BatchHint events are waiting.
func (t *Tracker) Ready() <-chan struct{} { return t.ready }

// Pending is the number of events waiting for DrainEvents.
func (t *Tracker) Pending() int { return int(t.pending.Load()) }

// DrainEvents appends the waiting events to spare (emptied first) and returns it; a
// consumer that hands back the slices it is done with makes the tracker allocate nothing.
// Events of one connection come out in order; events of different connections may not.
func (t *Tracker) DrainEvents(spare []flow.Event) []flow.Event {
	evs := spare[:0]
	for _, sh := range t.shards {
		evs = sh.drain(evs)
	}
	return evs
}

// Retune changes a running tracker's Config.MaxEntries, Timeouts, BatchHint and MaxPending
// (zero values mean the defaults, as in New) and its LocalPrefixes (as SetLocalPrefixes),
// keeping every connection with its flow ID: a reload of the embedder's options. New
// timeouts apply at once to every connection; a MaxEntries below the connections in the
// table evicts the excess at now, each with its end event. Clock, Source and Shards are
// fixed when the tracker is made.
func (t *Tracker) Retune(c Config, now flow.Time) {
	t.SetLocalPrefixes(c.LocalPrefixes)
	for _, sh := range t.shards {
		sh.mu.Lock() // all of them: every shard reads hint and maxPend under its own lock
	}
	defer func() {
		for _, sh := range t.shards {
			sh.mu.Unlock()
		}
	}()
	t.hint = c.BatchHint
	if t.hint <= 0 {
		t.hint = 1024
	}
	t.maxPend = c.MaxPending
	maxEntries := c.MaxEntries
	if maxEntries <= 0 {
		maxEntries = 1 << 18
	}
	per := (maxEntries + len(t.shards) - 1) / len(t.shards)
	for _, sh := range t.shards {
		sh.setTimeouts(c.Timeouts)
		sh.max = per
		for sh.ix.n > sh.max {
			n := sh.ix.n
			sh.evictLocked(now)
			if sh.ix.n == n {
				break
			}
		}
	}
}
