package tracker

import (
	"encoding/binary"
	"testing"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/flow"
)

// FuzzDecodeIP feeds arbitrary bytes to the decoder: it must not panic, must not read past
// the input, and what it accepts must be consistent and trackable.
func FuzzDecodeIP(f *testing.F) {
	f.Add(buildTCP4(f))
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 17, 64})
	f.Fuzz(func(t *testing.T, b []byte) {
		var p Packet
		err := DecodeIP(b, &p)
		if err != nil {
			if ReasonOf(err) == "other" {
				t.Fatalf("unlabelled error %v", err)
			}
			return
		}
		switch p.Proto {
		case 6, 17, 1, 58:
		default:
			t.Fatalf("accepted protocol %d", p.Proto)
		}
		min := uint32(20)
		if p.IPv6 {
			min = 40
		}
		if p.Length < min {
			t.Fatalf("length %d below the IP header", p.Length)
		}
		if p.Proto == 6 && p.PayloadLen > p.Length {
			t.Fatalf("TCP payload %d longer than the packet %d", p.PayloadLen, p.Length)
		}
		tr := New(Config{MaxEntries: 4})
		tr.ProcessAt(&p, sec)
		tr.PeekAt(&p, sec)
		tr.ReportDropAt(&p, "r", sec)
	})
}

// FuzzTracker drives the tracker with a script of packets between a few endpoints (each 8
// bytes of input is one packet: protocol, direction, ports, flags, sequence numbers, time
// step) and checks its invariants: every connection gets exactly one start and at most one
// end, the table never exceeds MaxEntries, and after a flush every start has its end.
func FuzzTracker(f *testing.F) {
	f.Add([]byte{0, 0, 0, syn, 0, 0, 0, 1, 0, 1, 0, synack, 0, 0, 0, 1, 0, 0, 0, ack, 0, 0, 0, 1})
	f.Add([]byte{1, 0, 1, 0, 0, 0, 0, 200, 1, 1, 1, 0, 0, 0, 0, 200, 2, 0, 2, 8, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, script []byte) {
		fuzzTracker(t, script, 1)
		fuzzTracker(t, script, 4)
	})
}

func fuzzTracker(t *testing.T, script []byte, shards int) {
	{
		maxEntries := 5 * shards
		tr := New(Config{MaxEntries: maxEntries, LocalPrefixes: localA, Shards: shards})
		now := sec
		starts := map[uuid.UUID]int{}
		ends := map[uuid.UUID]int{}
		collect := func() {
			for _, e := range tr.DrainEvents(nil) {
				switch e.Type {
				case flow.TypeStart:
					starts[e.FlowID]++
				case flow.TypeEnd:
					ends[e.FlowID]++
					if starts[e.FlowID] != 1 {
						t.Fatalf("end of flow %v without its start", e.FlowID)
					}
					if e.End < e.Start || e.Timestamp < e.End {
						t.Fatalf("end event times start %d end %d at %d", e.Start, e.End, e.Timestamp)
					}
				}
			}
		}
		for len(script) >= 8 {
			op := script[:8]
			script = script[8:]
			a, b := addrA, addrB
			if op[0]&0x80 != 0 {
				a, b = addrA6, addrB6
			}
			sp, dp := 1000+uint16(op[2]%3), uint16(80)
			if op[1]&1 != 0 {
				a, b, sp, dp = b, a, dp, sp
			}
			var p *Packet
			switch op[0] % 4 {
			case 0:
				p = tcpPkt(a, b, sp, dp, op[3]&0x3f, uint32(op[4])<<8, uint32(op[5])<<8, uint32(op[6]))
			case 1:
				p = udpPkt(a, b, sp, dp, uint32(op[6]))
			case 2:
				typ := uint8(8)
				if op[1]&1 != 0 {
					typ = 0
				}
				if a.Is6() {
					typ += 120
					if typ == 120 {
						typ = 129
					}
				}
				p = icmpPkt(a, b, typ, 0, uint16(op[2]%3))
			default: // an ICMP error quoting a UDP or TCP packet of the other direction
				p = icmpPkt(b, a, 3, 3, 0)
				if a.Is6() {
					p.ICMPType = 1
				}
				p.Quoted = Quoted{Valid: true, Src: a.As16(), Dst: b.As16(), Proto: 6 + 11*(op[3]&1), SrcPort: sp, DstPort: dp}
			}
			now += flow.Time(op[7]) * sec / 4
			tr.ProcessAt(p, now)
			if n := tr.Len(); n > maxEntries {
				t.Fatalf("%d entries, max %d", n, maxEntries)
			}
			collect()
		}
		tr.Flush(now+1, -1)
		collect()
		for id, n := range starts {
			if n != 1 || ends[id] != 1 {
				t.Fatalf("flow %v: %d starts, %d ends", id, n, ends[id])
			}
		}
		s := tr.Stats()
		if s.Started != s.Ended || s.Entries != 0 {
			t.Fatalf("stats after flush %+v", s)
		}
	}
}

// TestDecodeIP checks the decoder on well-formed packets of every kind it reads.
func TestDecodeIP(t *testing.T) {
	var p Packet
	if err := DecodeIP(buildTCP4(t), &p); err != nil || p.Proto != 6 || p.SrcPort != 40000 || p.DstPort != 443 ||
		p.TCPFlags != ack || p.Length != 40 || p.SrcAddr() != addrA || p.DstAddr() != addrB {
		t.Fatalf("ipv4 tcp: %v %+v", err, p)
	}
	// Ethernet padding after the IP packet is ignored.
	padded := append(buildTCP4(t), make([]byte, 6)...)
	if err := DecodeIP(padded, &p); err != nil || p.Length != 40 || p.PayloadLen != 0 {
		t.Fatalf("padded: %v %+v", err, p)
	}
	// Fragments: the first decodes like a whole packet, a later one without ports.
	first := buildTCP4(t)
	first[4], first[5], first[6] = 0x12, 0x34, 0x20 // ID 0x1234, more fragments
	if err := DecodeIP(first, &p); err != nil || p.Fragment != FirstFragment || p.FragID != 0x1234 || !p.MoreFragments || p.DstPort != 443 {
		t.Fatalf("first fragment: %v %+v", err, p)
	}
	later := buildTCP4(t)
	later[4], later[5], later[7] = 0x12, 0x34, 10 // offset 80 bytes, last
	if err := DecodeIP(later, &p); err != nil || p.Fragment != LaterFragment || p.MoreFragments || p.DstPort != 0 || p.HdrLen != 20 {
		t.Fatalf("later fragment: %v %+v", err, p)
	}
	// A snap length that cuts into the payload still gives the header's lengths.
	raw := buildTCP4(t)
	binary.BigEndian.PutUint16(raw[2:], 1500)
	if err := DecodeIP(raw, &p); err != nil || p.Length != 1500 || p.PayloadLen != 1460 {
		t.Fatalf("snapped: %v %+v", err, p)
	}
	for _, c := range []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrTruncated},
		{"version 5", []byte{0x50}, ErrMalformed},
		{"short ipv4", buildTCP4(t)[:19], ErrTruncated},
		{"short tcp", buildTCP4(t)[:30], ErrTruncated},
		{"later fragment of GRE", func() []byte { b := buildTCP4(t); b[9] = 47; b[7] = 1; return b }(), ErrUnsupported},
		{"gre", func() []byte { b := buildTCP4(t); b[9] = 47; return b }(), ErrUnsupported},
		{"bad ihl", func() []byte { b := buildTCP4(t); b[0] = 0x44; return b }(), ErrMalformed},
	} {
		if err := DecodeIP(c.b, &p); err != c.want {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}
