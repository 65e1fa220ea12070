package flowwire

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/uuid"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Field numbers of proto/flow/flow.proto.
const (
	fEventID     = 1
	fTimestamp   = 2
	fPublicKey   = 3
	fFlowFields  = 4
	fIsInitiator = 5
	fWindowStart = 6
	fWindowEnd   = 7

	ffFlowID      = 1
	ffType        = 2
	ffRuleID      = 3
	ffDirection   = 4
	ffProtocol    = 5
	ffSourceIP    = 6
	ffDestIP      = 7
	ffPortInfo    = 8
	ffICMPInfo    = 9
	ffRxPackets   = 10
	ffTxPackets   = 11
	ffRxBytes     = 12
	ffTxBytes     = 13
	ffSrcResource = 14
	ffDstResource = 15
	ffNumStarts   = 16
	ffNumEnds     = 17
	ffNumDrops    = 18

	ackEventID     = 1
	ackIsInitiator = 2
)

// Wire values of the Type enum. The wire has no aggregate type: an aggregate travels as
// TYPE_UNKNOWN with its window set, and is recognised by that window on the way in.
const (
	wireTypeUnknown = 0
	wireTypeStart   = 1
	wireTypeEnd     = 2
	wireTypeDrop    = 3
)

// AppendEvent appends the FlowEvent encoding of e, sent by the peer publicKey, to dst.
// The window and the aggregate counters are sent whenever they are set. Fields without a
// place on the wire (start and end times, community ID, source name) are
// not sent.
func AppendEvent(dst []byte, e *flow.Event, publicKey []byte) []byte {
	dst = protowire.AppendTag(dst, fEventID, protowire.BytesType)
	dst = protowire.AppendBytes(dst, e.EventID[:])
	dst = appendTimestamp(dst, fTimestamp, e.Timestamp)
	if len(publicKey) > 0 {
		dst = protowire.AppendTag(dst, fPublicKey, protowire.BytesType)
		dst = protowire.AppendBytes(dst, publicKey)
	}
	dst = protowire.AppendTag(dst, fFlowFields, protowire.BytesType)
	dst = protowire.AppendVarint(dst, uint64(flowFieldsSize(e)))
	dst = appendFlowFields(dst, e)
	dst = appendTimestamp(dst, fWindowStart, e.WindowStart)
	return appendTimestamp(dst, fWindowEnd, e.WindowEnd)
}

// AppendInitiator appends the FlowEvent{isInitiator: true} a client opens a stream with.
func AppendInitiator(dst []byte) []byte {
	dst = protowire.AppendTag(dst, fIsInitiator, protowire.VarintType)
	return protowire.AppendVarint(dst, 1)
}

// AppendAck appends a FlowEventAck for id.
func AppendAck(dst []byte, id uuid.UUID) []byte {
	dst = protowire.AppendTag(dst, ackEventID, protowire.BytesType)
	return protowire.AppendBytes(dst, id[:])
}

// AppendInitiatorAck appends the FlowEventAck{isInitiator: true} a receiver opens with.
func AppendInitiatorAck(dst []byte) []byte {
	dst = protowire.AppendTag(dst, ackIsInitiator, protowire.VarintType)
	return protowire.AppendVarint(dst, 1)
}

func wireType(t flow.Type) uint64 {
	switch t {
	case flow.TypeStart:
		return wireTypeStart
	case flow.TypeEnd:
		return wireTypeEnd
	case flow.TypeDrop:
		return wireTypeDrop
	}
	return wireTypeUnknown
}

func timestampSize(t flow.Time) int {
	sec, nsec := splitTime(t)
	n := 0
	if sec != 0 {
		n += 1 + protowire.SizeVarint(uint64(sec))
	}
	if nsec != 0 {
		n += 1 + protowire.SizeVarint(uint64(nsec))
	}
	return n
}

func splitTime(t flow.Time) (sec int64, nsec int32) {
	sec = int64(t) / 1e9
	ns := int64(t) % 1e9
	if ns < 0 {
		ns += 1e9
		sec--
	}
	return sec, int32(ns)
}

// appendTimestamp appends a google.protobuf.Timestamp; an unknown (zero) time is left out.
func appendTimestamp(dst []byte, num protowire.Number, t flow.Time) []byte {
	if t == 0 {
		return dst
	}
	dst = protowire.AppendTag(dst, num, protowire.BytesType)
	dst = protowire.AppendVarint(dst, uint64(timestampSize(t)))
	sec, nsec := splitTime(t)
	if sec != 0 {
		dst = protowire.AppendTag(dst, 1, protowire.VarintType)
		dst = protowire.AppendVarint(dst, uint64(sec))
	}
	if nsec != 0 {
		dst = protowire.AppendTag(dst, 2, protowire.VarintType)
		dst = protowire.AppendVarint(dst, uint64(nsec))
	}
	return dst
}

func addrLen(a netip.Addr) int {
	switch {
	case !a.IsValid():
		return 0
	case a.Is4():
		return 4
	}
	return 16
}

func bytesField(n int) int {
	if n == 0 {
		return 0
	}
	return 1 + protowire.SizeVarint(uint64(n)) + n
}

func varintField(num protowire.Number, v uint64) int {
	if v == 0 {
		return 0
	}
	return protowire.SizeTag(num) + protowire.SizeVarint(v)
}

func connInfoSize(e *flow.Event) int {
	if flow.IsICMP(e.Protocol) {
		return varintField(1, uint64(e.ICMPType)) + varintField(2, uint64(e.ICMPCode))
	}
	return varintField(1, uint64(e.SrcPort)) + varintField(2, uint64(e.DstPort))
}

func flowFieldsSize(e *flow.Event) int {
	n := bytesField(16) // flow_id
	n += varintField(ffType, wireType(e.Type))
	n += bytesField(len(e.RuleID))
	n += varintField(ffDirection, uint64(e.Direction))
	n += varintField(ffProtocol, uint64(e.Protocol))
	n += bytesField(addrLen(e.SrcAddr))
	n += bytesField(addrLen(e.DstAddr))
	ci := connInfoSize(e)
	n += 1 + protowire.SizeVarint(uint64(ci)) + ci
	n += varintField(ffRxPackets, e.RxPackets)
	n += varintField(ffTxPackets, e.TxPackets)
	n += varintField(ffRxBytes, e.RxBytes)
	n += varintField(ffTxBytes, e.TxBytes)
	n += bytesField(len(e.SrcResourceID))
	n += bytesField(len(e.DstResourceID))
	n += varintField(ffNumStarts, e.NumStarts)
	n += varintField(ffNumEnds, e.NumEnds)
	n += varintField(ffNumDrops, e.NumDrops)
	return n
}

func appendVarintField(dst []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return dst
	}
	dst = protowire.AppendTag(dst, num, protowire.VarintType)
	return protowire.AppendVarint(dst, v)
}

func appendStringField(dst []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return dst
	}
	dst = protowire.AppendTag(dst, num, protowire.BytesType)
	return protowire.AppendString(dst, s)
}

func appendAddrField(dst []byte, num protowire.Number, a netip.Addr) []byte {
	if !a.IsValid() {
		return dst
	}
	dst = protowire.AppendTag(dst, num, protowire.BytesType)
	if a.Is4() {
		b := a.As4()
		return protowire.AppendBytes(dst, b[:])
	}
	b := a.As16()
	return protowire.AppendBytes(dst, b[:])
}

func appendFlowFields(dst []byte, e *flow.Event) []byte {
	dst = protowire.AppendTag(dst, ffFlowID, protowire.BytesType)
	dst = protowire.AppendBytes(dst, e.FlowID[:])
	dst = appendVarintField(dst, ffType, wireType(e.Type))
	dst = appendStringField(dst, ffRuleID, e.RuleID)
	dst = appendVarintField(dst, ffDirection, uint64(e.Direction))
	dst = appendVarintField(dst, ffProtocol, uint64(e.Protocol))
	dst = appendAddrField(dst, ffSourceIP, e.SrcAddr)
	dst = appendAddrField(dst, ffDestIP, e.DstAddr)
	if flow.IsICMP(e.Protocol) {
		dst = protowire.AppendTag(dst, ffICMPInfo, protowire.BytesType)
		dst = protowire.AppendVarint(dst, uint64(connInfoSize(e)))
		dst = appendVarintField(dst, 1, uint64(e.ICMPType))
		dst = appendVarintField(dst, 2, uint64(e.ICMPCode))
	} else {
		dst = protowire.AppendTag(dst, ffPortInfo, protowire.BytesType)
		dst = protowire.AppendVarint(dst, uint64(connInfoSize(e)))
		dst = appendVarintField(dst, 1, uint64(e.SrcPort))
		dst = appendVarintField(dst, 2, uint64(e.DstPort))
	}
	dst = appendVarintField(dst, ffRxPackets, e.RxPackets)
	dst = appendVarintField(dst, ffTxPackets, e.TxPackets)
	dst = appendVarintField(dst, ffRxBytes, e.RxBytes)
	dst = appendVarintField(dst, ffTxBytes, e.TxBytes)
	dst = appendStringField(dst, ffSrcResource, e.SrcResourceID)
	dst = appendStringField(dst, ffDstResource, e.DstResourceID)
	dst = appendVarintField(dst, ffNumStarts, e.NumStarts)
	dst = appendVarintField(dst, ffNumEnds, e.NumEnds)
	return appendVarintField(dst, ffNumDrops, e.NumDrops)
}

// Message is a decoded FlowEvent.
type Message struct {
	Initiator bool
	PublicKey []byte // aliases the decoded buffer; copy to keep
	Event     flow.Event
	Invalid   error // set by Codec instead of failing Unmarshal; see Codec.Unmarshal
	Size      int   // the message's size on the wire, set by Codec
}

// ErrMalformed wraps every decoding error.
var ErrMalformed = errors.New("malformed FlowEvent")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
}

// DecodeEvent decodes a FlowEvent into m. An initiator message needs no other field; any
// other message must carry a 16-byte event ID. Unknown fields are skipped, as protobuf
// requires; a value that cannot be represented (an address of neither 4 nor 16 bytes, a port
// above 65535) is an error.
func DecodeEvent(b []byte, m *Message) error {
	*m = Message{}
	var hasID bool
	var wireTyp uint64
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return malformed("bad tag: %v", protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == fIsInitiator && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return malformed("isInitiator: %v", protowire.ParseError(n))
			}
			m.Initiator = v != 0
			b = b[n:]
			continue
		case typ != protowire.BytesType || num < fEventID || num > fWindowEnd:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return malformed("field %d: %v", num, protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return malformed("field %d: %v", num, protowire.ParseError(n))
		}
		b = b[n:]
		var err error
		switch num {
		case fEventID:
			if len(v) != 16 {
				return malformed("event_id has %d bytes, want 16", len(v))
			}
			copy(m.Event.EventID[:], v)
			hasID = true
		case fTimestamp:
			m.Event.Timestamp, err = decodeTimestamp("timestamp", v)
		case fPublicKey:
			m.PublicKey = v
		case fFlowFields:
			wireTyp, err = decodeFlowFields(v, &m.Event)
		case fWindowStart:
			m.Event.WindowStart, err = decodeTimestamp("window_start", v)
		case fWindowEnd:
			m.Event.WindowEnd, err = decodeTimestamp("window_end", v)
		}
		if err != nil {
			return err
		}
	}
	if m.Initiator {
		return nil
	}
	if !hasID {
		return malformed("no event_id")
	}
	switch wireTyp {
	case wireTypeStart:
		m.Event.Type = flow.TypeStart
	case wireTypeEnd:
		m.Event.Type = flow.TypeEnd
	case wireTypeDrop:
		m.Event.Type = flow.TypeDrop
	default:
		if m.Event.WindowStart != 0 || m.Event.WindowEnd != 0 {
			m.Event.Type = flow.TypeAggregate
		}
	}
	return nil
}

func decodeTimestamp(name string, b []byte) (flow.Time, error) {
	var sec, nsec int64
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return 0, malformed("%s: %v", name, protowire.ParseError(n))
		}
		b = b[n:]
		if typ != protowire.VarintType || (num != 1 && num != 2) {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return 0, malformed("%s: %v", name, protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return 0, malformed("%s: %v", name, protowire.ParseError(n))
		}
		b = b[n:]
		if num == 1 {
			sec = int64(v)
		} else {
			nsec = int64(int32(v))
		}
	}
	// Beyond these bounds the time does not fit flow.Time's int64 nanoseconds (years 1678-2262).
	const maxSec = 9223372035
	if nsec < 0 || nsec >= 1e9 || sec > maxSec || sec < -maxSec {
		return 0, malformed("%s out of range (seconds %d, nanos %d)", name, sec, nsec)
	}
	return flow.Time(sec*1e9 + nsec), nil
}

func decodeAddr(name string, v []byte) (netip.Addr, error) {
	switch len(v) {
	case 0:
		return netip.Addr{}, nil
	case 4:
		return netip.AddrFrom4([4]byte(v)), nil
	case 16:
		return netip.AddrFrom16([16]byte(v)), nil
	}
	return netip.Addr{}, malformed("%s has %d bytes, want 4 or 16", name, len(v))
}

// decodePair decodes PortInfo or ICMPInfo: two uint32 fields, each at most max.
func decodePair(name string, b []byte, max uint64) (a, c uint64, err error) {
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return 0, 0, malformed("%s: %v", name, protowire.ParseError(n))
		}
		b = b[n:]
		if typ != protowire.VarintType || (num != 1 && num != 2) {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return 0, 0, malformed("%s: %v", name, protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return 0, 0, malformed("%s: %v", name, protowire.ParseError(n))
		}
		b = b[n:]
		v = uint64(uint32(v)) // uint32 on the wire: the high bits are dropped, as protobuf does
		if v > max {
			return 0, 0, malformed("%s field %d is %d, above %d", name, num, v, max)
		}
		if num == 1 {
			a = v
		} else {
			c = v
		}
	}
	return a, c, nil
}

func decodeFlowFields(b []byte, e *flow.Event) (wireTyp uint64, err error) {
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return 0, malformed("flow_fields: %v", protowire.ParseError(n))
		}
		b = b[n:]
		if typ == protowire.VarintType && (num == ffType || num == ffDirection || num == ffProtocol || (num >= ffRxPackets && num <= ffTxBytes) || (num >= ffNumStarts && num <= ffNumDrops)) {
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return 0, malformed("flow_fields field %d: %v", num, protowire.ParseError(n))
			}
			b = b[n:]
			switch num {
			case ffType:
				wireTyp = uint64(int32(v))
			case ffDirection:
				switch int32(v) {
				case 1:
					e.Direction = flow.Ingress
				case 2:
					e.Direction = flow.Egress
				default:
					e.Direction = flow.DirectionUnknown
				}
			case ffProtocol:
				if uint32(v) > 255 {
					return 0, malformed("protocol %d is above 255", uint32(v))
				}
				e.Protocol = uint8(v)
			case ffRxPackets:
				e.RxPackets = v
			case ffTxPackets:
				e.TxPackets = v
			case ffRxBytes:
				e.RxBytes = v
			case ffTxBytes:
				e.TxBytes = v
			case ffNumStarts:
				e.NumStarts = v
			case ffNumEnds:
				e.NumEnds = v
			case ffNumDrops:
				e.NumDrops = v
			}
			continue
		}
		if typ != protowire.BytesType || num == ffType || num == ffDirection || num == ffProtocol || num > ffDstResource || num >= ffRxPackets && num <= ffTxBytes {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return 0, malformed("flow_fields field %d: %v", num, protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return 0, malformed("flow_fields field %d: %v", num, protowire.ParseError(n))
		}
		b = b[n:]
		switch num {
		case ffFlowID:
			switch len(v) {
			case 0:
				e.FlowID = uuid.UUID{}
			case 16:
				copy(e.FlowID[:], v)
			default:
				return 0, malformed("flow_id has %d bytes, want 16", len(v))
			}
		case ffRuleID:
			e.RuleID = string(v)
		case ffSourceIP:
			if e.SrcAddr, err = decodeAddr("source_ip", v); err != nil {
				return 0, err
			}
		case ffDestIP:
			if e.DstAddr, err = decodeAddr("dest_ip", v); err != nil {
				return 0, err
			}
		case ffPortInfo:
			sp, dp, err := decodePair("port_info", v, 65535)
			if err != nil {
				return 0, err
			}
			e.SrcPort, e.DstPort, e.ICMPType, e.ICMPCode = uint16(sp), uint16(dp), 0, 0
		case ffICMPInfo:
			t, c, err := decodePair("icmp_info", v, 255)
			if err != nil {
				return 0, err
			}
			e.ICMPType, e.ICMPCode, e.SrcPort, e.DstPort = uint8(t), uint8(c), 0, 0
		case ffSrcResource:
			e.SrcResourceID = string(v)
		case ffDstResource:
			e.DstResourceID = string(v)
		}
	}
	return wireTyp, nil
}

// DecodeAck decodes a FlowEventAck. The returned id is zero for an initiator ACK.
func DecodeAck(b []byte) (id uuid.UUID, initiator bool, err error) {
	hasID := false
	for len(b) > 0 {
		num, typ, n := consumeTag(b)
		if n < 0 {
			return id, false, fmt.Errorf("malformed FlowEventAck: %v", protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == ackEventID && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return id, false, fmt.Errorf("malformed FlowEventAck: %v", protowire.ParseError(n))
			}
			if len(v) != 16 {
				return id, false, fmt.Errorf("malformed FlowEventAck: event_id has %d bytes, want 16", len(v))
			}
			copy(id[:], v)
			hasID = true
			b = b[n:]
		case num == ackIsInitiator && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return id, false, fmt.Errorf("malformed FlowEventAck: %v", protowire.ParseError(n))
			}
			initiator = v != 0
			b = b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return id, false, fmt.Errorf("malformed FlowEventAck: %v", protowire.ParseError(n))
			}
			b = b[n:]
		}
	}
	if !initiator && !hasID {
		return id, false, errors.New("malformed FlowEventAck: neither event_id nor isInitiator")
	}
	return id, initiator, nil
}

// consumeTag is protowire.ConsumeTag that also refuses field numbers above the protobuf
// maximum, as the protobuf library does.
func consumeTag(b []byte) (protowire.Number, protowire.Type, int) {
	num, typ, n := protowire.ConsumeTag(b)
	if n >= 0 && num > protowire.MaxValidNumber {
		return 0, 0, -1
	}
	return num, typ, n
}
