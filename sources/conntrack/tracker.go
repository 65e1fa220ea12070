package conntrack

import (
	"net/netip"

	"github.com/google/uuid"
	ct "github.com/ti-mo/conntrack"

	"github.com/flowpipe/flowpipe/core/flow"
)

// tracker turns conntrack messages and table dumps into start and end events. It remembers
// every connection it reported a start for, which gives the end the start's flow ID and lets
// a dump find what the event stream missed. It is owned by the reader goroutine.
type tracker struct {
	cfg   *Config
	local []netip.Prefix // local_prefixes, or the namespace's own addresses
	ids   *flow.IDGen

	known    map[ctKey]entry
	missing  int // known entries a dump did not find, waiting for their DESTROY
	fromDump int // known entries learned from a dump, which may never get a DESTROY

	// emit receives each event; reconstructed marks a start or end that was derived from a
	// dump (or from a DESTROY without a start) instead of the kernel's own event. The event is
	// the tracker's scratch space, reused for the next one: emit copies what it keeps.
	emit    func(e *flow.Event, reconstructed bool)
	scratch flow.Event

	filtered   [numFilterReasons]int
	duplicates int

	dec ctDecoder // the datagram decoder
}

// ctKey identifies a conntrack entry for its lifetime: the kernel's ID (a hash of the entry's
// address and tuple) plus the original tuple and zone, so a reused ID cannot be confused.
// The addresses are kept as 16 bytes rather than netip.Addr: the key holds no pointer (so the
// garbage collector never scans the map, which holds every open connection) and is 44 bytes
// instead of 64 to hash and compare.
type ctKey struct {
	src, dst     [16]byte // IPv4 as IPv4-mapped IPv6 (v4 set)
	id           uint32
	sport, dport uint16 // ICMP: identifier, type<<8|code
	zone         uint16
	proto        uint8
	v4           bool
}

func (k *ctKey) srcAddr() netip.Addr { return k.addr(&k.src) }
func (k *ctKey) dstAddr() netip.Addr { return k.addr(&k.dst) }

func (k *ctKey) addr(a *[16]byte) netip.Addr {
	if k.v4 {
		return netip.AddrFrom4([4]byte{a[12], a[13], a[14], a[15]})
	}
	return netip.AddrFrom16(*a)
}

type entry struct {
	flowID   uuid.UUID
	start    flow.Time
	orig     ctCounter
	reply    ctCounter
	mark     uint32
	fromDump bool      // the kernel may never send this entry's DESTROY
	missing  flow.Time // when a dump did not find it; 0 while it is in the table
}

func newTracker(cfg *Config, emit func(*flow.Event, bool)) *tracker {
	return &tracker{cfg: cfg, ids: flow.NewIDGen(), known: map[ctKey]entry{}, emit: emit}
}

func keyOf(f *ctFlow) ctKey {
	t := &f.orig
	k := ctKey{src: t.src.As16(), dst: t.dst.As16(), id: f.id, zone: f.zone, proto: t.proto, v4: t.src.Is4()}
	if flow.IsICMP(t.proto) {
		k.sport, k.dport = t.icmpID, uint16(t.icmpType)<<8|uint16(t.icmpCode)
	} else {
		k.sport, k.dport = t.sport, t.dport
	}
	return k
}

// onNew handles a NEW event observed at now.
func (t *tracker) onNew(f *ctFlow, now flow.Time) {
	if !t.count(t.filter(f)) {
		return
	}
	k := keyOf(f)
	if e, ok := t.known[k]; ok {
		// Already reported by a dump that ran while this event waited in the socket.
		if e.fromDump {
			e.fromDump = false
			t.fromDump--
			t.known[k] = e
		}
		t.duplicates++
		return
	}
	e := entry{flowID: t.ids.New(), start: f.start, mark: f.mark}
	if e.start == 0 {
		e.start = now
	}
	t.known[k] = e
	t.scratch = t.event(f, flow.TypeStart, &e, now)
	t.emit(&t.scratch, false)
}

// onDestroy handles a DESTROY event observed at now. A connection whose start was reported
// gets its end even if the filters exclude it now (its mark changed, or new options
// excluded its protocol): every start has its end.
func (t *tracker) onDestroy(f *ctFlow, now flow.Time) {
	k := keyOf(f)
	e, ok := t.known[k]
	if ok {
		t.forget(k, e)
	} else if !t.count(t.filter(f)) {
		return
	}
	if !ok {
		// The start was lost (an overrun, a reconnect) or filtered by a mark set later:
		// report one so that every end has its start.
		e = entry{flowID: t.ids.New(), start: f.start, mark: f.mark}
		if e.start == 0 {
			e.start = now
		}
		t.scratch = t.event(f, flow.TypeStart, &e, now)
		t.emit(&t.scratch, true)
	}
	t.scratch = t.event(f, flow.TypeEnd, &e, now)
	t.emit(&t.scratch, false)
}

func (t *tracker) forget(k ctKey, e entry) {
	delete(t.known, k)
	if e.missing != 0 {
		t.missing--
	}
	if e.fromDump {
		t.fromDump--
	}
}

// onDump reconciles the known entries with a full table dump taken at now: entries it did not
// know become reconstructed starts (or silent ones when announce is false, for existing_flows:
// false), and known entries absent from the dump are marked missing; expire ends them once
// resync_grace has passed without their DESTROY.
func (t *tracker) onDump(flows []ctFlow, now flow.Time, announce bool) (starts, missing int) {
	seen := make(map[ctKey]struct{}, len(flows))
	for i := range flows {
		f := &flows[i]
		k := keyOf(f)
		e, ok := t.known[k]
		if !ok && t.filter(f) >= 0 {
			continue // a known entry stays known whatever the filters say now: it gets its end
		}
		seen[k] = struct{}{}
		if ok {
			e.orig, e.reply, e.mark = f.countersOrig, f.countersReply, f.mark
			if e.missing != 0 {
				e.missing = 0
				t.missing--
			}
			t.known[k] = e
			continue
		}
		e = entry{flowID: t.ids.New(), start: f.start, orig: f.countersOrig,
			reply: f.countersReply, mark: f.mark, fromDump: true}
		if e.start == 0 {
			e.start = now
		}
		t.known[k] = e
		t.fromDump++
		if announce {
			t.scratch = t.event(f, flow.TypeStart, &e, now)
			t.emit(&t.scratch, true)
			starts++
		}
	}
	for k, e := range t.known {
		if _, ok := seen[k]; ok || e.missing != 0 {
			continue
		}
		e.missing = now
		t.known[k] = e
		t.missing++
		missing++
	}
	return starts, missing
}

// flow is the original tuple and zone of a key, enough to ask the kernel for the entry.
func (k ctKey) flow() ct.Flow {
	f := ct.Flow{Zone: k.zone}
	f.TupleOrig.IP.SourceAddress, f.TupleOrig.IP.DestinationAddress = k.srcAddr(), k.dstAddr()
	f.TupleOrig.Proto.Protocol = k.proto
	if flow.IsICMP(k.proto) {
		f.TupleOrig.Proto.ICMPID, f.TupleOrig.Proto.ICMPType, f.TupleOrig.Proto.ICMPCode = k.sport, uint8(k.dport>>8), uint8(k.dport)
	} else {
		f.TupleOrig.Proto.SourcePort, f.TupleOrig.Proto.DestinationPort = k.sport, k.dport
	}
	return f
}

// swept records what a GET for a known entry found: the entry (its counters are kept for a
// reconstructed end) or, when f is nil or another entry now holds the tuple, that it is gone.
func (t *tracker) swept(k ctKey, f *ctFlow, now flow.Time) {
	e, ok := t.known[k]
	if !ok {
		return
	}
	if f != nil && f.id == k.id {
		e.orig, e.reply, e.mark = f.countersOrig, f.countersReply, f.mark
	} else if e.missing == 0 {
		e.missing = now
		t.missing++
	}
	t.known[k] = e
}

// expire ends the entries that have been missing from the table for longer than the grace,
// with the counters of the last dump that saw them.
func (t *tracker) expire(now flow.Time) (ended int) {
	if t.missing == 0 {
		return 0
	}
	grace := flow.Time(t.cfg.ResyncGrace)
	for k, e := range t.known {
		if e.missing == 0 || now-e.missing < grace {
			continue
		}
		t.forget(k, e)
		t.scratch = t.eventFromKey(k, &e, now)
		t.emit(&t.scratch, true)
		ended++
	}
	return ended
}

// event builds a start or end event for f.
func (t *tracker) event(f *ctFlow, typ flow.Type, e *entry, now flow.Time) flow.Event {
	ev := flow.Event{
		EventID:   t.ids.New(),
		FlowID:    e.flowID,
		Timestamp: now,
		Start:     e.start,
		Type:      typ,
		SrcAddr:   f.orig.src,
		DstAddr:   f.orig.dst,
		Protocol:  f.orig.proto,
	}
	if flow.IsICMP(ev.Protocol) {
		ev.ICMPType, ev.ICMPCode = f.orig.icmpType, f.orig.icmpCode
	} else {
		ev.SrcPort, ev.DstPort = f.orig.sport, f.orig.dport
	}
	ev.Direction = t.direction(f.mark, ev.SrcAddr, ev.DstAddr)
	if typ == flow.TypeEnd {
		// The kernel's own start time is more exact than when the NEW event was read.
		if ks := f.start; ks != 0 {
			ev.Start = ks
		}
		ev.End = f.stop
		if ev.End == 0 {
			ev.End = now
		}
		t.counters(&ev, f.countersOrig, f.countersReply)
	}
	return ev
}

// eventFromKey builds the reconstructed end of an entry that left the table unseen.
func (t *tracker) eventFromKey(k ctKey, e *entry, now flow.Time) flow.Event {
	ev := flow.Event{
		EventID: t.ids.New(), FlowID: e.flowID, Timestamp: now, Start: e.start, End: now,
		Type: flow.TypeEnd, SrcAddr: k.srcAddr(), DstAddr: k.dstAddr(), Protocol: k.proto,
	}
	if flow.IsICMP(k.proto) {
		ev.ICMPType, ev.ICMPCode = uint8(k.dport>>8), uint8(k.dport)
	} else {
		ev.SrcPort, ev.DstPort = k.sport, k.dport
	}
	ev.Direction = t.direction(e.mark, ev.SrcAddr, ev.DstAddr)
	t.counters(&ev, e.orig, e.reply)
	return ev
}

// counters maps the original and reply directions to the host's received and sent: the
// original direction is what the initiator sent, so the host sent it on egress flows and
// received it on ingress flows. Flows neither end of which is local (forwarded) are seen
// from the initiator, like egress.
func (t *tracker) counters(ev *flow.Event, orig, reply ctCounter) {
	if ev.Direction == flow.Ingress {
		ev.RxPackets, ev.RxBytes, ev.TxPackets, ev.TxBytes = orig.packets, orig.bytes, reply.packets, reply.bytes
		return
	}
	ev.TxPackets, ev.TxBytes, ev.RxPackets, ev.RxBytes = orig.packets, orig.bytes, reply.packets, reply.bytes
}

// direction decides by mark first, then by which end is local.
func (t *tracker) direction(mark uint32, src, dst netip.Addr) flow.Direction {
	if m := mark & t.cfg.DirectionMarkMask; m != 0 || t.cfg.IngressMark != 0 || t.cfg.EgressMark != 0 {
		switch {
		case t.cfg.IngressMark != 0 && m == t.cfg.IngressMark:
			return flow.Ingress
		case t.cfg.EgressMark != 0 && m == t.cfg.EgressMark:
			return flow.Egress
		}
	}
	switch {
	case inAny(t.local, src):
		return flow.Egress
	case inAny(t.local, dst):
		return flow.Ingress
	}
	return flow.DirectionUnknown
}

func inAny(ps []netip.Prefix, a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Filter reasons, counted with Metrics.Filtered.
const (
	filterProtocol = iota
	filterZone
	filterMark
	filterExclude
	filterInclude
	numFilterReasons
)

var filterReasonNames = [numFilterReasons]string{"protocol", "zone", "mark", "exclude_prefixes", "include_prefixes"}

// count counts a rejection and reports whether the event is kept.
func (t *tracker) count(reason int) bool {
	if reason < 0 {
		return true
	}
	t.filtered[reason]++
	return false
}

// filter applies the filters: -1 keeps f, else the reason it is filtered out.
func (t *tracker) filter(f *ctFlow) int {
	c := t.cfg
	reason := -1
	src, dst := f.orig.src, f.orig.dst
	switch {
	case c.protoSet != nil && !c.protoSet[f.orig.proto]:
		reason = filterProtocol
	case c.Zone != nil && f.zone != *c.Zone:
		reason = filterZone
	case c.Mark != nil && f.mark&c.MarkMask != *c.Mark:
		reason = filterMark
	case len(c.ExcludePrefixes) > 0 && (inAny(c.ExcludePrefixes, src) || inAny(c.ExcludePrefixes, dst)):
		reason = filterExclude
	case len(c.IncludePrefixes) > 0 && !inAny(c.IncludePrefixes, src) && !inAny(c.IncludePrefixes, dst):
		reason = filterInclude
	}
	return reason
}

// changedFilters keeps the entries of a table dump that new filters concern, and runs with
// the old filters still in force: the entries known (so that the dump still sees them) and
// those the old filters excluded, which the new ones may include. An unknown entry that the
// old filters included has its NEW waiting in the socket (or lost in an overrun, which the
// resync that follows finds): it is left to that, so that it is not reported as
// reconstructed.
func (t *tracker) changedFilters(flows []ctFlow) []ctFlow {
	out := flows[:0]
	for i := range flows {
		f := &flows[i]
		if _, ok := t.known[keyOf(f)]; ok || t.filter(f) >= 0 {
			out = append(out, *f)
		}
	}
	return out
}
