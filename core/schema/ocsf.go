package schema

import (
	"net/netip"

	"github.com/flowpipe/flowpipe/core/flow"
)

// OCSFVersion is the OCSF schema release the mapping follows (metadata.version).
const OCSFVersion = "1.1.0"

// OCSF Network Activity: category 4 (Network Activity), class 4001.
const (
	ocsfCategory = 4
	ocsfClass    = 4001
)

// OCSF activity_id values of Network Activity used here.
const (
	ocsfUnknown = 0
	ocsfOpen    = 1
	ocsfClose   = 2
	ocsfRefuse  = 5
	ocsfTraffic = 6
)

// ocsfActivity maps an event type to activity_id and its caption: a start opens a
// connection, an end closes it, a firewall drop refuses it, an aggregate reports traffic.
func ocsfActivity(t flow.Type) (int, string) {
	switch t {
	case flow.TypeStart:
		return ocsfOpen, "Open"
	case flow.TypeEnd:
		return ocsfClose, "Close"
	case flow.TypeDrop:
		return ocsfRefuse, "Refuse"
	case flow.TypeAggregate:
		return ocsfTraffic, "Traffic"
	}
	return ocsfUnknown, "Unknown"
}

// appendOCSF writes e as an OCSF Network Activity event. Times are OCSF timestamp_t
// (milliseconds since the epoch). What OCSF has no attribute for goes in `unmapped`, the
// object OCSF provides for it. docs/schema.md lists every attribute.
func (x *Encoder) appendOCSF(dst []byte, e *flow.Event) []byte {
	id, name := ocsfActivity(e.Type)
	dst = append(dst, `{"class_uid":4001,"class_name":"Network Activity","category_uid":4,"category_name":"Network Activity"`...)
	dst = uint(dst, false, "activity_id", uint64(id))
	dst = str(dst, false, "activity_name", name)
	dst = uint(dst, false, "type_uid", ocsfClass*100+uint64(id))
	dst = str(dst, false, "type_name", "Network Activity: "+name)
	dst = append(dst, `,"severity_id":1,"severity":"Informational"`...)
	dst = int64v(dst, false, "time", ms(e.Timestamp))
	start, end := e.Start, e.End
	if e.Type == flow.TypeAggregate {
		start, end = e.WindowStart, e.WindowEnd
	}
	if start != 0 {
		dst = int64v(dst, false, "start_time", ms(start))
	}
	if end != 0 {
		dst = int64v(dst, false, "end_time", ms(end))
	}
	if start != 0 && end >= start {
		dst = int64v(dst, false, "duration", ms(end)-ms(start))
	}
	if e.Type == flow.TypeAggregate {
		dst = uint(dst, false, "count", e.NumStarts+e.NumEnds+e.NumDrops)
	}

	dst = append(dst, `,"metadata":{"version":"`+OCSFVersion+`","product":{"name":"flowpipe","vendor_name":"flowpipe"},"uid":"`...)
	dst = flow.AppendUUID(dst, e.EventID)
	dst = append(dst, `"}`...)

	icmp := flow.IsICMP(e.Protocol)
	dst = appendOCSFEndpoint(dst, "src_endpoint", e.SrcAddr, e.SrcPort, icmp, e.SrcResourceID)
	dst = appendOCSFEndpoint(dst, "dst_endpoint", e.DstAddr, e.DstPort, icmp, e.DstResourceID)

	dst = append(dst, `,"connection_info":{"uid":"`...)
	dst = flow.AppendUUID(dst, e.FlowID)
	dst = append(dst, '"')
	dst = uint(dst, false, "protocol_num", uint64(e.Protocol))
	if n := ianaName(e.Protocol); n != "" {
		dst = str(dst, false, "protocol_name", n)
	}
	switch {
	case e.SrcAddr.Is4():
		dst = append(dst, `,"protocol_ver_id":4`...)
	case e.SrcAddr.Is6():
		dst = append(dst, `,"protocol_ver_id":6`...)
	}
	switch e.Direction {
	case flow.Ingress:
		dst = append(dst, `,"direction_id":1,"direction":"Inbound"`...)
	case flow.Egress:
		dst = append(dst, `,"direction_id":2,"direction":"Outbound"`...)
	default:
		dst = append(dst, `,"direction_id":0,"direction":"Unknown"`...)
	}
	if e.CommunityID != "" {
		dst = str(dst, false, "community_uid", e.CommunityID)
	}
	dst = append(dst, '}')

	// OCSF: bytes_out/packets_out flow from the source endpoint to the destination,
	// bytes_in/packets_in back.
	sp, sb := e.SrcCounters()
	dp, db := e.DstCounters()
	dst = uint(append(dst, `,"traffic":{`...), true, "bytes_out", sb)
	dst = uint(dst, false, "packets_out", sp)
	dst = uint(dst, false, "bytes_in", db)
	dst = uint(dst, false, "packets_in", dp)
	dst = uint(dst, false, "bytes", sb+db)
	dst = uint(dst, false, "packets", sp+dp)
	dst = append(dst, '}')

	if e.RuleID != "" {
		dst = str(append(dst, `,"firewall_rule":{`...), true, "uid", e.RuleID)
		dst = append(dst, '}')
	}

	dst = str(append(dst, `,"unmapped":{`...), true, "source", e.Source)
	return append(customMembers(dst, e, icmp), '}', '}')
}

// appendOCSFEndpoint writes a network_endpoint object: ip, port (not for ICMP) and the
// resource ID as the endpoint's uid.
func appendOCSFEndpoint(dst []byte, name string, a netip.Addr, port uint16, icmp bool, resource string) []byte {
	dst, first := endpoint(dst, name, a, port, icmp)
	if resource != "" {
		dst = str(dst, first, "uid", resource)
	}
	return append(dst, '}')
}

// ms is t in milliseconds since the epoch (OCSF timestamp_t).
func ms(t flow.Time) int64 { return int64(t) / 1e6 }
