package schema

import (
	"net/netip"

	"github.com/flowpipe/flowpipe/core/flow"
)

// ECSVersion is the Elastic Common Schema release the mapping follows (ecs.version).
const ECSVersion = "8.11.0"

// appendECS writes e as an ECS document: nested objects, one field per ECS name, and what ECS
// has no field for under the custom `flowpipe` object (ECS reserves no such top-level name,
// and recommends a namespace of one's own for custom fields). docs/schema.md lists every field.
func (x *Encoder) appendECS(dst []byte, e *flow.Event) []byte {
	dst = append(dst, `{"@timestamp":"`...)
	dst = x.enc.AppendTime(dst, e.Timestamp)
	dst = append(dst, `","ecs":{"version":"`+ECSVersion+`"}`...)

	dst = append(dst, `,"event":{"kind":"event","category":["network"],"type":`...)
	switch e.Type {
	case flow.TypeStart:
		dst = append(dst, `["connection","start"]`...)
	case flow.TypeEnd:
		dst = append(dst, `["connection","end"]`...)
	case flow.TypeDrop:
		dst = append(dst, `["connection","denied"]`...)
	default: // aggregate, unknown
		dst = append(dst, `["connection","info"]`...)
	}
	dst = str(dst, false, "action", "flow-"+e.Type.String())
	dst = append(dst, `,"id":"`...)
	dst = flow.AppendUUID(dst, e.EventID)
	dst = append(dst, '"')
	if e.Type == flow.TypeDrop {
		dst = append(dst, `,"outcome":"failure"`...)
	}
	start, end := e.Start, e.End
	if e.Type == flow.TypeAggregate {
		start, end = e.WindowStart, e.WindowEnd
	}
	if start != 0 {
		dst = append(dst, `,"start":"`...)
		dst = x.enc.AppendTime(dst, start)
		dst = append(dst, '"')
	}
	if end != 0 {
		dst = append(dst, `,"end":"`...)
		dst = x.enc.AppendTime(dst, end)
		dst = append(dst, '"')
	}
	if start != 0 && end >= start {
		dst = int64v(dst, false, "duration", int64(end-start)) // nanoseconds, as ECS defines it
	}
	dst = str(dst, false, "dataset", "flowpipe.flow")
	if e.Source != "" {
		dst = str(dst, false, "provider", e.Source)
	}
	dst = append(dst, '}')

	icmp := flow.IsICMP(e.Protocol)
	sp, sb := e.SrcCounters()
	dp, db := e.DstCounters()
	dst = appendECSEndpoint(dst, "source", e.SrcAddr, e.SrcPort, icmp, sp, sb)
	dst = appendECSEndpoint(dst, "destination", e.DstAddr, e.DstPort, icmp, dp, db)

	dst = append(dst, `,"network":{"iana_number":"`...)
	dst = flow.AppendUint(dst, uint64(e.Protocol)) // a keyword in ECS: quoted
	dst = append(dst, '"')
	if n := ianaName(e.Protocol); n != "" {
		dst = str(dst, false, "transport", n)
	}
	switch {
	case e.SrcAddr.Is4():
		dst = append(dst, `,"type":"ipv4"`...)
	case e.SrcAddr.Is6():
		dst = append(dst, `,"type":"ipv6"`...)
	}
	dst = str(dst, false, "direction", e.Direction.String()) // ingress, egress, unknown: ECS's host view
	if e.CommunityID != "" {
		dst = str(dst, false, "community_id", e.CommunityID)
	}
	dst = uint(dst, false, "bytes", sb+db)
	dst = uint(dst, false, "packets", sp+dp)
	dst = append(dst, '}')

	if e.RuleID != "" {
		dst = str(append(dst, `,"rule":{`...), true, "id", e.RuleID)
		dst = append(dst, '}')
	}

	dst = append(dst, `,"flowpipe":{"flow_id":"`...)
	dst = flow.AppendUUID(dst, e.FlowID)
	dst = append(dst, '"')
	if e.SrcResourceID != "" {
		dst = str(dst, false, "src_resource_id", e.SrcResourceID)
	}
	if e.DstResourceID != "" {
		dst = str(dst, false, "dst_resource_id", e.DstResourceID)
	}
	return append(customMembers(dst, e, icmp), '}', '}')
}

// appendECSEndpoint writes the source or destination object: the address, the port (not for
// ICMP), and what that end sent (ECS: "bytes sent from the source to the destination").
func appendECSEndpoint(dst []byte, name string, a netip.Addr, port uint16, icmp bool, packets, bytes uint64) []byte {
	dst, first := endpoint(dst, name, a, port, icmp)
	dst = uint(dst, first, "bytes", bytes)
	dst = uint(dst, false, "packets", packets)
	return append(dst, '}')
}
