package tracker

import (
	"encoding/binary"
	"net/netip"
	"sync"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Match is what the tracker made of a packet.
type Match uint8

const (
	MatchNone     Match = iota // not part of a connection and cannot open one (invalid or untracked)
	MatchNew                   // opens a new connection
	MatchOriginal              // belongs to a known connection, sent by its initiator
	MatchReply                 // belongs to a known connection, sent by its responder
	MatchRelated               // an ICMP error about a known connection
)

var matchNames = [...]string{"none", "new", "original", "reply", "related"}

func (m Match) String() string {
	if int(m) < len(matchNames) {
		return matchNames[m]
	}
	return "invalid"
}

// Config configures a Tracker. The zero value is usable: unlimited pending events, 1<<18
// entries, Linux timeouts, wall-clock time, every flow of unknown direction.
type Config struct {
	// LocalPrefixes are the host's own addresses: a connection initiated from one is egress,
	// one initiated towards one is ingress, and rx/tx counters follow. A connection with no
	// local end has direction unknown and counts its initiator's packets as tx.
	LocalPrefixes []netip.Prefix
	// MaxEntries caps the table; when it is full a new connection evicts a finished one
	// (CLOSE, then TIME_WAIT), else the least recently active. Zero means 1<<18.
	MaxEntries int
	Timeouts   Timeouts
	// Clock is the time Process uses (ProcessAt takes the time instead); nil means flow.Now.
	Clock func() flow.Time
	// Source is copied into every event's Source field.
	Source string
	// BatchHint is how many pending events make Ready fire; zero means 1024.
	BatchHint int
	// MaxPending caps the events waiting for DrainEvents; beyond it events are dropped and
	// counted in Stats.EventsDropped. Zero means no cap (a replay, which waits for its
	// consumer, wants that; a live feed, which cannot wait, wants a cap).
	MaxPending int
	// Shards splits the table into this many parts (rounded up to a power of two), each with
	// its own lock, for embedders whose packet workers run in parallel on many cores. The cost:
	// MaxEntries is shared out evenly and eviction picks its victim within the new
	// connection's shard, a packet sweeps only its own shard (call Expire for the others),
	// and DrainEvents returns the events of different connections in no particular order.
	// Zero or one means one table with one lock, which a single packet reader (such as the
	// flowpipe source) wants.
	Shards int
}

// Stats are the tracker's counters since it was created.
type Stats struct {
	Entries       int    // connections in the table now
	Started       uint64 // start events produced
	Ended         uint64 // end events produced
	Expired       uint64 // connections removed by their timeout
	Evicted       uint64 // connections removed because the table was full
	Reopened      uint64 // TCP connections superseded by a new SYN in TIME_WAIT or CLOSE
	Invalid       uint64 // packets that matched no connection and could not open one
	Related       uint64 // ICMP errors attributed to the connection they quote
	Fragments     uint64 // fragments after the first attributed to their datagram's connection
	Drops         uint64 // drop events reported by the embedder
	EventsDropped uint64 // events lost because MaxPending was reached
}

// shard is one part of the table, with its own lock: a connection lives in the shard its
// key hashes to, so packet workers on different connections rarely wait for each other.
type shard struct {
	_        [64]byte // keep the lock off the cache line of the previous shard's fields
	t        *Tracker
	mu       sync.Mutex
	ix       index
	pages    [][]entry // the entries, in fixed pages so that growing never copies them
	nEntries int32     // entries ever allocated; table values index them
	free     []int32
	lists    [numClasses]list
	timeout  [numClasses]int64
	max      int
	source   string
	ids      *flow.IDGen // one per shard: used under the shard's lock
	pending  []flow.Event
	swept    flow.Time // clock of the last sweep
	stats    Stats
	sweepGap int64
	_        [64]byte
}

// udpStreamAfter is how long an answered UDP flow must have lived to get the stream timeout
// (Linux: two seconds).
const udpStreamAfter = int64(2e9)

// sweepBudget bounds how many connections one sweep inside Process may end, so that a packet
// never waits behind a mass expiry; the next packets continue the sweep.
const sweepBudget = 1024

func newShard(t *Tracker, c *Config, max int, seed *[6]uint64) *shard {
	sh := &shard{
		t:      t,
		max:    max,
		source: c.Source,
		ids:    flow.NewIDGen(),
	}
	sh.setTimeouts(c.Timeouts)
	sh.ix = newIndex(min(max, 4096), seed)
	for i := range sh.lists {
		sh.lists[i] = list{head: -1, tail: -1}
	}
	return sh
}

// setTimeouts sets the shard's timeouts (under its lock once the shard is in use).
func (sh *shard) setTimeouts(to Timeouts) {
	sh.timeout = to.withDefaults().byClass()
	// Sweep often enough that the shortest timeout is honoured to within a tenth of itself,
	// and at least once a second.
	sh.sweepGap = int64(1e9)
	for _, d := range sh.timeout {
		if d > 0 && d/10 < sh.sweepGap {
			sh.sweepGap = d / 10
		}
	}
}

// key is a connection's 5-tuple in a canonical order (the lower address and port first), so
// that both directions of a connection find it with one lookup. Five words with no padding
// hash as one block of memory.
type key struct {
	a0, a1, b0, b1 uint64
	rest           uint64 // portA<<48 | portB<<32 | proto<<8 | ipv6
}

// makeKey returns the key of the tuple and whether src is the key's side A.
func makeKey(src, dst *[16]byte, sport, dport uint16, proto uint8, v6 bool) (key, bool) {
	// Native byte order: the order of keys only has to be consistent, not numeric.
	s0, s1 := binary.LittleEndian.Uint64(src[:8]), binary.LittleEndian.Uint64(src[8:])
	d0, d1 := binary.LittleEndian.Uint64(dst[:8]), binary.LittleEndian.Uint64(dst[8:])
	fromA := s0 < d0 || s0 == d0 && (s1 < d1 || s1 == d1 && sport <= dport)
	var k key
	var pa, pb uint16
	if fromA {
		k.a0, k.a1, k.b0, k.b1, pa, pb = s0, s1, d0, d1, sport, dport
	} else {
		k.a0, k.a1, k.b0, k.b1, pa, pb = d0, d1, s0, s1, dport, sport
	}
	k.rest = uint64(pa)<<48 | uint64(pb)<<32 | uint64(proto)<<8
	if v6 {
		k.rest |= 1
	}
	return k, fromA
}

func (k *key) proto() uint8 { return uint8(k.rest >> 8) }
func (k *key) v6() bool     { return k.rest&1 != 0 }

func (k *key) side(a bool) (netip.Addr, uint16) {
	var b [16]byte
	var port uint16
	if a {
		binary.LittleEndian.PutUint64(b[:8], k.a0)
		binary.LittleEndian.PutUint64(b[8:], k.a1)
		port = uint16(k.rest >> 48)
	} else {
		binary.LittleEndian.PutUint64(b[:8], k.b0)
		binary.LittleEndian.PutUint64(b[8:], k.b1)
		port = uint16(k.rest >> 32)
	}
	return addrOf(b, k.v6()), port
}

// entry is one connection.
type entry struct {
	key        key
	hash       uint32
	flowID     uuid.UUID
	start      flow.Time
	last       flow.Time
	origPkts   uint64
	origBytes  uint64
	replyPkts  uint64
	replyBytes uint64
	tcp        tcpState
	prev, next int32 // neighbours in the list of its timeout class
	class      uint8
	state      State
	origIsA    bool // the initiator is the key's side A
	dir        flow.Direction
	icmpType   uint8 // the request type of an ICMP query connection
	icmpCode   uint8
	inUse      bool
	seenReply  bool // UDP, ICMP: an answer has been seen
}

const (
	pageShift = 10
	pageSize  = 1 << pageShift
)

func (t *shard) ent(i int32) *entry { return &t.pages[i>>pageShift][i&(pageSize-1)] }

// list is a doubly linked list of entries, least recently active first.
type list struct{ head, tail int32 }

func (t *shard) unlink(i int32) {
	e := t.ent(i)
	l := &t.lists[e.class]
	if e.prev >= 0 {
		t.ent(e.prev).next = e.next
	} else {
		l.head = e.next
	}
	if e.next >= 0 {
		t.ent(e.next).prev = e.prev
	} else {
		l.tail = e.prev
	}
}

func (t *shard) pushBack(i int32, class uint8) {
	e := t.ent(i)
	l := &t.lists[class]
	e.class, e.prev, e.next = class, l.tail, -1
	if l.tail >= 0 {
		t.ent(l.tail).next = i
	} else {
		l.head = i
	}
	l.tail = i
}

// touch moves entry i to the back of the list of class, its new timeout class.
func (t *shard) touch(i int32, class uint8) {
	e := t.ent(i)
	if e.class == class && e.next < 0 {
		return // already the most recent of its class
	}
	t.unlink(i)
	t.pushBack(i, class)
}

// process tracks p, whose key is k (hash h), in this shard.
func (t *shard) process(k key, h uint32, fromA bool, p *Packet, now flow.Time, v6 bool) Match {
	t.mu.Lock()
	if int64(now-t.swept) >= t.sweepGap {
		t.sweepLocked(now, sweepBudget)
	}
	i, ok := t.find(&k, h)
	if ok {
		e := t.ent(i)
		if int64(now-e.last) >= t.timeout[e.class] {
			t.stats.Expired++
			t.removeLocked(i, now)
		} else {
			m := t.updateLocked(i, e, p, fromA == e.origIsA, now, v6)
			t.mu.Unlock()
			return m
		}
	}
	m := t.openLocked(k, h, fromA, p, now, v6)
	t.mu.Unlock()
	return m
}

// entryOf returns the entry and flow ID of the connection with key k (hash h).
func (t *shard) entryOf(k key, h uint32) (int32, uuid.UUID, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i, ok := t.find(&k, h); ok {
		return i, t.ent(i).flowID, true
	}
	return 0, uuid.UUID{}, false
}

// addFragment counts a later fragment of a datagram whose first fragment belonged to entry i
// (if it is still the connection with flow ID id): its data only, not a packet, so that the
// datagram counts once with its reassembled length.
func (t *shard) addFragment(i int32, id uuid.UUID, orig bool, p *Packet, now flow.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if int(i) >= int(t.nEntries) {
		return false
	}
	e := t.ent(i)
	if !e.inUse || e.flowID != id {
		return false
	}
	n := uint64(p.Length) - uint64(min(uint32(p.HdrLen), p.Length))
	if orig {
		e.origBytes += n
	} else {
		e.replyBytes += n
	}
	e.last = now
	t.touch(i, e.class)
	return true
}

// updateLocked advances the known connection i for packet p.
func (t *shard) updateLocked(i int32, e *entry, p *Packet, orig bool, now flow.Time, v6 bool) Match {
	dir := uint8(dirReply)
	if orig {
		dir = dirOrig
	}
	switch p.Proto {
	case 6:
		if tcpReopens(e.state, p.TCPFlags) {
			// A new connection on the same ports: the finished one ends here.
			t.stats.Reopened++
			k, h, fromA := e.key, e.hash, orig == e.origIsA // copied before the slot is freed and reused
			t.removeLocked(i, now)
			return t.openLocked(k, h, fromA, p, now, v6)
		}
		e.state = e.tcp.next(e.state, p, dir)
	default:
		if !orig {
			e.seenReply = true
		}
		// Linux calls a UDP flow a stream, with the longer timeout, once it has been answered
		// and is still active two seconds after it began; a quick query and answer keep the
		// short one.
		if e.seenReply && e.state == StateUnreplied && (p.Proto != 17 || int64(now-e.start) >= udpStreamAfter) {
			e.state = StateReplied
		}
	}
	if orig {
		e.origPkts++
		e.origBytes += uint64(p.Length)
	} else {
		e.replyPkts++
		e.replyBytes += uint64(p.Length)
	}
	e.last = now
	t.touch(i, classOf(p.Proto, e.state))
	if orig {
		return MatchOriginal
	}
	return MatchReply
}

// openLocked opens a connection for p, whose key is k, if p can open one.
func (t *shard) openLocked(k key, h uint32, fromA bool, p *Packet, now flow.Time, v6 bool) Match {
	var st State
	switch p.Proto {
	case 6:
		s, ok := tcpOpens(p.TCPFlags)
		if !ok {
			t.stats.Invalid++
			return MatchNone
		}
		st = s
	case 17:
		st = StateUnreplied
	default:
		if !icmpIsRequest(p.ICMPType, v6) {
			t.stats.Invalid++ // an answer to a query we never saw
			return MatchNone
		}
		st = StateUnreplied
	}
	if t.ix.n >= t.max {
		t.evictLocked(now)
	}
	var i int32
	if n := len(t.free); n > 0 {
		i = t.free[n-1]
		t.free = t.free[:n-1]
	} else {
		i = t.nEntries
		if int(i)>>pageShift == len(t.pages) {
			t.pages = append(t.pages, make([]entry, pageSize))
		}
		t.nEntries++
	}
	e := t.ent(i)
	*e = entry{
		key:       k,
		hash:      h,
		flowID:    t.ids.New(),
		start:     now,
		last:      now,
		origPkts:  1,
		origBytes: uint64(p.Length),
		state:     st,
		origIsA:   fromA,
		inUse:     true,
	}
	if flow.IsICMP(p.Proto) {
		e.icmpType, e.icmpCode = p.ICMPType, p.ICMPCode
	}
	if st == StateSynSent {
		e.tcp.synSeq = p.Seq
	}
	e.dir = t.direction(p)
	t.insert(i, h)
	t.pushBack(i, classOf(p.Proto, st))
	t.stats.Started++
	t.eventLocked(e, flow.TypeStart, now)
	return MatchNew
}

func (t *shard) direction(p *Packet) flow.Direction {
	local := *t.t.local.Load()
	if len(local) == 0 {
		return flow.DirectionUnknown
	}
	src := p.SrcAddr()
	for _, pf := range local {
		if pf.Contains(src) {
			return flow.Egress
		}
	}
	dst := p.DstAddr()
	for _, pf := range local {
		if pf.Contains(dst) {
			return flow.Ingress
		}
	}
	return flow.DirectionUnknown
}

// related counts an ICMP error in the connection it quotes, whose key is k (hash h).
func (t *shard) related(k key, h uint32, quotedFromA bool, p *Packet) Match {
	t.mu.Lock()
	defer t.mu.Unlock()
	i, ok := t.find(&k, h)
	if !ok {
		t.stats.Invalid++
		return MatchNone
	}
	e := t.ent(i)
	// The error travels back towards the sender of the quoted packet. It does not refresh
	// the connection's timeout: an error is no sign that the connection is alive.
	if quotedFromA == e.origIsA {
		e.replyPkts++
		e.replyBytes += uint64(p.Length)
	} else {
		e.origPkts++
		e.origBytes += uint64(p.Length)
	}
	t.stats.Related++
	return MatchRelated
}

// peek is PeekAt for a packet whose key is k (hash h); related marks an ICMP error (k is
// then the quoted packet's key).
func (t *shard) peek(k key, h uint32, fromA, related bool, p *Packet, now flow.Time) Match {
	t.mu.Lock()
	defer t.mu.Unlock()
	i, ok := t.find(&k, h)
	if ok {
		e := t.ent(i)
		if int64(now-e.last) < t.timeout[e.class] {
			switch {
			case related:
				return MatchRelated
			case p.Proto == 6 && tcpReopens(e.state, p.TCPFlags):
				return MatchNew
			case fromA == e.origIsA:
				return MatchOriginal
			default:
				return MatchReply
			}
		}
	}
	if related {
		return MatchNone
	}
	switch p.Proto {
	case 6:
		if _, ok := tcpOpens(p.TCPFlags); !ok {
			return MatchNone
		}
	case 1, 58:
		if !icmpIsRequest(p.ICMPType, p.Proto == 58) {
			return MatchNone
		}
	}
	return MatchNew
}

func (t *shard) stateOf(k key, h uint32) (State, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i, ok := t.find(&k, h); ok {
		return t.ent(i).state, true
	}
	return StateNone, false
}

func (t *shard) reportDrop(k key, h uint32, p *Packet, ruleID string, now flow.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.stats.Drops++
	ev := t.newEventLocked()
	if ev == nil {
		return
	}
	if i, ok := t.find(&k, h); ok {
		ev.FlowID = t.ent(i).flowID
	} else {
		ev.FlowID = t.ids.New()
	}
	ev.EventID = t.ids.New()
	ev.Type = flow.TypeDrop
	ev.Timestamp, ev.Start = now, now
	ev.SrcAddr, ev.DstAddr = p.SrcAddr(), p.DstAddr()
	ev.Protocol = p.Proto
	if flow.IsICMP(p.Proto) {
		ev.ICMPType, ev.ICMPCode = p.ICMPType, p.ICMPCode
	} else {
		ev.SrcPort, ev.DstPort = p.SrcPort, p.DstPort
	}
	ev.Direction = t.direction(p)
	if ev.Direction == flow.Ingress {
		ev.RxPackets, ev.RxBytes = 1, uint64(p.Length)
	} else {
		ev.TxPackets, ev.TxBytes = 1, uint64(p.Length)
	}
	ev.RuleID = ruleID
	ev.Source = t.source
}

// removeLocked ends connection i: an end event with its final counters, and its slot freed.
func (t *shard) removeLocked(i int32, now flow.Time) {
	e := t.ent(i)
	t.eventLocked(e, flow.TypeEnd, now)
	t.stats.Ended++
	t.unlink(i)
	t.delete(i, e.hash)
	e.inUse = false
	t.free = append(t.free, i)
}

// evictLocked makes room for one connection: expired ones first, then a finished TCP
// connection, then the least recently active of all.
func (t *shard) evictLocked(now flow.Time) {
	if t.sweepLocked(now, 1) > 0 {
		return
	}
	victim := t.lists[StateClose].head
	if victim < 0 {
		victim = t.lists[StateTimeWait].head
	}
	if victim < 0 {
		for c := range t.lists {
			h := t.lists[c].head
			if h >= 0 && (victim < 0 || t.ent(h).last < t.ent(victim).last) {
				victim = h
			}
		}
	}
	if victim >= 0 {
		t.stats.Evicted++
		t.removeLocked(victim, now)
	}
}

// sweepLocked ends up to budget connections whose timeout has passed at now and returns how
// many it ended. A sweep that finished records now as the last sweep.
func (t *shard) sweepLocked(now flow.Time, budget int) int {
	n := 0
	for c := range t.lists {
		to := t.timeout[c]
		for h := t.lists[c].head; h >= 0 && int64(now-t.ent(h).last) >= to; h = t.lists[c].head {
			if n == budget {
				return n
			}
			t.stats.Expired++
			t.removeLocked(h, now)
			n++
		}
	}
	t.swept = now
	return n
}

// flush ends up to max connections of the shard (all when max < 0) and returns how many it
// ended.
func (t *shard) flush(now flow.Time, max int) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for c := range t.lists {
		for h := t.lists[c].head; h >= 0 && n != max; h = t.lists[c].head {
			t.removeLocked(h, now)
			n++
		}
	}
	return n
}

// drainAll ends every connection of the shard at now and hands their end events to emit in
// batches of at most size, under the shard's lock. Entries leave their lists and are freed
// batch by batch, but stay in the index until the end, which is then cleared at once: a
// per-entry index delete (a probe and a shift-back of the run) is most of what ending a
// connection costs. On an error from emit the index is rebuilt from the connections left.
func (t *shard) drainAll(now flow.Time, size int, buffer func() []flow.Event, emit func([]flow.Event) error) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	var batch []flow.Event
	for c := range t.lists {
		for t.lists[c].head >= 0 {
			if batch == nil {
				if buffer != nil {
					batch = buffer()[:0]
				}
				if cap(batch) < size {
					batch = make([]flow.Event, 0, size)
				}
			}
			h := t.lists[c].head
			e := t.ent(h)
			batch = append(batch, flow.Event{})
			t.fillLocked(&batch[len(batch)-1], e, flow.TypeEnd, now)
			t.stats.Ended++
			t.unlink(h)
			e.inUse = false
			t.free = append(t.free, h)
			n++
			if len(batch) == size {
				err := emit(batch)
				batch = nil
				if err != nil {
					t.rebuildIndexLocked()
					return n, err
				}
			}
		}
	}
	var err error
	if len(batch) > 0 {
		err = emit(batch)
	}
	clear(t.ix.slots)
	t.ix.n = 0
	return n, err
}

// rebuildIndexLocked makes the index again from the connections in the lists.
func (t *shard) rebuildIndexLocked() {
	clear(t.ix.slots)
	t.ix.n = 0
	for c := range t.lists {
		for i := t.lists[c].head; i >= 0; i = t.ent(i).next {
			t.ix.put(slot{hash: t.ent(i).hash, ref: i + 1})
			t.ix.n++
		}
	}
}

// drain appends the shard's pending events to dst and empties them.
func (t *shard) drain(dst []flow.Event) []flow.Event {
	t.mu.Lock()
	defer t.mu.Unlock()
	dst = append(dst, t.pending...)
	t.t.pending.Add(-int64(len(t.pending)))
	t.pending = t.pending[:0]
	return dst
}

// newEventLocked appends a zero event to the pending events and returns it, or nil when
// MaxPending is reached (the event is counted as dropped).
func (t *shard) newEventLocked() *flow.Event {
	tr := t.t
	if tr.maxPend > 0 && tr.pending.Load() >= int64(tr.maxPend) {
		t.stats.EventsDropped++
		return nil
	}
	t.pending = append(t.pending, flow.Event{})
	if tr.pending.Add(1) == int64(tr.hint) {
		select {
		case tr.ready <- struct{}{}:
		default:
		}
	}
	return &t.pending[len(t.pending)-1]
}

// eventLocked appends a start or end event for connection e.
func (t *shard) eventLocked(e *entry, typ flow.Type, now flow.Time) {
	ev := t.newEventLocked()
	if ev == nil {
		return
	}
	t.fillLocked(ev, e, typ, now)
}

// fillLocked writes the start or end event of connection e into ev (a zero event).
func (t *shard) fillLocked(ev *flow.Event, e *entry, typ flow.Type, now flow.Time) {
	ev.EventID = t.ids.New()
	ev.FlowID = e.flowID
	ev.Type = typ
	ev.Timestamp = now
	ev.Start = e.start
	if typ == flow.TypeEnd {
		ev.End = e.last
	}
	var sp, dp uint16
	ev.SrcAddr, sp = e.key.side(e.origIsA)
	ev.DstAddr, dp = e.key.side(!e.origIsA)
	ev.Protocol = e.key.proto()
	if flow.IsICMP(ev.Protocol) {
		ev.ICMPType, ev.ICMPCode = e.icmpType, e.icmpCode
	} else {
		ev.SrcPort, ev.DstPort = sp, dp
	}
	ev.Direction = e.dir
	if e.dir == flow.Ingress {
		ev.RxPackets, ev.RxBytes, ev.TxPackets, ev.TxBytes = e.origPkts, e.origBytes, e.replyPkts, e.replyBytes
	} else {
		ev.TxPackets, ev.TxBytes, ev.RxPackets, ev.RxBytes = e.origPkts, e.origBytes, e.replyPkts, e.replyBytes
	}
	ev.Source = t.source
}
