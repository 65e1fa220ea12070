package ipfix

import (
	"encoding/binary"

	"github.com/flowpipe/flowpipe/core/flow"
)

// IPFIX (RFC 7011) constants.
const (
	version        = 10
	headerLen      = 16
	setHeaderLen   = 4
	templateSetID  = 2
	reversePEN     = 29305 // RFC 5103: reverse information elements
	varLen         = 0xffff
	maxMessageSize = 0xffff // the length field of the message header
)

// value says which event field an information element carries.
type value uint8

const (
	vSrc4 value = iota
	vDst4
	vSrc6
	vDst6
	vSrcPort
	vDstPort
	vProto
	vICMP // icmpTypeCodeIPv4 / IPv6: type << 8 | code
	vDirection
	vStartMs
	vEndMs
	vEndReason
	vOctets // from the initiator (forward)
	vPackets
	vRevOctets // from the responder (reverse)
	vRevPackets
	vRuleID
	vSrcResource
	vDstResource
)

// ie is one field specifier of a template.
type ie struct {
	id   uint16
	pen  uint32 // 0: IANA
	size uint16 // varLen for strings
	v    value
}

// IANA information element IDs (RFC 7012 and the IANA IPFIX registry).
const (
	ieOctetDeltaCount          = 1
	iePacketDeltaCount         = 2
	ieProtocolIdentifier       = 4
	ieSourceTransportPort      = 7
	ieSourceIPv4Address        = 8
	ieDestinationTransportPort = 11
	ieDestinationIPv4Address   = 12
	ieSourceIPv6Address        = 27
	ieDestinationIPv6Address   = 28
	ieICMPTypeCodeIPv4         = 32
	ieFlowDirection            = 61
	ieOctetTotalCount          = 85
	iePacketTotalCount         = 86
	ieFlowEndReason            = 136
	ieICMPTypeCodeIPv6         = 139
	ieFlowStartMilliseconds    = 152
	ieFlowEndMilliseconds      = 153
)

// Enterprise-specific elements under the enterprise_number option (docs/configuration.md).
const (
	ieRuleID        = 1
	ieSrcResourceID = 2
	ieDstResourceID = 3
)

// flowEndReason values (IANA): an end event is "end of flow detected" (the connection
// closed or conntrack expired it), an aggregate is cut by its window ("active timeout").
const (
	reasonActiveTimeout = 0x02
	reasonEndOfFlow     = 0x03
)

// Template IDs: one per address family and kind of record.
const (
	tmplEnd4 uint16 = 256 + iota
	tmplEnd6
	tmplAgg4
	tmplAgg6
	tmplStart4
	tmplStart6
)

type template struct {
	id     uint16
	fields []ie
}

// templates builds the six templates; pen 0 leaves the enterprise-specific IDs out.
func templates(pen uint32) []template {
	var out []template
	for _, kind := range []flow.Type{flow.TypeEnd, flow.TypeAggregate, flow.TypeStart} {
		for _, v6 := range []bool{false, true} {
			var f []ie
			if v6 {
				f = append(f, ie{ieSourceIPv6Address, 0, 16, vSrc6}, ie{ieDestinationIPv6Address, 0, 16, vDst6})
			} else {
				f = append(f, ie{ieSourceIPv4Address, 0, 4, vSrc4}, ie{ieDestinationIPv4Address, 0, 4, vDst4})
			}
			f = append(f, ie{ieSourceTransportPort, 0, 2, vSrcPort}, ie{ieDestinationTransportPort, 0, 2, vDstPort},
				ie{ieProtocolIdentifier, 0, 1, vProto})
			if v6 {
				f = append(f, ie{ieICMPTypeCodeIPv6, 0, 2, vICMP})
			} else {
				f = append(f, ie{ieICMPTypeCodeIPv4, 0, 2, vICMP})
			}
			f = append(f, ie{ieFlowDirection, 0, 1, vDirection}, ie{ieFlowStartMilliseconds, 0, 8, vStartMs})
			switch kind {
			case flow.TypeEnd:
				f = append(f, ie{ieFlowEndMilliseconds, 0, 8, vEndMs}, ie{ieFlowEndReason, 0, 1, vEndReason},
					ie{ieOctetTotalCount, 0, 8, vOctets}, ie{iePacketTotalCount, 0, 8, vPackets},
					ie{ieOctetTotalCount, reversePEN, 8, vRevOctets}, ie{iePacketTotalCount, reversePEN, 8, vRevPackets})
			case flow.TypeAggregate:
				f = append(f, ie{ieFlowEndMilliseconds, 0, 8, vEndMs}, ie{ieFlowEndReason, 0, 1, vEndReason},
					ie{ieOctetDeltaCount, 0, 8, vOctets}, ie{iePacketDeltaCount, 0, 8, vPackets},
					ie{ieOctetDeltaCount, reversePEN, 8, vRevOctets}, ie{iePacketDeltaCount, reversePEN, 8, vRevPackets})
			}
			if pen != 0 {
				f = append(f, ie{ieRuleID, pen, varLen, vRuleID}, ie{ieSrcResourceID, pen, varLen, vSrcResource},
					ie{ieDstResourceID, pen, varLen, vDstResource})
			}
			id := map[flow.Type]uint16{flow.TypeEnd: tmplEnd4, flow.TypeAggregate: tmplAgg4, flow.TypeStart: tmplStart4}[kind]
			if v6 {
				id++
			}
			out = append(out, template{id: id, fields: f})
		}
	}
	return out
}

// appendTemplateSet appends one template set holding every template.
func appendTemplateSet(dst []byte, ts []template) []byte {
	start := len(dst)
	dst = binary.BigEndian.AppendUint16(dst, templateSetID)
	dst = append(dst, 0, 0) // length, below
	for _, t := range ts {
		dst = binary.BigEndian.AppendUint16(dst, t.id)
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(t.fields)))
		for _, f := range t.fields {
			id := f.id
			if f.pen != 0 {
				id |= 0x8000
			}
			dst = binary.BigEndian.AppendUint16(dst, id)
			dst = binary.BigEndian.AppendUint16(dst, f.size)
			if f.pen != 0 {
				dst = binary.BigEndian.AppendUint32(dst, f.pen)
			}
		}
	}
	binary.BigEndian.PutUint16(dst[start+2:], uint16(len(dst)-start))
	return dst
}

// appendRecord appends the data record of e in template t.
func appendRecord(dst []byte, t *template, e *flow.Event) []byte {
	for i := range t.fields {
		switch f := &t.fields[i]; f.v {
		case vSrc4:
			a := e.SrcAddr.As4()
			dst = append(dst, a[:]...)
		case vDst4:
			a := e.DstAddr.As4()
			dst = append(dst, a[:]...)
		case vSrc6:
			a := e.SrcAddr.As16()
			dst = append(dst, a[:]...)
		case vDst6:
			a := e.DstAddr.As16()
			dst = append(dst, a[:]...)
		case vSrcPort:
			dst = binary.BigEndian.AppendUint16(dst, e.SrcPort)
		case vDstPort:
			dst = binary.BigEndian.AppendUint16(dst, e.DstPort)
		case vProto:
			dst = append(dst, e.Protocol)
		case vICMP:
			dst = append(dst, e.ICMPType, e.ICMPCode)
		case vDirection:
			dst = append(dst, direction(e.Direction))
		case vStartMs:
			dst = binary.BigEndian.AppendUint64(dst, uint64(startOf(e)/1e6))
		case vEndMs:
			dst = binary.BigEndian.AppendUint64(dst, uint64(endOf(e)/1e6))
		case vEndReason:
			if e.Type == flow.TypeAggregate {
				dst = append(dst, reasonActiveTimeout)
			} else {
				dst = append(dst, reasonEndOfFlow)
			}
		case vOctets:
			_, b := e.SrcCounters()
			dst = binary.BigEndian.AppendUint64(dst, b)
		case vPackets:
			p, _ := e.SrcCounters()
			dst = binary.BigEndian.AppendUint64(dst, p)
		case vRevOctets:
			_, b := e.DstCounters()
			dst = binary.BigEndian.AppendUint64(dst, b)
		case vRevPackets:
			p, _ := e.DstCounters()
			dst = binary.BigEndian.AppendUint64(dst, p)
		case vRuleID:
			dst = appendVarString(dst, e.RuleID)
		case vSrcResource:
			dst = appendVarString(dst, e.SrcResourceID)
		case vDstResource:
			dst = appendVarString(dst, e.DstResourceID)
		}
	}
	return dst
}

// direction is flowDirection: 0 ingress, 1 egress. IANA defines no value for an unknown
// direction; such flows (forwarded by the host) are sent as 0xff, which collectors show as
// a number.
func direction(d flow.Direction) byte {
	switch d {
	case flow.Ingress:
		return 0
	case flow.Egress:
		return 1
	}
	return 0xff
}

// startOf and endOf are the flow's times; an aggregate spans its window when the flows in
// it had no times, and an end event without an end time ended when it was observed.
func startOf(e *flow.Event) flow.Time {
	if e.Start != 0 {
		return e.Start
	}
	if e.Type == flow.TypeAggregate && e.WindowStart != 0 {
		return e.WindowStart
	}
	return e.Timestamp
}

func endOf(e *flow.Event) flow.Time {
	if e.End != 0 {
		return e.End
	}
	if e.Type == flow.TypeAggregate && e.WindowEnd != 0 {
		return e.WindowEnd
	}
	return e.Timestamp
}

// appendVarString appends s as a variable-length field (RFC 7011 section 7), cut to what the
// two-byte length can say.
func appendVarString(dst []byte, s string) []byte {
	if len(s) > maxString {
		s = s[:maxString]
	}
	if len(s) < 255 {
		dst = append(dst, byte(len(s)))
	} else {
		dst = append(dst, 255)
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(s)))
	}
	return append(dst, s...)
}

// maxString bounds one string element so that a record always fits a TCP message; IDs are
// far shorter.
const maxString = 1024

// packer packs data records into messages of at most max bytes.
type packer struct {
	max    int
	domain uint32
	now    uint32 // export time, seconds
	seq    *uint32
	tmpls  []template

	buf      []byte
	msgStart int // offset of the current message's header; -1 when none is open
	setStart int // offset of the open data set's header; -1 when none
	setID    uint16
	records  int   // data records in the open message
	ends     []int // end offset of every finished message in buf
}

func (p *packer) reset(buf []byte) {
	p.buf, p.msgStart, p.setStart, p.records, p.ends = buf[:0], -1, -1, 0, p.ends[:0]
}

func (p *packer) openMessage() {
	p.msgStart = len(p.buf)
	p.buf = append(p.buf, make([]byte, headerLen)...)
	p.setStart, p.records = -1, 0
}

// closeMessage fills in the header of the open message; its sequence number is the count of
// data records sent before it (RFC 7011 section 3.1).
func (p *packer) closeMessage() {
	if p.msgStart < 0 {
		return
	}
	p.closeSet()
	h := p.buf[p.msgStart:]
	binary.BigEndian.PutUint16(h[0:], version)
	binary.BigEndian.PutUint16(h[2:], uint16(len(p.buf)-p.msgStart))
	binary.BigEndian.PutUint32(h[4:], p.now)
	binary.BigEndian.PutUint32(h[8:], *p.seq)
	binary.BigEndian.PutUint32(h[12:], p.domain)
	*p.seq += uint32(p.records)
	p.ends = append(p.ends, len(p.buf))
	p.msgStart = -1
}

func (p *packer) closeSet() {
	if p.setStart >= 0 {
		binary.BigEndian.PutUint16(p.buf[p.setStart+2:], uint16(len(p.buf)-p.setStart))
		p.setStart = -1
	}
}

// templatesMessage adds a message holding only the template set.
func (p *packer) templatesMessage() {
	p.closeMessage()
	p.openMessage()
	p.buf = appendTemplateSet(p.buf, p.tmpls)
	p.closeMessage()
}

// add appends the record of e in template t, starting a new message when it would not fit;
// it returns false when the record alone exceeds a message.
func (p *packer) add(t *template, e *flow.Event) bool {
	for attempt := 0; attempt < 2; attempt++ {
		if p.msgStart < 0 {
			p.openMessage()
		}
		mark, setMark, setID := len(p.buf), p.setStart, p.setID
		if p.setStart < 0 || p.setID != t.id {
			p.closeSet()
			p.setStart, p.setID = len(p.buf), t.id
			p.buf = binary.BigEndian.AppendUint16(p.buf, t.id)
			p.buf = append(p.buf, 0, 0)
		}
		p.buf = appendRecord(p.buf, t, e)
		if len(p.buf)-p.msgStart <= p.max {
			p.records++
			return true
		}
		// Does not fit: take it back out and close the message without it.
		p.buf = p.buf[:mark]
		if setMark != p.setStart {
			p.setStart, p.setID = setMark, setID
		}
		if p.records == 0 {
			p.buf = p.buf[:p.msgStart]
			p.msgStart = -1
			return false
		}
		p.closeMessage()
	}
	return false
}

// messages returns the finished messages, in order, as slices of buf.
func (p *packer) messages(out [][]byte) [][]byte {
	start := 0
	for _, end := range p.ends {
		out = append(out, p.buf[start:end])
		start = end
	}
	return out
}
