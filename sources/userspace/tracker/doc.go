// Package tracker is a userspace connection tracker: the table a stateful firewall keeps when
// the kernel's conntrack is not in the packet path (userspace WireGuard, containers without
// netfilter, offline analysis of a capture). It follows connections by their 5-tuple over IPv4
// and IPv6 for TCP, UDP, ICMP and ICMPv6, runs the TCP state machine with the Linux
// nf_conntrack default timeouts, counts packets and bytes per direction at the IP layer (IP
// header included, as the kernel counts), and reports flow events (flow.Event): start when a
// connection is first seen, end when it is removed (closed and timed out, superseded, evicted
// or flushed), and drop when the embedding firewall reports a dropped packet.
//
// # Embedding it in a firewall
//
// A firewall that sees raw IP packets decodes each one into a Packet (DecodeIP does it by
// hand, without allocating) and hands it to the tracker:
//
//	t := tracker.New(tracker.Config{LocalPrefixes: prefixes, MaxEntries: 1 << 18})
//	var p tracker.Packet
//	if err := tracker.DecodeIP(raw, &p); err != nil {
//		// not trackable: count it by tracker.ReasonOf(err) and decide by policy
//	}
//	switch t.Peek(&p) {            // read-only: is this packet part of a known connection?
//	case tracker.MatchReply, tracker.MatchRelated:
//		// allow: the answer to a connection the host made
//	}
//	if allowed {
//		t.Process(&p)              // create or update the entry, count the packet
//	} else {
//		t.ReportDrop(&p, ruleID)   // a drop event, without creating an entry
//	}
//
// Process and ProcessAt are safe for concurrent use and do not allocate for a packet of a
// known connection. Events collect inside the tracker until the embedder takes them with
// DrainEvents; Ready signals when a batch's worth is waiting. Process removes timed-out
// connections as it goes (at most a second late); Expire does it for a tracker that sees no
// packets for a while. Time comes from Config.Clock (wall time by default); a replay
// passes each packet's capture time to ProcessAt instead, so every timeout follows the capture.
//
// Flow IDs are stable for a connection: its start and end events share one FlowID, and a TCP
// connection that reuses the 5-tuple of one in TIME_WAIT gets a new one.
package tracker
