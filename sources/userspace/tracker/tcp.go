package tracker

// The TCP state machine, seen from the middle of the path as conntrack sees it: it follows the
// handshake by flags and the close by which FINs have been sent and which acknowledged. FINs
// are matched to their ACKs by sequence number, so an ACK for earlier data does not close a
// direction and an ACK that was captured before the FIN it acknowledges still counts. States
// and timeouts follow Linux nf_conntrack; StateClosing (a simultaneous close) shares the
// LAST_ACK timeout, as Linux puts both in LAST_ACK.

const (
	dirOrig  = 0
	dirReply = 1
)

// tcpState is the per-connection TCP bookkeeping, part of an entry.
type tcpState struct {
	finEnd   [2]uint32 // sequence number just past each direction's FIN
	maxAck   [2]uint32 // highest acknowledgement number seen from each direction
	ackSeen  [2]bool
	fin      [2]bool
	finAcked [2]bool
	firstFin uint8  // direction of the first FIN
	synAck   uint8  // direction that sent the SYN-ACK
	synSeq   uint32 // the initiator's SYN sequence number, which an answering RST must acknowledge
}

// seqGE reports whether a is at or after b in sequence space (RFC 1982 arithmetic).
func seqGE(a, b uint32) bool { return int32(a-b) >= 0 }

// tcpOpens reports whether a packet without an entry opens one, and in which state: a SYN
// opens a handshake; a bare ACK picks up a connection already established (as Linux does by
// default, nf_conntrack_tcp_loose=1). Anything else without an entry is invalid.
func tcpOpens(flags uint8) (State, bool) {
	switch flags & (FlagSYN | FlagACK | FlagFIN | FlagRST) {
	case FlagSYN:
		return StateSynSent, true
	case FlagACK:
		return StateEstablished, true
	}
	return StateNone, false
}

// tcpReopens reports whether a packet starts a new connection on the 5-tuple of one that has
// finished (a SYN in TIME_WAIT or CLOSE).
func tcpReopens(s State, flags uint8) bool {
	return (s == StateTimeWait || s == StateClose) && flags&(FlagSYN|FlagACK|FlagRST|FlagFIN) == FlagSYN
}

// tcpNext moves the connection in state s for a packet from direction dir and returns the new
// state. The caller has handled tcpReopens.
func (ts *tcpState) next(s State, p *Packet, dir uint8) State {
	f := p.TCPFlags
	if f&FlagRST != 0 {
		// Before any answer, only a RST that acknowledges the SYN is the peer's (RFC 9293
		// 3.10.7.3); anyone could send one that does not, and it must not end the connection.
		if s == StateSynSent && dir == dirReply && (f&FlagACK == 0 || p.Ack != ts.synSeq+1) {
			return s
		}
		return StateClose
	}
	syn, ack := f&FlagSYN != 0, f&FlagACK != 0
	switch s {
	case StateSynSent:
		switch {
		case dir == dirReply && syn && ack:
			ts.synAck = dirReply
			s = StateSynReceived
		case dir == dirReply && syn:
			s = StateSynSent2
		}
		// A retransmitted SYN, or anything else before the answer, leaves the state alone.
		return s
	case StateSynSent2:
		if syn && ack {
			ts.synAck = dir
			return StateSynReceived
		}
		return s
	case StateSynReceived:
		if !ack || dir == ts.synAck {
			return s // SYN-ACK retransmission, or the ACK has not come yet
		}
		s = StateEstablished
	case StateTimeWait, StateClose:
		return s // late segments of a finished connection
	}
	// Established or closing: follow acknowledgements and FINs.
	other := dir ^ 1
	if ack {
		if !ts.ackSeen[dir] || seqGE(p.Ack, ts.maxAck[dir]) {
			ts.maxAck[dir], ts.ackSeen[dir] = p.Ack, true
		}
		if ts.fin[other] && seqGE(p.Ack, ts.finEnd[other]) {
			ts.finAcked[other] = true
		}
	}
	if f&FlagFIN != 0 && !ts.fin[dir] {
		end := p.Seq + p.PayloadLen + 1
		if syn {
			end++
		}
		if !ts.fin[other] {
			ts.firstFin = dir
		}
		ts.fin[dir], ts.finEnd[dir] = true, end
		// The peer may already have acknowledged it if its ACK was captured first.
		if ts.ackSeen[other] && seqGE(ts.maxAck[other], end) {
			ts.finAcked[dir] = true
		}
	}
	switch {
	case !ts.fin[0] && !ts.fin[1]:
		return StateEstablished
	case ts.fin[0] != ts.fin[1]: // one direction closed
		if ts.finAcked[ts.firstFin] {
			return StateCloseWait
		}
		return StateFinWait
	case ts.finAcked[0] && ts.finAcked[1]:
		return StateTimeWait
	case ts.finAcked[ts.firstFin]:
		return StateLastAck
	default:
		return StateClosing
	}
}
