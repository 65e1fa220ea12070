package tracker

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// step is one packet of a TCP conversation between A (the initiator, port 40000) and B
// (port 80), and the state the connection must be in after it.
type step struct {
	fromB      bool
	flags      uint8
	seq, ack   uint32
	payload    uint32
	want       State
	wantMatch  Match
	matchCheck bool
}

const (
	syn    = FlagSYN
	synack = FlagSYN | FlagACK
	ack    = FlagACK
	finack = FlagFIN | FlagACK
	fin    = FlagFIN
	rst    = FlagRST
	rstack = FlagRST | FlagACK
)

// The handshake and close used as prefixes: A's ISN is 1000, B's 5000; A sends 10 bytes.
var (
	stHandshake = []step{
		{flags: syn, seq: 1000, want: StateSynSent},
		{fromB: true, flags: synack, seq: 5000, ack: 1001, want: StateSynReceived},
		{flags: ack, seq: 1001, ack: 5001, want: StateEstablished},
	}
	stData = []step{
		{flags: ack | FlagPSH, seq: 1001, ack: 5001, payload: 10, want: StateEstablished},
		{fromB: true, flags: ack, seq: 5001, ack: 1011, want: StateEstablished},
	}
)

func cat(parts ...[]step) []step {
	var out []step
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func runSteps(t *testing.T, tr *Tracker, steps []step, now flow.Time) {
	t.Helper()
	for i, s := range steps {
		p := tcpPkt(addrA, addrB, 40000, 80, s.flags, s.seq, s.ack, s.payload)
		if s.fromB {
			p = tcpPkt(addrB, addrA, 80, 40000, s.flags, s.seq, s.ack, s.payload)
		}
		m := tr.ProcessAt(p, now+flow.Time(i))
		if s.matchCheck && m != s.wantMatch {
			t.Fatalf("step %d (%+v): match %v, want %v", i, s, m, s.wantMatch)
		}
		got, ok := tr.StateOf(p)
		if s.want == StateNone {
			if ok {
				t.Fatalf("step %d (%+v): entry in state %v, want none", i, s, got)
			}
			continue
		}
		if !ok || got != s.want {
			t.Fatalf("step %d (%+v): state %v (exists %v), want %v", i, s, got, ok, s.want)
		}
	}
}

func TestTCPTransitions(t *testing.T) {
	cases := []struct {
		name  string
		steps []step
	}{
		{"handshake", stHandshake},
		{"retransmitted SYN", []step{
			{flags: syn, seq: 1000, want: StateSynSent},
			{flags: syn, seq: 1000, want: StateSynSent},
			{fromB: true, flags: synack, seq: 5000, ack: 1001, want: StateSynReceived},
			{fromB: true, flags: synack, seq: 5000, ack: 1001, want: StateSynReceived}, // retransmitted SYN-ACK
			{flags: ack, seq: 1001, ack: 5001, want: StateEstablished},
		}},
		{"simultaneous open", []step{
			{flags: syn, seq: 1000, want: StateSynSent},
			{fromB: true, flags: syn, seq: 5000, want: StateSynSent2},
			{flags: synack, seq: 1000, ack: 5001, want: StateSynReceived},
			{fromB: true, flags: synack, seq: 5000, ack: 1001, want: StateEstablished},
		}},
		{"ACK from the SYN-ACK sender does not establish", []step{
			{flags: syn, seq: 1000, want: StateSynSent},
			{fromB: true, flags: synack, seq: 5000, ack: 1001, want: StateSynReceived},
			{fromB: true, flags: ack, seq: 5001, ack: 1001, want: StateSynReceived},
			{flags: ack, seq: 1001, ack: 5001, want: StateEstablished},
		}},
		{"data stays established", cat(stHandshake, stData)},
		{"orderly close, initiator first", cat(stHandshake, stData, []step{
			{flags: finack, seq: 1011, ack: 5001, want: StateFinWait},
			{fromB: true, flags: ack, seq: 5001, ack: 1012, want: StateCloseWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1012, want: StateLastAck},
			{flags: ack, seq: 1012, ack: 5002, want: StateTimeWait},
		})},
		{"orderly close, responder first", cat(stHandshake, []step{
			{fromB: true, flags: finack, seq: 5001, ack: 1001, want: StateFinWait},
			{flags: ack, seq: 1001, ack: 5002, want: StateCloseWait},
			{flags: finack, seq: 1001, ack: 5002, want: StateLastAck},
			{fromB: true, flags: ack, seq: 5002, ack: 1002, want: StateTimeWait},
		})},
		{"FIN answered by FIN-ACK", cat(stHandshake, []step{
			{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1002, want: StateLastAck},
			{flags: ack, seq: 1002, ack: 5002, want: StateTimeWait},
		})},
		{"ACK of data before the FIN does not close", cat(stHandshake, []step{
			{flags: finack | FlagPSH, seq: 1001, ack: 5001, payload: 10, want: StateFinWait}, // FIN at 1011, ends 1012
			{fromB: true, flags: ack, seq: 5001, ack: 1006, want: StateFinWait},
			{fromB: true, flags: ack, seq: 5001, ack: 1011, want: StateFinWait},
			{fromB: true, flags: ack, seq: 5001, ack: 1012, want: StateCloseWait},
		})},
		{"out-of-order: ACK of the FIN captured before the FIN", cat(stHandshake, []step{
			{fromB: true, flags: ack, seq: 5001, ack: 1002, want: StateEstablished},
			{flags: finack, seq: 1001, ack: 5001, want: StateCloseWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1002, want: StateLastAck},
			{flags: ack, seq: 1002, ack: 5002, want: StateTimeWait},
		})},
		{"out-of-order: last ACK before the second FIN", cat(stHandshake, []step{
			{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: ack, seq: 5001, ack: 1002, want: StateCloseWait},
			{flags: ack, seq: 1002, ack: 5002, want: StateCloseWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1002, want: StateTimeWait},
		})},
		{"half-closed: data keeps flowing the other way", cat(stHandshake, []step{
			{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: ack, seq: 5001, ack: 1002, want: StateCloseWait},
			{fromB: true, flags: ack | FlagPSH, seq: 5001, ack: 1002, payload: 1000, want: StateCloseWait},
			{flags: ack, seq: 1002, ack: 6001, want: StateCloseWait},
			{fromB: true, flags: finack, seq: 6001, ack: 1002, want: StateLastAck},
			{flags: ack, seq: 1002, ack: 6002, want: StateTimeWait},
		})},
		{"simultaneous close", cat(stHandshake, []step{
			{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1001, want: StateClosing},
			{flags: ack, seq: 1002, ack: 5002, want: StateClosing},
			{fromB: true, flags: ack, seq: 5002, ack: 1002, want: StateTimeWait},
		})},
		{"simultaneous close, FINs acknowledged in the other order", cat(stHandshake, []step{
			{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1001, want: StateClosing},
			{fromB: true, flags: ack, seq: 5002, ack: 1002, want: StateLastAck},
			{flags: ack, seq: 1002, ack: 5002, want: StateTimeWait},
		})},
		{"FIN while the handshake completes", cat(stHandshake[:2], []step{
			{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
		})},
		{"late ACK in TIME_WAIT", cat(stHandshake, []step{
			{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1002, want: StateLastAck},
			{flags: ack, seq: 1002, ack: 5002, want: StateTimeWait},
			{flags: ack, seq: 1002, ack: 5002, want: StateTimeWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1002, want: StateTimeWait}, // retransmitted FIN
		})},
		{"picked up mid-stream", []step{
			{flags: ack, seq: 1001, ack: 5001, want: StateEstablished, wantMatch: MatchNew, matchCheck: true},
			{fromB: true, flags: ack, seq: 5001, ack: 1001, want: StateEstablished, wantMatch: MatchReply, matchCheck: true},
		}},
		{"SYN-ACK without SYN opens nothing", []step{
			{flags: synack, seq: 1000, ack: 1, want: StateNone, wantMatch: MatchNone, matchCheck: true},
		}},
		{"FIN without connection opens nothing", []step{
			{flags: finack, seq: 1000, ack: 1, want: StateNone, wantMatch: MatchNone, matchCheck: true},
		}},
		{"RST without connection opens nothing", []step{
			{flags: rst, seq: 1000, want: StateNone, wantMatch: MatchNone, matchCheck: true},
		}},
		{"connection refused", []step{
			{flags: syn, seq: 1000, want: StateSynSent},
			{fromB: true, flags: rstack, seq: 0, ack: 1001, want: StateClose},
		}},
		{"RST that does not acknowledge the SYN is ignored", []step{
			{flags: syn, seq: 1000, want: StateSynSent},
			{fromB: true, flags: rstack, seq: 0, ack: 77, want: StateSynSent},
			{fromB: true, flags: rst, seq: 0, want: StateSynSent},
			{fromB: true, flags: synack, seq: 5000, ack: 1001, want: StateSynReceived},
		}},
		{"RST for a retransmitted SYN's connection", []step{
			{flags: syn, seq: 1000, want: StateSynSent},
			{flags: syn, seq: 1000, want: StateSynSent},
			{fromB: true, flags: rstack, seq: 0, ack: 1001, want: StateClose},
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			runSteps(t, New(Config{}), c.steps, sec)
		})
	}
}

// TestTCPResetInEveryState resets a connection from either end in every state it can reach.
func TestTCPResetInEveryState(t *testing.T) {
	prefixes := map[State][]step{
		StateSynSent:     stHandshake[:1],
		StateSynSent2:    {{flags: syn, seq: 1000, want: StateSynSent}, {fromB: true, flags: syn, seq: 5000, want: StateSynSent2}},
		StateSynReceived: stHandshake[:2],
		StateEstablished: stHandshake,
		StateFinWait:     cat(stHandshake, []step{{flags: finack, seq: 1001, ack: 5001, want: StateFinWait}}),
		StateCloseWait: cat(stHandshake, []step{{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: ack, seq: 5001, ack: 1002, want: StateCloseWait}}),
		StateClosing: cat(stHandshake, []step{{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1001, want: StateClosing}}),
		StateLastAck: cat(stHandshake, []step{{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1002, want: StateLastAck}}),
		StateTimeWait: cat(stHandshake, []step{{flags: finack, seq: 1001, ack: 5001, want: StateFinWait},
			{fromB: true, flags: finack, seq: 5001, ack: 1002, want: StateLastAck},
			{flags: ack, seq: 1002, ack: 5002, want: StateTimeWait}}),
		StateClose: cat(stHandshake, []step{{flags: rst, seq: 1001, want: StateClose}}),
	}
	for st := StateSynSent; st <= StateClose; st++ {
		pre, ok := prefixes[st]
		if !ok {
			t.Fatalf("no prefix reaches %v", st)
		}
		for _, fromB := range []bool{false, true} {
			t.Run(fmt.Sprintf("%v/fromB=%v", st, fromB), func(t *testing.T) {
				tr := New(Config{})
				// A RST answering a SYN acknowledges it (the others need not: see the
				// test of an unacknowledging RST in TestTCPTransitions).
				runSteps(t, tr, cat(pre, []step{{fromB: fromB, flags: rstack, seq: 7, ack: 1001, want: StateClose}}), sec)
				starts, ends, _ := drain(t, tr)
				if len(starts) != 1 || len(ends) != 0 {
					t.Fatalf("%d starts, %d ends; want 1 start and the end only when the entry goes", len(starts), len(ends))
				}
				if s := tr.Stats(); s.Entries != 1 {
					t.Fatalf("entries %d, want 1", s.Entries)
				}
			})
		}
	}
}

// TestTCPReuse checks that a SYN on the 5-tuple of a finished connection ends it and opens a
// new connection with a new flow ID, and that a SYN in any other state does not.
func TestTCPReuse(t *testing.T) {
	closeSteps := cat(stHandshake, stData, []step{
		{flags: finack, seq: 1011, ack: 5001, want: StateFinWait},
		{fromB: true, flags: finack, seq: 5001, ack: 1012, want: StateLastAck},
		{flags: ack, seq: 1012, ack: 5002, want: StateTimeWait},
	})
	for _, c := range []struct {
		name  string
		pre   []step
		fromB bool
	}{
		{"time wait, same initiator", closeSteps, false},
		{"time wait, other end initiates", closeSteps, true},
		{"close after reset", cat(stHandshake, []step{{flags: rst, seq: 1001, want: StateClose}}), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			tr := New(Config{LocalPrefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/32")}})
			runSteps(t, tr, c.pre, sec)
			p := tcpPkt(addrA, addrB, 40000, 80, syn, 90000, 0, 0)
			if c.fromB {
				p = tcpPkt(addrB, addrA, 80, 40000, syn, 90000, 0, 0)
			}
			if m := tr.ProcessAt(p, 5*sec); m != MatchNew {
				t.Fatalf("reusing SYN: match %v, want new", m)
			}
			if st, _ := tr.StateOf(p); st != StateSynSent {
				t.Fatalf("state %v, want syn_sent", st)
			}
			starts, ends, _ := drain(t, tr)
			if len(starts) != 2 || len(ends) != 1 {
				t.Fatalf("%d starts and %d ends, want 2 and 1", len(starts), len(ends))
			}
			if ends[0].FlowID != starts[0].FlowID || starts[1].FlowID == starts[0].FlowID {
				t.Fatalf("flow IDs: first %v, end %v, second %v", starts[0].FlowID, ends[0].FlowID, starts[1].FlowID)
			}
			wantPkts := uint64(len(c.pre))
			if got := ends[0].TxPackets + ends[0].RxPackets; got != wantPkts {
				t.Fatalf("old connection counted %d packets, want %d", got, wantPkts)
			}
			if c.fromB {
				if starts[1].SrcAddr != addrB || starts[1].Direction != flow.Ingress {
					t.Fatalf("new connection %v→%v %v, want from B, ingress", starts[1].SrcAddr, starts[1].DstAddr, starts[1].Direction)
				}
			} else if starts[1].SrcAddr != addrA || starts[1].Direction != flow.Egress {
				t.Fatalf("new connection %v→%v %v, want from A, egress", starts[1].SrcAddr, starts[1].DstAddr, starts[1].Direction)
			}
			if s := tr.Stats(); s.Reopened != 1 || s.Entries != 1 {
				t.Fatalf("stats %+v, want 1 reopened and 1 entry", s)
			}
		})
	}
	t.Run("SYN in established does not reopen", func(t *testing.T) {
		tr := New(Config{})
		runSteps(t, tr, cat(stHandshake, []step{{flags: syn, seq: 1000, want: StateEstablished}}), sec)
		if s := tr.Stats(); s.Started != 1 || s.Reopened != 0 {
			t.Fatalf("stats %+v", s)
		}
	})
}
