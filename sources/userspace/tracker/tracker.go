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
	Drops         uint64 // drop events reported by the embedder
	EventsDropped uint64 // events lost because MaxPending was reached
}

// Tracker is a connection table. Its methods are safe for concurrent use.
type Tracker struct {
	mu       sync.Mutex
	ix       index
	pages    [][]entry // the entries, in fixed pages so that growing never copies them
	nEntries int32     // entries ever allocated; table values index them
	free     []int32
	lists    [numClasses]list
	timeout  [numClasses]int64
	max      int
	local    []netip.Prefix
	clock    func() flow.Time
	source   string
	ids      *flow.IDGen
	pending  []flow.Event
	hint     int
	maxPend  int
	ready    chan struct{}
	swept    flow.Time // clock of the last sweep
	stats    Stats
	sweepGap int64
}

// sweepBudget bounds how many connections one sweep inside Process may end, so that a packet
// never waits behind a mass expiry; the next packets continue the sweep.
const sweepBudget = 1024

// New makes a tracker.
func New(c Config) *Tracker {
	t := &Tracker{
		max:     c.MaxEntries,
		local:   append([]netip.Prefix(nil), c.LocalPrefixes...),
		clock:   c.Clock,
		source:  c.Source,
		ids:     flow.NewIDGen(),
		hint:    c.BatchHint,
		maxPend: c.MaxPending,
		ready:   make(chan struct{}, 1),
	}
	if t.max <= 0 {
		t.max = 1 << 18
	}
	if t.clock == nil {
		t.clock = flow.Now
	}
	if t.hint <= 0 {
		t.hint = 1024
	}
	t.timeout = c.Timeouts.withDefaults().byClass()
	// Sweep often enough that the shortest timeout is honoured to within a tenth of itself,
	// and at least once a second.
	t.sweepGap = int64(1e9)
	for _, d := range t.timeout {
		if d > 0 && d/10 < t.sweepGap {
			t.sweepGap = d / 10
		}
	}
	initial := min(t.max, 4096)
	t.ix = newIndex(initial)
	for i := range t.lists {
		t.lists[i] = list{head: -1, tail: -1}
	}
	return t
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
}

const (
	pageShift = 10
	pageSize  = 1 << pageShift
)

func (t *Tracker) ent(i int32) *entry { return &t.pages[i>>pageShift][i&(pageSize-1)] }

// list is a doubly linked list of entries, least recently active first.
type list struct{ head, tail int32 }

func (t *Tracker) unlink(i int32) {
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

func (t *Tracker) pushBack(i int32, class uint8) {
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
func (t *Tracker) touch(i int32, class uint8) {
	e := t.ent(i)
	if e.class == class && e.next < 0 {
		return // already the most recent of its class
	}
	t.unlink(i)
	t.pushBack(i, class)
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
			return t.related(p, now, v6)
		}
	default:
		t.mu.Lock()
		t.stats.Invalid++
		t.mu.Unlock()
		return MatchNone
	}
	k, fromA := makeKey(&p.Src, &p.Dst, p.SrcPort, p.DstPort, p.Proto, p.IPv6)
	t.mu.Lock()
	if int64(now-t.swept) >= t.sweepGap {
		t.sweepLocked(now, sweepBudget)
	}
	h := t.ix.hash(&k)
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

// updateLocked advances the known connection i for packet p.
func (t *Tracker) updateLocked(i int32, e *entry, p *Packet, orig bool, now flow.Time, v6 bool) Match {
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
		if !orig && e.state == StateUnreplied {
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
func (t *Tracker) openLocked(k key, h uint32, fromA bool, p *Packet, now flow.Time, v6 bool) Match {
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
	e.dir = t.direction(p)
	t.insert(i, h)
	t.pushBack(i, classOf(p.Proto, st))
	t.stats.Started++
	t.eventLocked(e, flow.TypeStart, now)
	return MatchNew
}

func (t *Tracker) direction(p *Packet) flow.Direction {
	if len(t.local) == 0 {
		return flow.DirectionUnknown
	}
	src := p.SrcAddr()
	for _, pf := range t.local {
		if pf.Contains(src) {
			return flow.Egress
		}
	}
	dst := p.DstAddr()
	for _, pf := range t.local {
		if pf.Contains(dst) {
			return flow.Ingress
		}
	}
	return flow.DirectionUnknown
}

// related counts an ICMP error in the connection it quotes.
func (t *Tracker) related(p *Packet, now flow.Time, v6 bool) Match {
	q := &p.Quoted
	t.mu.Lock()
	defer t.mu.Unlock()
	if !q.Valid {
		t.stats.Invalid++
		return MatchNone
	}
	k, quotedFromA := makeKey(&q.Src, &q.Dst, q.SrcPort, q.DstPort, q.Proto, p.IPv6)
	i, ok := t.find(&k, t.ix.hash(&k))
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

// Peek reports what Process would make of p without changing anything.
func (t *Tracker) Peek(p *Packet) Match {
	return t.PeekAt(p, t.clock())
}

// PeekAt is Peek at a given time.
func (t *Tracker) PeekAt(p *Packet, now flow.Time) Match {
	v6 := p.Proto == 58
	src, dst, sp, dp, proto := &p.Src, &p.Dst, p.SrcPort, p.DstPort, p.Proto
	related := false
	if flow.IsICMP(p.Proto) {
		if _, ok := icmpQuery(p.ICMPType, v6); !ok {
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
	t.mu.Lock()
	defer t.mu.Unlock()
	i, ok := t.find(&k, t.ix.hash(&k))
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
		if !icmpIsRequest(p.ICMPType, v6) {
			return MatchNone
		}
	}
	return MatchNew
}

// StateOf returns the state of the connection p belongs to, and false when there is none.
func (t *Tracker) StateOf(p *Packet) (State, bool) {
	k, _ := makeKey(&p.Src, &p.Dst, p.SrcPort, p.DstPort, p.Proto, p.IPv6)
	t.mu.Lock()
	defer t.mu.Unlock()
	if i, ok := t.find(&k, t.ix.hash(&k)); ok {
		return t.ent(i).state, true
	}
	return StateNone, false
}

// ReportDrop records that the embedding firewall dropped p under rule ruleID: a drop event
// for the packet's connection (its flow ID if the connection is known, else a new one). It
// opens no connection and counts nothing in one.
func (t *Tracker) ReportDrop(p *Packet, ruleID string) {
	t.ReportDropAt(p, ruleID, t.clock())
}

// ReportDropAt is ReportDrop at a given time.
func (t *Tracker) ReportDropAt(p *Packet, ruleID string, now flow.Time) {
	k, _ := makeKey(&p.Src, &p.Dst, p.SrcPort, p.DstPort, p.Proto, p.IPv6)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.stats.Drops++
	ev := t.newEventLocked()
	if ev == nil {
		return
	}
	if i, ok := t.find(&k, t.ix.hash(&k)); ok {
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
func (t *Tracker) removeLocked(i int32, now flow.Time) {
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
func (t *Tracker) evictLocked(now flow.Time) {
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
func (t *Tracker) sweepLocked(now flow.Time, budget int) int {
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

// Expire ends every connection whose timeout has passed at now and returns how many.
func (t *Tracker) Expire(now flow.Time) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.sweepLocked(now, -1)
}

// Flush ends up to max connections (all when max < 0), whatever their state, and returns how
// many remain: for the end of a capture or a shutdown, in slices that a consumer can drain
// between calls.
func (t *Tracker) Flush(now flow.Time, max int) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for c := range t.lists {
		for h := t.lists[c].head; h >= 0 && n != max; h = t.lists[c].head {
			t.removeLocked(h, now)
			n++
		}
	}
	return t.ix.n
}

// Len is the number of connections in the table.
func (t *Tracker) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.ix.n
}

// Stats returns the tracker's counters.
func (t *Tracker) Stats() Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.stats
	s.Entries = t.ix.n
	return s
}

// Ready receives a value when at least Config.BatchHint events are waiting.
func (t *Tracker) Ready() <-chan struct{} { return t.ready }

// Pending is the number of events waiting for DrainEvents.
func (t *Tracker) Pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.pending)
}

// DrainEvents returns the waiting events and hands the tracker spare (emptied) as the buffer
// for the next ones, so that a consumer that gives back the slices it is done with makes the
// tracker allocate nothing. The returned slice belongs to the caller.
func (t *Tracker) DrainEvents(spare []flow.Event) []flow.Event {
	t.mu.Lock()
	defer t.mu.Unlock()
	evs := t.pending
	t.pending = spare[:0]
	return evs
}

// newEventLocked appends a zero event to the pending events and returns it, or nil when
// MaxPending is reached (the event is counted as dropped).
func (t *Tracker) newEventLocked() *flow.Event {
	if t.maxPend > 0 && len(t.pending) >= t.maxPend {
		t.stats.EventsDropped++
		return nil
	}
	if t.pending == nil {
		t.pending = make([]flow.Event, 0, t.hint)
	}
	t.pending = append(t.pending, flow.Event{})
	if len(t.pending) == t.hint {
		select {
		case t.ready <- struct{}{}:
		default:
		}
	}
	return &t.pending[len(t.pending)-1]
}

// eventLocked appends a start or end event for connection e.
func (t *Tracker) eventLocked(e *entry, typ flow.Type, now flow.Time) {
	ev := t.newEventLocked()
	if ev == nil {
		return
	}
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
