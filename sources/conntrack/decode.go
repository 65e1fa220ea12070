package conntrack

import (
	"encoding/binary"
	"net/netip"

	ct "github.com/ti-mo/conntrack"

	"github.com/flowpipe/flowpipe/core/flow"
)

// This file decodes ctnetlink messages (a netlink header, the nfgenmsg, then nested
// attributes) straight from the receive buffer into ctFlow, without allocating. It decodes
// the attributes flowpipe uses: the original and reply tuples, counters, timestamps, mark,
// zone, ID, status and, when asked, labels; every other attribute is skipped. For those it
// decodes it follows ti-mo/conntrack's rules exactly (sizes, required children, the nested
// flag), so that it gives the same result on every message ti-mo accepts (FuzzDecodeAgrees).

// ctFlow is one conntrack entry as flowpipe needs it.
type ctFlow struct {
	orig, reply   ctTuple
	countersOrig  ctCounter
	countersReply ctCounter
	start, stop   flow.Time // kernel timestamps (CTA_TIMESTAMP), 0 when absent
	// labels is CTA_LABELS when the decoder was asked for them. It aliases the receive
	// buffer: it is valid only until the callback returns.
	labels []byte
	id     uint32
	mark   uint32
	status uint32
	zone   uint16
}

// ctTuple is a CTA_TUPLE_ORIG or CTA_TUPLE_REPLY.
type ctTuple struct {
	src, dst     netip.Addr
	sport, dport uint16
	icmpID       uint16
	zone         uint16
	proto        uint8
	icmpType     uint8
	icmpCode     uint8
}

type ctCounter struct{ packets, bytes uint64 }

// Conntrack event types, as ti-mo/conntrack tells them apart.
const (
	ctEvNew = iota + 1
	ctEvUpdate
	ctEvDestroy
)

// Netlink and ctnetlink numbers (linux/netlink.h, linux/netfilter/nfnetlink*.h).
const (
	nlmsgNoop, nlmsgError, nlmsgDone, nlmsgOverrun = 1, 2, 3, 4
	nlmFCreate, nlmFExcl                           = 0x400, 0x200
	nfnlSubsysCTNetlink                            = 1
	ipctnlMsgCTNew, ipctnlMsgCTDelete              = 0, 2
	nfgenmsgLen                                    = 4
	nlaHdrLen                                      = 4
	nlaFNested                                     = 0x8000
	nlaTypeMask                                    = 0x3fff

	ctaTupleOrig, ctaTupleReply         = 1, 2
	ctaStatus                           = 3
	ctaMark                             = 8
	ctaCountersOrig, ctaCountersReply   = 9, 10
	ctaID                               = 12
	ctaZone                             = 18
	ctaTimestamp                        = 20
	ctaLabels                           = 22
	ctaTupleIP, ctaTupleProto           = 1, 2
	ctaTupleZone                        = 3
	ctaProtoNum                         = 1
	ctaProtoSrcPort, ctaProtoDstPort    = 2, 3
	ctaProtoICMPID, ctaProtoICMPType    = 4, 5
	ctaProtoICMPCode, ctaProtoICMPv6ID  = 6, 7
	ctaProtoICMPv6Type                  = 8
	ctaProtoICMPv6Code                  = 9
	ctaCountersPackets, ctaCountersByte = 1, 2
	ctaCountersPad                      = 5
	ctaTimestampStart, ctaTimestampStop = 1, 2
)

// attrs iterates netlink attributes the way mdlayher/netlink's AttributeDecoder does: a
// zero-length attribute is visited (with no data) and skipped by a header's worth; a length
// of 1 to 3, or past the end, or fewer than 4 bytes left over, makes the whole set bad.
type attrs struct {
	rest []byte // from the next attribute on; not empty after the last one: malformed
	data []byte
	typ  uint16 // with its flags
	n    int    // attributes of non-zero length seen so far (AttributeDecoder.Len)
}

// next is kept small enough to be inlined: it runs for every attribute.
func (a *attrs) next() bool {
	r := a.rest
	if len(r) < nlaHdrLen {
		return false
	}
	l := int(binary.NativeEndian.Uint16(r))
	if l > len(r) || uint(l-1) < nlaHdrLen-1 { // longer than what is left, or 1 to 3
		return false
	}
	if l != 0 {
		a.n++
	} else {
		l = nlaHdrLen
	}
	a.typ = binary.NativeEndian.Uint16(r[2:])
	a.data = r[nlaHdrLen:l]
	a.rest = r[min((l+3)&^3, len(r)):]
	return true
}

// done reports whether every attribute was read: the walk did not stop at a malformed one.
func (a *attrs) done() bool { return len(a.rest) == 0 }

// kind is the attribute's type without its flags. Like ti-mo/conntrack, which keeps types in
// a uint8, it looks at the low 8 bits only (no ctnetlink type is larger).
func (a *attrs) kind() uint16 { return a.typ & nlaTypeMask & 0xff }

func (a *attrs) u8() (uint8, bool) {
	if len(a.data) != 1 {
		return 0, false
	}
	return a.data[0], true
}

func (a *attrs) u16() (uint16, bool) {
	if len(a.data) != 2 {
		return 0, false
	}
	return binary.BigEndian.Uint16(a.data), true
}

func (a *attrs) u32() (uint32, bool) {
	if len(a.data) != 4 {
		return 0, false
	}
	return binary.BigEndian.Uint32(a.data), true
}

func (a *attrs) u64() (uint64, bool) {
	if len(a.data) != 8 {
		return 0, false
	}
	return binary.BigEndian.Uint64(a.data), true
}

// ctDecoder decodes conntrack event datagrams. Its zero value decodes everything but labels.
type ctDecoder struct {
	labels bool // decode CTA_LABELS into ctFlow.labels
}

// nlSplit walks the netlink messages of a datagram, skipping the control messages (NOOP,
// ERROR, DONE, OVERRUN). A length that does not fit ends the walk and counts as bad. It is
// the parser of what the kernel sends, so it must survive any input (see the fuzz tests).
type nlSplit struct {
	b   []byte
	bad int
}

func (s *nlSplit) next() (typ, flags uint16, data []byte, ok bool) {
	for len(s.b) >= nlmsgHdrLen {
		b := s.b
		l := int(binary.NativeEndian.Uint32(b[0:4]))
		if l < nlmsgHdrLen || l > len(b) {
			s.b, s.bad = nil, s.bad+1
			return 0, 0, nil, false
		}
		typ = binary.NativeEndian.Uint16(b[4:6])
		flags = binary.NativeEndian.Uint16(b[6:8])
		data = b[nlmsgHdrLen:l]
		s.b = b[min((l+3)&^3, len(b)):]
		switch typ {
		case nlmsgNoop, nlmsgError, nlmsgDone, nlmsgOverrun:
			continue
		}
		return typ, flags, data, true
	}
	return 0, 0, nil, false
}

// decodeMessage decodes one ctnetlink message (its netlink type, flags and payload) into f.
func (d *ctDecoder) decodeMessage(typ, flags uint16, data []byte, f *ctFlow) (ev int, ok bool) {
	if len(data) < nfgenmsgLen || typ>>8 != nfnlSubsysCTNetlink {
		return 0, false
	}
	switch typ & 0xff {
	case ipctnlMsgCTNew:
		ev = ctEvUpdate
		if flags&(nlmFCreate|nlmFExcl) != 0 {
			ev = ctEvNew
		}
	case ipctnlMsgCTDelete:
		ev = ctEvDestroy
	default:
		return 0, false
	}
	*f = ctFlow{}
	if !d.decodeFlow(data[nfgenmsgLen:], f) {
		return 0, false
	}
	return ev, true
}

func (d *ctDecoder) decodeFlow(b []byte, f *ctFlow) bool {
	a := attrs{rest: b}
	for a.next() {
		var ok bool
		switch a.kind() {
		case ctaTupleOrig:
			ok = a.typ&nlaFNested != 0 && decodeTuple(a.data, &f.orig)
		case ctaTupleReply:
			ok = a.typ&nlaFNested != 0 && decodeTuple(a.data, &f.reply)
		case ctaCountersOrig:
			ok = a.typ&nlaFNested != 0 && decodeCounter(a.data, &f.countersOrig)
		case ctaCountersReply:
			ok = a.typ&nlaFNested != 0 && decodeCounter(a.data, &f.countersReply)
		case ctaTimestamp:
			ok = a.typ&nlaFNested != 0 && decodeTimestamp(a.data, f)
		case ctaID:
			f.id, ok = a.u32()
		case ctaMark:
			f.mark, ok = a.u32()
		case ctaStatus:
			f.status, ok = a.u32()
		case ctaZone:
			f.zone, ok = a.u16()
		case ctaLabels:
			if d.labels {
				f.labels = a.data
			}
			ok = true
		default:
			ok = true // not needed: skipped without looking inside
		}
		if !ok {
			return false
		}
	}
	return a.done()
}

func decodeTuple(b []byte, t *ctTuple) bool {
	a := attrs{rest: b}
	for a.next() {
		var ok bool
		switch a.kind() {
		case ctaTupleIP:
			// Each occurrence replaces the previous one whole, as in ti-mo.
			t.src, t.dst = netip.Addr{}, netip.Addr{}
			ok = decodeIPTuple(a.data, t)
		case ctaTupleProto:
			t.proto, t.sport, t.dport, t.icmpID, t.icmpType, t.icmpCode = 0, 0, 0, 0, 0, 0
			ok = decodeProtoTuple(a.data, t)
		case ctaTupleZone:
			t.zone, ok = a.u16()
		}
		if !ok {
			return false
		}
	}
	return a.done() && a.n >= 2
}

func decodeIPTuple(b []byte, t *ctTuple) bool {
	a := attrs{rest: b}
	for a.next() {
		var addr netip.Addr
		switch len(a.data) {
		case 4:
			addr = netip.AddrFrom4([4]byte(a.data))
		case 16:
			addr = netip.AddrFrom16([16]byte(a.data))
		default:
			return false
		}
		switch a.kind() {
		case 1, 3: // CTA_IP_V4_SRC, CTA_IP_V6_SRC
			t.src = addr
		case 2, 4: // CTA_IP_V4_DST, CTA_IP_V6_DST
			t.dst = addr
		default:
			return false
		}
	}
	return a.done() && a.n == 2
}

func decodeProtoTuple(b []byte, t *ctTuple) bool {
	a := attrs{rest: b}
	for a.next() {
		var ok bool
		switch a.kind() {
		case ctaProtoNum:
			t.proto, ok = a.u8()
		case ctaProtoSrcPort:
			t.sport, ok = a.u16()
		case ctaProtoDstPort:
			t.dport, ok = a.u16()
		case ctaProtoICMPID, ctaProtoICMPv6ID:
			t.icmpID, ok = a.u16()
		case ctaProtoICMPType, ctaProtoICMPv6Type:
			t.icmpType, ok = a.u8()
		case ctaProtoICMPCode, ctaProtoICMPv6Code:
			t.icmpCode, ok = a.u8()
		}
		if !ok {
			return false
		}
	}
	return a.done() && a.n > 0
}

func decodeCounter(b []byte, c *ctCounter) bool {
	a := attrs{rest: b}
	for a.next() {
		var ok bool
		switch a.kind() {
		case ctaCountersPackets:
			c.packets, ok = a.u64()
		case ctaCountersByte:
			c.bytes, ok = a.u64()
		case ctaCountersPad:
			ok = true
		}
		if !ok {
			return false
		}
	}
	return a.done() && a.n >= 2
}

func decodeTimestamp(b []byte, f *ctFlow) bool {
	a := attrs{rest: b}
	for a.next() {
		var ok bool
		var v uint64
		switch a.kind() {
		case ctaTimestampStart:
			v, ok = a.u64()
			f.start = flow.Time(int64(v))
		case ctaTimestampStop:
			v, ok = a.u64()
			f.stop = flow.Time(int64(v))
		case 3: // CTA_TIMESTAMP_PAD
			ok = true
		}
		if !ok {
			return false
		}
	}
	return a.done() && a.n > 0
}

// fromCT converts an entry decoded by ti-mo/conntrack (table dumps and lookups still go
// through it) into a ctFlow.
func fromCT(c *ct.Flow) ctFlow {
	tuple := func(t *ct.Tuple) ctTuple {
		return ctTuple{src: t.IP.SourceAddress, dst: t.IP.DestinationAddress, sport: t.Proto.SourcePort,
			dport: t.Proto.DestinationPort, icmpID: t.Proto.ICMPID, zone: t.Zone, proto: t.Proto.Protocol,
			icmpType: t.Proto.ICMPType, icmpCode: t.Proto.ICMPCode}
	}
	return ctFlow{
		orig: tuple(&c.TupleOrig), reply: tuple(&c.TupleReply),
		countersOrig:  ctCounter{c.CountersOrig.Packets, c.CountersOrig.Bytes},
		countersReply: ctCounter{c.CountersReply.Packets, c.CountersReply.Bytes},
		start:         flow.TimeOf(c.Timestamp.Start), stop: flow.TimeOf(c.Timestamp.Stop),
		labels: c.Labels, id: c.ID, mark: c.Mark, status: uint32(c.Status), zone: c.Zone,
	}
}
