package tracker

import (
	"net/netip"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Test endpoints: A initiates, B answers.
var (
	addrA  = netip.MustParseAddr("10.0.0.1")
	addrB  = netip.MustParseAddr("10.0.0.2")
	addrA6 = netip.MustParseAddr("fd00::1")
	addrB6 = netip.MustParseAddr("fd00::2")
)

const sec = flow.Time(1e9)

func tcpPkt(src, dst netip.Addr, sport, dport uint16, flags uint8, seq, ack, payload uint32) *Packet {
	p := &Packet{Proto: 6, SrcPort: sport, DstPort: dport, TCPFlags: flags, Seq: seq, Ack: ack, PayloadLen: payload}
	p.SetAddrs(src, dst)
	hdr := uint32(40)
	if p.IPv6 {
		hdr = 60
	}
	p.Length = hdr + payload
	return p
}

func udpPkt(src, dst netip.Addr, sport, dport uint16, payload uint32) *Packet {
	p := &Packet{Proto: 17, SrcPort: sport, DstPort: dport}
	p.SetAddrs(src, dst)
	p.Length = 28 + payload
	if p.IPv6 {
		p.Length = 48 + payload
	}
	return p
}

func icmpPkt(src, dst netip.Addr, typ, code uint8, id uint16) *Packet {
	p := &Packet{Proto: 1, ICMPType: typ, ICMPCode: code, SrcPort: id, DstPort: id}
	p.SetAddrs(src, dst)
	if p.IPv6 {
		p.Proto = 58
	}
	p.Length = 84
	return p
}

// drain returns the pending events by type.
func drain(t *testing.T, tr *Tracker) (starts, ends, drops []flow.Event) {
	t.Helper()
	for _, e := range tr.DrainEvents(nil) {
		switch e.Type {
		case flow.TypeStart:
			starts = append(starts, e)
		case flow.TypeEnd:
			ends = append(ends, e)
		case flow.TypeDrop:
			drops = append(drops, e)
		default:
			t.Fatalf("unexpected event type %v", e.Type)
		}
	}
	return starts, ends, drops
}
