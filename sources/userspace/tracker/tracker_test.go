package tracker

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
)

var localA = []netip.Prefix{netip.MustParsePrefix("10.0.0.1/32"), netip.MustParsePrefix("fd00::1/128")}

func TestUDPCountersAndDirection(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		a, b := addrA, addrB
		if v6 {
			a, b = addrA6, addrB6
		}
		tr := New(Config{LocalPrefixes: localA, Source: "us"})
		// Egress: A → B, two datagrams out, one back.
		mustMatch(t, tr.ProcessAt(udpPkt(a, b, 5000, 53, 100), sec), MatchNew)
		mustMatch(t, tr.ProcessAt(udpPkt(a, b, 5000, 53, 10), sec+1), MatchOriginal)
		mustMatch(t, tr.ProcessAt(udpPkt(b, a, 53, 5000, 300), sec+2), MatchReply)
		// Ingress: B → A.
		mustMatch(t, tr.ProcessAt(udpPkt(b, a, 6000, 7000, 1), sec+3), MatchNew)
		mustMatch(t, tr.ProcessAt(udpPkt(a, b, 7000, 6000, 2), sec+4), MatchReply)
		if n := tr.Flush(2*sec, -1); n != 0 {
			t.Fatalf("%d left after flush", n)
		}
		starts, ends, _ := drain(t, tr)
		if len(starts) != 2 || len(ends) != 2 {
			t.Fatalf("v6=%v: %d starts %d ends", v6, len(starts), len(ends))
		}
		hdr := uint64(28)
		if v6 {
			hdr = 48
		}
		eg, in := ends[0], ends[1]
		if eg.SrcPort != 5000 {
			eg, in = in, eg
		}
		want := flow.Event{SrcAddr: a, DstAddr: b, SrcPort: 5000, DstPort: 53, Direction: flow.Egress,
			TxPackets: 2, TxBytes: 2*hdr + 110, RxPackets: 1, RxBytes: hdr + 300}
		checkCounters(t, eg, want)
		want = flow.Event{SrcAddr: b, DstAddr: a, SrcPort: 6000, DstPort: 7000, Direction: flow.Ingress,
			RxPackets: 1, RxBytes: hdr + 1, TxPackets: 1, TxBytes: hdr + 2}
		checkCounters(t, in, want)
		if eg.Source != "us" || eg.Protocol != 17 || eg.Start != sec || eg.End != sec+2 || eg.Timestamp != 2*sec {
			t.Fatalf("end event %+v", eg)
		}
		if starts[0].FlowID != ends[0].FlowID && starts[0].FlowID != ends[1].FlowID {
			t.Fatal("start and end flow IDs differ")
		}
		if starts[0].SrcPort != 5000 { // events of different connections come in any order
			starts[0], starts[1] = starts[1], starts[0]
		}
		if starts[0].TxPackets != 1 || starts[0].TxBytes != hdr+100 {
			t.Fatalf("start counts the first packet: %+v", starts[0])
		}
	}
}

func checkCounters(t *testing.T, got, want flow.Event) {
	t.Helper()
	if got.SrcAddr != want.SrcAddr || got.DstAddr != want.DstAddr || got.SrcPort != want.SrcPort ||
		got.DstPort != want.DstPort || got.Direction != want.Direction ||
		got.TxPackets != want.TxPackets || got.TxBytes != want.TxBytes ||
		got.RxPackets != want.RxPackets || got.RxBytes != want.RxBytes {
		t.Fatalf("event\n got  %v:%d→%v:%d %v tx %d/%d rx %d/%d\n want %v:%d→%v:%d %v tx %d/%d rx %d/%d",
			got.SrcAddr, got.SrcPort, got.DstAddr, got.DstPort, got.Direction, got.TxPackets, got.TxBytes, got.RxPackets, got.RxBytes,
			want.SrcAddr, want.SrcPort, want.DstAddr, want.DstPort, want.Direction, want.TxPackets, want.TxBytes, want.RxPackets, want.RxBytes)
	}
}

func mustMatch(t *testing.T, got, want Match) {
	t.Helper()
	if got != want {
		t.Fatalf("match %v, want %v", got, want)
	}
}

// TestTimeouts checks each timeout against the Linux default, with an injected clock.
func TestTimeouts(t *testing.T) {
	type tc struct {
		name    string
		packets []*Packet
		timeout time.Duration
	}
	hs := []*Packet{tcpPkt(addrA, addrB, 1, 2, syn, 1000, 0, 0), tcpPkt(addrB, addrA, 2, 1, synack, 5000, 1001, 0),
		tcpPkt(addrA, addrB, 1, 2, ack, 1001, 5001, 0)}
	cases := []tc{
		{"tcp syn_sent", hs[:1], 2 * time.Minute},
		{"tcp syn_recv", hs[:2], time.Minute},
		{"tcp established", hs, 5 * 24 * time.Hour},
		{"tcp fin_wait", append(hs[:3:3], tcpPkt(addrA, addrB, 1, 2, finack, 1001, 5001, 0)), 2 * time.Minute},
		{"tcp close_wait", append(hs[:3:3], tcpPkt(addrA, addrB, 1, 2, finack, 1001, 5001, 0), tcpPkt(addrB, addrA, 2, 1, ack, 5001, 1002, 0)), time.Minute},
		{"tcp last_ack", append(hs[:3:3], tcpPkt(addrA, addrB, 1, 2, finack, 1001, 5001, 0), tcpPkt(addrB, addrA, 2, 1, finack, 5001, 1002, 0)), 30 * time.Second},
		{"tcp time_wait", append(hs[:3:3], tcpPkt(addrA, addrB, 1, 2, finack, 1001, 5001, 0), tcpPkt(addrB, addrA, 2, 1, finack, 5001, 1002, 0), tcpPkt(addrA, addrB, 1, 2, ack, 1002, 5002, 0)), 2 * time.Minute},
		{"tcp close", append(hs[:3:3], tcpPkt(addrA, addrB, 1, 2, rst, 1001, 0, 0)), 10 * time.Second},
		{"udp unreplied", []*Packet{udpPkt(addrA, addrB, 1, 2, 0)}, 30 * time.Second},
		{"udp answered, younger than 2s", []*Packet{udpPkt(addrA, addrB, 1, 2, 0), udpPkt(addrB, addrA, 2, 1, 0)}, 30 * time.Second},
		{"icmp", []*Packet{icmpPkt(addrA, addrB, 8, 0, 7), icmpPkt(addrB, addrA, 0, 0, 7)}, 30 * time.Second},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, explicit := range []bool{true, false} {
				// One shard: a packet sweeps only the shard its connection lives in.
				tr := New(Config{Shards: 1})
				last := flow.Time(0)
				for i, p := range c.packets {
					last = sec + flow.Time(i)
					tr.ProcessAt(p, last)
				}
				deadline := last + flow.Time(c.timeout)
				if explicit {
					if n := tr.Expire(deadline - 1); n != 0 {
						t.Fatalf("expired %d a nanosecond early", n)
					}
					if n := tr.Expire(deadline); n != 1 {
						t.Fatalf("expired %d at the timeout, want 1", n)
					}
				} else {
					// A later packet of another connection sweeps the table.
					tr.ProcessAt(udpPkt(addrA6, addrB6, 9, 9, 0), deadline-1)
					if tr.Len() != 2 {
						t.Fatalf("%d entries a nanosecond early, want 2", tr.Len())
					}
					tr.ProcessAt(udpPkt(addrA6, addrB6, 9, 9, 0), deadline+flow.Time(time.Second))
					if tr.Len() != 1 {
						t.Fatalf("%d entries after the timeout, want 1", tr.Len())
					}
				}
				_, ends, _ := drain(t, tr)
				if len(ends) != 1 || ends[0].End != last {
					t.Fatalf("ends %+v", ends)
				}
			}
		})
	}
}

// TestUDPStream checks Linux's rule for the longer UDP timeout: answered, and still active two
// seconds after the first packet.
func TestUDPStream(t *testing.T) {
	tr := New(Config{Shards: 1})
	tr.ProcessAt(udpPkt(addrA, addrB, 1, 2, 0), sec)
	tr.ProcessAt(udpPkt(addrB, addrA, 2, 1, 0), sec+1)
	p := udpPkt(addrA, addrB, 1, 2, 0)
	if st, _ := tr.StateOf(p); st != StateUnreplied {
		t.Fatalf("answered after 1ns: state %v, want unreplied (short timeout)", st)
	}
	tr.ProcessAt(p, 3*sec)
	if st, _ := tr.StateOf(p); st != StateReplied {
		t.Fatalf("active after 2s: state %v, want replied (stream timeout)", st)
	}
	if n := tr.Expire(3*sec + flow.Time(119*time.Second)); n != 0 {
		t.Fatalf("stream expired after 119s")
	}
	if n := tr.Expire(3*sec + flow.Time(120*time.Second)); n != 1 {
		t.Fatalf("stream not expired after 120s")
	}
}

// TestExpiredEntryIsNotContinued checks that a packet arriving after its connection timed
// out (before any sweep) starts a new connection rather than reviving the old one.
func TestExpiredEntryIsNotContinued(t *testing.T) {
	tr := New(Config{Timeouts: Timeouts{UDPUnreplied: time.Hour}})
	tr.ProcessAt(udpPkt(addrA, addrB, 1, 2, 0), sec)
	for _, sh := range tr.shards {
		sh.swept = flow.Time(1 << 62) // no sweep will run
	}
	mustMatch(t, tr.ProcessAt(udpPkt(addrA, addrB, 1, 2, 0), sec+flow.Time(time.Hour)), MatchNew)
	starts, ends, _ := drain(t, tr)
	if len(starts) != 2 || len(ends) != 1 || ends[0].TxPackets != 1 {
		t.Fatalf("starts %d ends %d", len(starts), len(ends))
	}
}

func TestICMP(t *testing.T) {
	tr := New(Config{LocalPrefixes: localA})
	mustMatch(t, tr.ProcessAt(icmpPkt(addrA, addrB, 8, 0, 77), sec), MatchNew)
	mustMatch(t, tr.ProcessAt(icmpPkt(addrB, addrA, 0, 0, 77), sec), MatchReply)
	mustMatch(t, tr.ProcessAt(icmpPkt(addrA, addrB, 8, 0, 77), sec), MatchOriginal)
	mustMatch(t, tr.ProcessAt(icmpPkt(addrA, addrB, 8, 0, 78), sec), MatchNew)    // another identifier
	mustMatch(t, tr.ProcessAt(icmpPkt(addrB, addrA, 0, 0, 99), sec), MatchNone)   // a reply nobody asked for
	mustMatch(t, tr.ProcessAt(icmpPkt(addrA6, addrB6, 128, 0, 5), sec), MatchNew) // ICMPv6 echo
	mustMatch(t, tr.ProcessAt(icmpPkt(addrB6, addrA6, 129, 0, 5), sec), MatchReply)
	mustMatch(t, tr.ProcessAt(icmpPkt(addrA6, addrB6, 135, 0, 0), sec), MatchNone) // neighbour solicitation
	tr.Flush(2*sec, -1)
	_, ends, _ := drain(t, tr)
	if len(ends) != 3 {
		t.Fatalf("%d ends, want 3", len(ends))
	}
	for _, e := range ends {
		if e.SrcPort != 0 || e.DstPort != 0 || (e.ICMPType != 8 && e.ICMPType != 128) || e.Direction != flow.Egress {
			t.Fatalf("icmp end %+v", e)
		}
		if e.ICMPType == 8 && e.SrcAddr == addrA && e.TxPackets+e.RxPackets != 3 && e.TxPackets+e.RxPackets != 1 {
			t.Fatalf("icmp counters %+v", e)
		}
	}
	if s := tr.Stats(); s.Invalid != 2 {
		t.Fatalf("invalid %d, want 2", s.Invalid)
	}
}

func TestICMPErrorAttributedToQuotedFlow(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		a, b := addrA, addrB
		router := netip.MustParseAddr("10.9.9.9")
		if v6 {
			a, b, router = addrA6, addrB6, netip.MustParseAddr("fd09::9")
		}
		tr := New(Config{LocalPrefixes: localA})
		tr.ProcessAt(udpPkt(a, b, 5000, 33434, 10), sec)
		e := icmpPkt(router, a, 11, 0, 0) // time exceeded
		if v6 {
			e.ICMPType = 3
		}
		e.Quoted = Quoted{Valid: true, Src: a.As16(), Dst: b.As16(), Proto: 17, SrcPort: 5000, DstPort: 33434}
		if p := tr.PeekAt(e, sec); p != MatchRelated {
			t.Fatalf("peek %v", p)
		}
		mustMatch(t, tr.ProcessAt(e, sec+1), MatchRelated)
		// An error about a connection nobody made is not attributed.
		e.Quoted.SrcPort = 1
		mustMatch(t, tr.ProcessAt(e, sec+1), MatchNone)
		tr.Flush(2*sec, -1)
		_, ends, _ := drain(t, tr)
		if len(ends) != 1 || ends[0].RxPackets != 1 || ends[0].RxBytes != 84 || ends[0].TxPackets != 1 {
			t.Fatalf("v6=%v: ends %+v", v6, ends)
		}
		if s := tr.Stats(); s.Related != 1 || s.Started != 1 {
			t.Fatalf("stats %+v", s)
		}
	}
}

func TestEviction(t *testing.T) {
	tr := New(Config{MaxEntries: 3})
	// 1: established TCP, oldest; 2: reset TCP (finished); 3: UDP.
	tr.ProcessAt(tcpPkt(addrA, addrB, 1, 80, ack, 1, 1, 0), 1*sec)
	tr.ProcessAt(tcpPkt(addrA, addrB, 2, 80, syn, 1, 0, 0), 2*sec)
	tr.ProcessAt(tcpPkt(addrB, addrA, 80, 2, rstack, 0, 2, 0), 2*sec)
	tr.ProcessAt(udpPkt(addrA, addrB, 3, 53, 0), 3*sec)
	drain(t, tr)
	// The finished connection goes first although it is not the oldest.
	tr.ProcessAt(udpPkt(addrA, addrB, 4, 53, 0), 4*sec)
	_, ends, _ := drain(t, tr)
	if len(ends) != 1 || ends[0].SrcPort != 2 {
		t.Fatalf("first eviction ended %+v, want the reset connection", ends)
	}
	// Then the least recently active: touch 1 so that 3 is the oldest.
	tr.ProcessAt(tcpPkt(addrA, addrB, 1, 80, ack, 1, 1, 0), 5*sec)
	tr.ProcessAt(udpPkt(addrA, addrB, 5, 53, 0), 6*sec)
	_, ends, _ = drain(t, tr)
	if len(ends) != 1 || ends[0].SrcPort != 3 {
		t.Fatalf("second eviction ended %+v, want the UDP flow from port 3", ends)
	}
	if s := tr.Stats(); s.Evicted != 2 || s.Entries != 3 {
		t.Fatalf("stats %+v", s)
	}
}

func TestReportDrop(t *testing.T) {
	tr := New(Config{LocalPrefixes: localA})
	tr.ProcessAt(udpPkt(addrA, addrB, 1, 2, 0), sec)
	tr.ReportDropAt(udpPkt(addrB, addrA, 2, 1, 5), "rule-7", 2*sec)
	tr.ReportDropAt(tcpPkt(addrB, addrA, 9, 22, syn, 1, 0, 0), "rule-8", 3*sec)
	starts, _, drops := drain(t, tr)
	if len(drops) != 2 || tr.Len() != 1 {
		t.Fatalf("%d drops, %d entries", len(drops), tr.Len())
	}
	if drops[0].RuleID != "rule-7" { // events of different connections come in any order
		drops[0], drops[1] = drops[1], drops[0]
	}
	if drops[0].FlowID != starts[0].FlowID || drops[0].RuleID != "rule-7" || drops[0].RxPackets != 1 || drops[0].Direction != flow.Ingress {
		t.Fatalf("drop of a known flow: %+v", drops[0])
	}
	if drops[1].FlowID == starts[0].FlowID || drops[1].RuleID != "rule-8" || drops[1].DstPort != 22 {
		t.Fatalf("drop of a new flow: %+v", drops[1])
	}
}

func TestMaxPendingCountsLostEvents(t *testing.T) {
	tr := New(Config{MaxPending: 2})
	for i := range 5 {
		tr.ProcessAt(udpPkt(addrA, addrB, uint16(i), 2, 0), sec)
	}
	if s := tr.Stats(); s.EventsDropped != 3 || tr.Pending() != 2 {
		t.Fatalf("stats %+v pending %d", s, tr.Pending())
	}
}

func TestFlushInSlices(t *testing.T) {
	tr := New(Config{})
	for i := range 10 {
		tr.ProcessAt(udpPkt(addrA, addrB, uint16(i), 2, 0), sec)
	}
	left := []int{}
	for n := tr.Flush(2*sec, 4); ; n = tr.Flush(2*sec, 4) {
		left = append(left, n)
		if n == 0 {
			break
		}
	}
	if len(left) != 3 || left[0] != 6 || left[1] != 2 {
		t.Fatalf("left %v", left)
	}
	_, ends, _ := drain(t, tr)
	if len(ends) != 10 {
		t.Fatalf("%d ends", len(ends))
	}
}

func TestReadyFires(t *testing.T) {
	tr := New(Config{BatchHint: 3})
	for i := range 3 {
		tr.ProcessAt(udpPkt(addrA, addrB, uint16(i), 2, 0), sec)
	}
	select {
	case <-tr.Ready():
	default:
		t.Fatal("Ready did not fire at BatchHint events")
	}
}

func TestConcurrentProcess(t *testing.T) {
	for _, shards := range []int{1, 8} {
		tr := New(Config{Shards: shards})
		if tr.Shards() != shards {
			t.Fatalf("%d shards, want %d", tr.Shards(), shards)
		}
		done := make(chan []flow.Event)
		for g := range 4 {
			go func() {
				var evs []flow.Event
				for i := range 2000 {
					tr.Process(udpPkt(addrA, addrB, uint16(g*10000+i%100), 2, 0))
					if i%500 == 0 {
						evs = append(evs, tr.DrainEvents(nil)...)
					}
				}
				done <- evs
			}()
		}
		var evs []flow.Event
		for range 4 {
			evs = append(evs, <-done...)
		}
		if s := tr.Stats(); s.Started != 400 || s.Entries != 400 || tr.Len() != 400 {
			t.Fatalf("shards %d: stats %+v, want 400 started and in the table", shards, s)
		}
		if n := tr.Flush(2*sec, 150); n != 250 {
			t.Fatalf("shards %d: %d left after flushing 150, want 250", shards, n)
		}
		tr.Flush(2*sec, -1)
		evs = append(evs, tr.DrainEvents(nil)...)
		starts, ends := map[[16]byte]int{}, map[[16]byte]int{}
		for _, e := range evs {
			if e.Type == flow.TypeStart {
				starts[e.FlowID]++
			} else {
				ends[e.FlowID]++
			}
		}
		if len(starts) != 400 || len(ends) != 400 || tr.Pending() != 0 {
			t.Fatalf("shards %d: %d flows started, %d ended, %d pending", shards, len(starts), len(ends), tr.Pending())
		}
	}
}

func TestSetLocalPrefixes(t *testing.T) {
	tr := New(Config{})
	tr.ProcessAt(udpPkt(addrA, addrB, 1, 2, 0), sec)
	tr.SetLocalPrefixes([]netip.Prefix{netip.MustParsePrefix("10.0.0.2/32")})
	tr.ProcessAt(udpPkt(addrA, addrB, 3, 4, 0), sec)
	if got := tr.LocalPrefixes(); len(got) != 1 || got[0].String() != "10.0.0.2/32" {
		t.Fatalf("local prefixes %v", got)
	}
	starts, _, _ := drain(t, tr)
	dirs := map[uint16]flow.Direction{}
	for _, e := range starts {
		dirs[e.SrcPort] = e.Direction
	}
	if dirs[1] != flow.DirectionUnknown || dirs[3] != flow.Ingress {
		t.Fatalf("directions %v: want unknown before the change, ingress after", dirs)
	}
}

// TestFragmentsCountAsOneDatagram sends a UDP datagram in three fragments and its answer
// whole: the connection counts the datagram once, with its reassembled length, as the kernel
// does after reassembly. A later fragment whose first fragment was never seen is untracked.
func TestFragmentsCountAsOneDatagram(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		a, b, hdr := addrA, addrB, uint32(20)
		if v6 {
			a, b, hdr = addrA6, addrB6, 48 // 40 + the fragment header
		}
		tr := New(Config{LocalPrefixes: localA})
		first := udpPkt(a, b, 5000, 53, 0)
		first.Length, first.HdrLen = 1500, uint16(hdr)
		first.Fragment, first.FragID, first.MoreFragments = FirstFragment, 99, true
		mid := &Packet{Proto: 17, Length: 1500, HdrLen: uint16(hdr), Fragment: LaterFragment, FragID: 99, MoreFragments: true}
		mid.SetAddrs(a, b)
		last := *mid
		last.Length, last.MoreFragments = hdr+100, false
		mustMatch(t, tr.ProcessAt(first, sec), MatchNew)
		mustMatch(t, tr.ProcessAt(mid, sec+1), MatchOriginal)
		mustMatch(t, tr.ProcessAt(&last, sec+2), MatchOriginal)
		// The datagram is complete: a straggler with the same ID is not attributed.
		mustMatch(t, tr.ProcessAt(&last, sec+3), MatchNone)
		// A later fragment of another datagram whose first fragment was not seen.
		orphan := *mid
		orphan.FragID = 100
		mustMatch(t, tr.ProcessAt(&orphan, sec+4), MatchNone)
		mustMatch(t, tr.ProcessAt(udpPkt(b, a, 53, 5000, 10), sec+5), MatchReply)
		tr.Flush(2*sec, -1)
		_, ends, _ := drain(t, tr)
		wantBytes := uint64(1500 + (1500 - hdr) + 100)
		if len(ends) != 1 || ends[0].TxPackets != 1 || ends[0].TxBytes != wantBytes || ends[0].RxPackets != 1 {
			t.Fatalf("v6=%v: ends %+v, want 1 packet of %d bytes sent", v6, ends, wantBytes)
		}
		if s := tr.Stats(); s.Fragments != 2 || s.Invalid != 2 {
			t.Fatalf("v6=%v: stats %+v, want 2 fragments attributed and 2 untracked", v6, s)
		}
	}
}

// DrainBatches ends the same connections with the same end events as Flush and DrainEvents,
// in batches of at most the size asked, and leaves an empty table that works as before.
func TestDrainBatchesMatchesFlush(t *testing.T) {
	for _, shards := range []int{1, 4} {
		open := func(tr *Tracker) {
			for i := range 2500 {
				if i%3 == 0 {
					tr.ProcessAt(tcpPkt(addrA, addrB, uint16(1000+i), 80, FlagSYN, 1, 0, 0), sec)
					tr.ProcessAt(tcpPkt(addrB, addrA, 80, uint16(1000+i), FlagSYN|FlagACK, 9, 2, 0), sec)
				} else {
					tr.ProcessAt(udpPkt(addrA, addrB, uint16(1000+i), 53, uint32(i)), sec)
				}
			}
			tr.DrainEvents(nil)
		}
		endKey := func(e flow.Event) string {
			return fmt.Sprint(e.Type, e.SrcAddr, e.SrcPort, e.DstAddr, e.DstPort, e.Protocol, e.Direction, e.Start, e.End, e.Timestamp, e.TxPackets, e.TxBytes, e.RxPackets, e.RxBytes)
		}
		a, b := New(Config{Shards: shards}), New(Config{Shards: shards})
		open(a)
		open(b)
		a.Flush(2*sec, -1)
		want := map[string]int{}
		for _, e := range a.DrainEvents(nil) {
			want[endKey(e)]++
		}
		got := map[string]int{}
		var sizes []int
		n, err := b.DrainBatches(2*sec, 1000, nil, func(evs []flow.Event) error {
			sizes = append(sizes, len(evs))
			for _, e := range evs {
				got[endKey(e)]++
			}
			return nil
		})
		if err != nil || n != 2500 {
			t.Fatalf("shards %d: ended %d, %v", shards, n, err)
		}
		for _, s := range sizes {
			if s > 1000 || s == 0 {
				t.Fatalf("shards %d: batch sizes %v", shards, sizes)
			}
		}
		if !maps.Equal(got, want) || len(want) != 2500 {
			t.Fatalf("shards %d: %d distinct end events, want the %d of Flush", shards, len(got), len(want))
		}
		if b.Len() != 0 || b.Pending() != 0 || b.Stats().Ended != a.Stats().Ended {
			t.Fatalf("shards %d: %d left, %d pending, stats %+v", shards, b.Len(), b.Pending(), b.Stats())
		}
		// The emptied table takes the same connections again, as new ones.
		for i := range 2500 {
			if m := b.ProcessAt(udpPkt(addrA, addrB, uint16(1000+i), 53, 0), 3*sec); m != MatchNew {
				t.Fatalf("shards %d: reopened connection %d: %v", shards, i, m)
			}
		}
		if b.Len() != 2500 {
			t.Fatalf("shards %d: %d connections after reopening", shards, b.Len())
		}
	}
}

// An error from emit stops DrainBatches: the connections not ended are still in the table,
// found by their packets; the ended ones are gone.
func TestDrainBatchesStopsOnError(t *testing.T) {
	tr := New(Config{})
	for i := range 1000 {
		tr.ProcessAt(udpPkt(addrA, addrB, uint16(i), 53, 0), sec)
	}
	tr.DrainEvents(nil)
	stop := errors.New("stop")
	batches := 0
	n, err := tr.DrainBatches(2*sec, 300, func() []flow.Event { return make([]flow.Event, 0, 300) }, func(evs []flow.Event) error {
		batches++
		if batches == 2 {
			return stop
		}
		return nil
	})
	if err != stop || n != 600 || tr.Len() != 400 {
		t.Fatalf("ended %d, %v, %d left; want 600, stop, 400", n, err, tr.Len())
	}
	news := 0
	for i := range 1000 {
		if tr.ProcessAt(udpPkt(addrA, addrB, uint16(i), 53, 0), 3*sec) == MatchNew {
			news++
		}
	}
	if news != 600 || tr.Len() != 1000 {
		t.Fatalf("%d packets opened a connection (want the 600 ended), %d connections", news, tr.Len())
	}
}
