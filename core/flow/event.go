package flow

import (
	"net/netip"
	"time"

	"github.com/google/uuid"
)

// Type says what an event reports about its flow.
type Type uint8

const (
	TypeUnknown   Type = iota
	TypeStart          // the connection was first seen
	TypeEnd            // the connection closed or expired; counters are final
	TypeDrop           // a packet of the flow was dropped by a firewall rule
	TypeAggregate      // a summary of many events over a time window
)

var typeNames = [...]string{"unknown", "start", "end", "drop", "aggregate"}

func (t Type) String() string {
	if int(t) < len(typeNames) {
		return typeNames[t]
	}
	return "unknown"
}

// ParseType is the inverse of Type.String.
func ParseType(s string) (Type, bool) {
	for i, n := range typeNames {
		if n == s {
			return Type(i), true
		}
	}
	return TypeUnknown, false
}

// Direction is the direction of a flow from the point of view of the host that observed it.
type Direction uint8

const (
	DirectionUnknown Direction = iota
	Ingress                    // the flow was initiated by a remote peer
	Egress                     // the flow was initiated by the host
)

var directionNames = [...]string{"unknown", "ingress", "egress"}

func (d Direction) String() string {
	if int(d) < len(directionNames) {
		return directionNames[d]
	}
	return "unknown"
}

// ParseDirection is the inverse of Direction.String.
func ParseDirection(s string) (Direction, bool) {
	for i, n := range directionNames {
		if n == s {
			return Direction(i), true
		}
	}
	return DirectionUnknown, false
}

// IANA protocol numbers used throughout flowpipe.
const (
	ProtoICMP   uint8 = 1
	ProtoTCP    uint8 = 6
	ProtoUDP    uint8 = 17
	ProtoICMPv6 uint8 = 58
	ProtoSCTP   uint8 = 132
)

// IsICMP reports whether proto is ICMP or ICMPv6, whose events carry a type and code
// instead of ports.
func IsICMP(proto uint8) bool { return proto == ProtoICMP || proto == ProtoICMPv6 }

// Time is a point in time as nanoseconds since the Unix epoch, UTC; zero means unknown.
// Events store times this way (8 bytes, no pointer) rather than as time.Time (24 bytes).
type Time int64

// TimeOf converts t to a Time; the zero time.Time becomes the zero (unknown) Time.
func TimeOf(t time.Time) Time {
	if t.IsZero() {
		return 0
	}
	return Time(t.UnixNano())
}

// Now is the current wall-clock time.
func Now() Time { return Time(time.Now().UnixNano()) }

// IsZero reports whether the time is unknown.
func (t Time) IsZero() bool { return t == 0 }

// Time converts to a time.Time in UTC; an unknown Time becomes the zero time.Time.
func (t Time) Time() time.Time {
	if t == 0 {
		return time.Time{}
	}
	return time.Unix(0, int64(t)).UTC()
}

// Event is one flow event. Its zero value is an empty event; all fields are plain values so
// that an Event can be copied and queued without allocation.
type Event struct {
	EventID uuid.UUID // unique per event; the acknowledgement and de-duplication key
	FlowID  uuid.UUID // shared by the start and end events of one connection

	Timestamp Time // when the event was observed
	Start     Time // when the flow started, if known
	End       Time // when the flow ended, if known

	SrcAddr netip.Addr
	DstAddr netip.Addr
	SrcPort uint16 // zero for ICMP
	DstPort uint16

	Type      Type
	Direction Direction
	Protocol  uint8 // IANA protocol number
	ICMPType  uint8 // ICMP and ICMPv6 only
	ICMPCode  uint8
	// Reconstructed marks an event a source inferred rather than observed: after the kernel
	// overran its event buffer, the conntrack source rebuilds missing starts and ends from a
	// table dump.
	Reconstructed bool

	RxPackets uint64 // received by the host
	RxBytes   uint64
	TxPackets uint64 // sent by the host
	TxBytes   uint64

	RuleID        string
	SrcResourceID string
	DstResourceID string
	CommunityID   string
	Source        string // name of the source component that produced the event

	// Aggregates only.
	WindowStart Time
	WindowEnd   Time
	NumStarts   uint64
	NumEnds     uint64
	NumDrops    uint64
}
