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
	b    []byte
	i    int
	typ  uint16 // with its flags
	data []byte
	n    int // attributes of non-zero length seen so far (AttributeDecoder.Len)
	bad  bool
}

func (a *attrs) next() bool {
	if a.i >= len(a.b) {
		return false
	}
	rest := a.b[a.i:]
	if len(rest) < nlaHdrLen {
		a.bad = true
		return false
	}
	l := int(binary.NativeEndian.Uint16(rest))
	if l > len(rest) || (l != 0 && l < nlaHdrLen) {
		a.bad = true
		return false
	}
	a.typ = binary.NativeEndian.Uint16(rest[2:])
	if l == 0 {
		a.data = rest[nlaHdrLen:nlaHdrLen]
		l = nlaHdrLen
	} else {
		a.n++
		a.data = rest[nlaHdrLen:l]
	}
	a.i += (l + 3) &^ 3
	return true
}

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

// decodeMessages splits a netlink datagram into messages and decodes each conntrack NEW,
// UPDATE or DESTROY; fn gets the event type and the flow, which is reused for the next
// message. It returns how many messages could not be decoded (expectations count as such, as
// they did with ti-mo). It is the parser of what the kernel sends, so it must survive any
// input (see the fuzz tests).
func (d *ctDecoder) decodeMessages(b []byte, f *ctFlow, fn func(typ int, f *ctFlow)) (bad int) {
	for len(b) >= nlmsgHdrLen {
		l := int(binary.NativeEndian.Uint32(b[0:4]))
		if l < nlmsgHdrLen || l > len(b) {
			return bad + 1
		}
		typ := binary.NativeEndian.Uint16(b[4:6])
		flags := binary.NativeEndian.Uint16(b[6:8])
		data := b[nlmsgHdrLen:l]
		next := (l + 3) &^ 3
		if next > len(b) {
			next = len(b)
		}
		b = b[next:]
		switch typ {
		case nlmsgNoop, nlmsgError, nlmsgDone, nlmsgOverrun:
			continue
		}
		ev, ok := d.decodeMessage(typ, flags, data, f)
		if !ok {
			bad++
			continue
		}
		fn(ev, f)
	}
	return bad
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
	a := attrs{b: b}
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
	return !a.bad
}

func decodeTuple(b []byte, t *ctTuple) bool {
	a := attrs{b: b}
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
	return !a.bad && a.n >= 2
}

func decodeIPTuple(b []byte, t *ctTuple) bool {
	a := attrs{b: b}
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
	return !a.bad && a.n == 2
}

func decodeProtoTuple(b []byte, t *ctTuple) bool {
	a := attrs{b: b}
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
	return !a.bad && a.n > 0
}

func decodeCounter(b []byte, c *ctCounter) bool {
	a := attrs{b: b}
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
	return !a.bad && a.n >= 2
}

func decodeTimestamp(b []byte, f *ctFlow) bool {
	a := attrs{b: b}
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
	return !a.bad && a.n > 0
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
