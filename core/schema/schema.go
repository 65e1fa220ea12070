// Package schema writes flow events in the JSON schemas that log pipelines and SIEMs already
// understand, chosen by a sink's `format:` option: `flowpipe` (flowpipe's own form,
// flow.AppendJSON), `ecs` (Elastic Common Schema 8.x, ecs.go) and `ocsf` (OCSF 1.x Network
// Activity, ocsf.go). docs/schema.md documents every field of each mapping; the tests check
// them against the field lists vendored in testdata/.
//
// Every encoder appends to a caller's buffer, by hand, without reflection, like
// flow.AppendJSON: sinks encode every event.
package schema

import (
	"net/netip"
	"strconv"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Format is an output schema.
type Format uint8

const (
	Flowpipe Format = iota // docs/schema.md, the form the replay source reads back
	ECS                    // Elastic Common Schema
	OCSF                   // Open Cybersecurity Schema Framework, Network Activity (4001)
)

var formatNames = [...]string{"flowpipe", "ecs", "ocsf"}

func (f Format) String() string {
	if int(f) < len(formatNames) {
		return formatNames[f]
	}
	return "unknown"
}

// Parse returns the format named s ("" is flowpipe).
func Parse(s string) (Format, bool) {
	if s == "" {
		return Flowpipe, true
	}
	for i, n := range formatNames {
		if n == s {
			return Format(i), true
		}
	}
	return Flowpipe, false
}

// Choices is what a configuration error lists as the valid values.
const Choices = "flowpipe, ecs or ocsf"

// Encoder appends events in one format. It is not safe for concurrent use: a sink keeps one
// per Write (it is small and needs no setup).
type Encoder struct {
	Format Format
	enc    flow.Encoder // remembers the last formatted second
}

// Append appends the JSON object of e in the encoder's format to dst, without a newline.
func (x *Encoder) Append(dst []byte, e *flow.Event) []byte {
	switch x.Format {
	case ECS:
		return x.appendECS(dst, e)
	case OCSF:
		return x.appendOCSF(dst, e)
	default:
		return x.enc.AppendJSON(dst, e)
	}
}

// ianaName is the lower-case IANA keyword of the protocols flowpipe tracks, "" for others.
func ianaName(p uint8) string {
	switch p {
	case flow.ProtoTCP:
		return "tcp"
	case flow.ProtoUDP:
		return "udp"
	case flow.ProtoICMP:
		return "icmp"
	case flow.ProtoICMPv6:
		return "ipv6-icmp"
	case flow.ProtoSCTP:
		return "sctp"
	}
	return ""
}

// json helpers: each appends `,"key":value` (or without the comma for the first member).

func key(dst []byte, first bool, k string) []byte {
	if !first {
		dst = append(dst, ',')
	}
	dst = append(dst, '"')
	dst = append(dst, k...)
	return append(dst, '"', ':')
}

func str(dst []byte, first bool, k, v string) []byte {
	return flow.AppendJSONString(key(dst, first, k), v)
}

func uint(dst []byte, first bool, k string, v uint64) []byte {
	return flow.AppendUint(key(dst, first, k), v)
}

func int64v(dst []byte, first bool, k string, v int64) []byte {
	return strconv.AppendInt(key(dst, first, k), v, 10)
}

// endpoint opens the endpoint object `,"name":{` of ECS and OCSF and writes its members
// common to both: the address when it is known, the port unless the flow is ICMP. first
// reports whether it wrote no member.
func endpoint(dst []byte, name string, a netip.Addr, port uint16, icmp bool) (_ []byte, first bool) {
	dst = append(dst, ',', '"')
	dst = append(dst, name...)
	dst = append(dst, `":{`...)
	first = true
	if a.IsValid() {
		dst = flow.AppendJSONAddr(append(dst, `"ip":`...), a)
		first = false
	}
	if !icmp {
		dst = uint(dst, first, "port", uint64(port))
		first = false
	}
	return dst, first
}

// customMembers writes what neither ECS nor OCSF has a field for, the last members of their
// custom object (ECS's flowpipe, OCSF's unmapped): the ICMP type and code, the reconstructed
// mark, an aggregate's counts.
func customMembers(dst []byte, e *flow.Event, icmp bool) []byte {
	if icmp {
		dst = uint(dst, false, "icmp_type", uint64(e.ICMPType))
		dst = uint(dst, false, "icmp_code", uint64(e.ICMPCode))
	}
	if e.Reconstructed {
		dst = append(dst, `,"reconstructed":true`...)
	}
	if e.Type == flow.TypeAggregate {
		dst = uint(dst, false, "num_starts", e.NumStarts)
		dst = uint(dst, false, "num_ends", e.NumEnds)
		dst = uint(dst, false, "num_drops", e.NumDrops)
	}
	return dst
}
