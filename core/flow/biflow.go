package flow

// Counters seen from the flow's ends rather than from the host: what the initiator (SrcAddr)
// sent and what the responder (DstAddr) sent. Exports that describe a flow by its ends (IPFIX
// biflows, ECS source.bytes, OCSF traffic) use these. The host sent the initiator's packets
// on egress flows and received them on ingress flows; a flow of unknown direction (forwarded
// through the host) is seen from its initiator, like egress, as the conntrack source counts
// it.

// SrcCounters returns the packets and bytes sent by the initiator.
func (e *Event) SrcCounters() (packets, bytes uint64) {
	if e.Direction == Ingress {
		return e.RxPackets, e.RxBytes
	}
	return e.TxPackets, e.TxBytes
}

// DstCounters returns the packets and bytes sent by the responder.
func (e *Event) DstCounters() (packets, bytes uint64) {
	if e.Direction == Ingress {
		return e.TxPackets, e.TxBytes
	}
	return e.RxPackets, e.RxBytes
}
