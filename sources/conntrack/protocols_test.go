package conntrack

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

func TestICMPEcho(t *testing.T) {
	p := newPair(t)
	for _, tc := range []struct {
		name, flag, dst string
		proto, typ      uint8
		size            uint64 // IP + ICMP header + 56 bytes of data
	}{
		{"ipv4", "-4", p.B4, flow.ProtoICMP, 8, 20 + 8 + 56},
		{"ipv6", "-6", p.B6, flow.ProtoICMPv6, 128, 40 + 8 + 56},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := startSource(t, map[string]any{"netns": p.A, "activate": true, "flush_interval": "10ms"})
			p.Exec(t, p.A, "ping", tc.flag, "-c", "3", "-i", "0.2", "-s", "56", tc.dst)
			dst := netip.MustParseAddr(tc.dst)
			match := func(e *flow.Event) bool { return e.Protocol == tc.proto && e.DstAddr == dst && e.ICMPType == tc.typ }
			waitFor(t, "the echo flow's end", func() bool { _, e := byFlow(r.out.Events(), match); return len(e) > 0 }, dumpNS(p, p.A))
			r.stop()
			starts, ends := byFlow(r.out.Events(), match)
			if len(starts) != 1 || len(ends) != 1 {
				t.Fatalf("got %d starts, %d ends, want 1 and 1", len(starts), len(ends))
			}
			e := ends[0]
			if e.FlowID != starts[0].FlowID || e.ICMPCode != 0 || e.SrcPort != 0 || e.DstPort != 0 {
				t.Errorf("end %+v", e)
			}
			if e.TxPackets != 3 || e.TxBytes != 3*tc.size || e.RxPackets != 3 || e.RxBytes != 3*tc.size {
				t.Errorf("counters tx %d/%d rx %d/%d, want 3 packets of %d bytes each way",
					e.TxPackets, e.TxBytes, e.RxPackets, e.RxBytes, tc.size)
			}
		})
	}
}

// TestTCPCounters sends a known number of bytes over TCP and compares the end event's
// counters with nftables counters on the same packets: conntrack counts IP packets as the
// hooks see them (segmentation offload makes several wire segments one packet), so the
// kernel's own independent count is the exact expectation.
func TestTCPCounters(t *testing.T) {
	p := newPair(t)
	for _, tc := range []struct{ name, addr string }{{"ipv4", p.B4}, {"ipv6", p.B6}} {
		t.Run(tc.name, func(t *testing.T) {
			r := startSource(t, map[string]any{"netns": p.A, "activate": true, "flush_interval": "10ms"})
			var ln net.Listener
			inNS(t, p.B, func() (err error) {
				ln, err = net.Listen("tcp", net.JoinHostPort(tc.addr, "0"))
				return err
			})
			defer ln.Close()
			port := ln.Addr().(*net.TCPAddr).Port
			oracle := fmt.Sprintf("oracle%d", port)
			// Count the flow's packets independently of conntrack, in the same namespace.
			p.Exec(t, p.A, "nft", fmt.Sprintf(`add table inet %[1]s
add chain inet %[1]s out { type filter hook output priority 0; }
add chain inet %[1]s in { type filter hook input priority 0; }
add rule inet %[1]s out tcp dport %[2]d counter
add rule inet %[1]s in tcp sport %[2]d counter`, oracle, port))
			const sent, answer = 100000, 5000
			got := make(chan int, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					got <- -1
					return
				}
				n, _ := io.Copy(io.Discard, c)
				_, _ = c.Write(make([]byte, answer))
				c.Close()
				got <- int(n)
			}()
			var c net.Conn
			inNS(t, p.A, func() (err error) {
				c, err = net.Dial("tcp", ln.Addr().String())
				return err
			})
			_, err := c.Write(make([]byte, sent))
			must(t, err)
			must(t, c.(*net.TCPConn).CloseWrite())
			n, err := io.Copy(io.Discard, c)
			must(t, err)
			c.Close()
			if s := <-got; s != sent || n != answer {
				t.Fatalf("server read %d, client read %d", s, n)
			}
			client := c.LocalAddr().(*net.TCPAddr)
			match := func(e *flow.Event) bool {
				return e.Protocol == flow.ProtoTCP && e.SrcPort == uint16(client.Port) && e.DstPort == uint16(port)
			}
			waitFor(t, "the TCP flow's end", func() bool { _, e := byFlow(r.out.Events(), match); return len(e) > 0 }, dumpNS(p, p.A))
			r.stop()
			starts, ends := byFlow(r.out.Events(), match)
			if len(starts) != 1 || len(ends) != 1 || starts[0].FlowID != ends[0].FlowID {
				t.Fatalf("got %d starts, %d ends, want 1 and 1 with one flow ID", len(starts), len(ends))
			}
			e := ends[0]
			outPk, outBy, inPk, inBy := nftCounters(t, p, oracle)
			if e.TxPackets != outPk || e.TxBytes != outBy || e.RxPackets != inPk || e.RxBytes != inBy {
				t.Errorf("conntrack tx %d/%d rx %d/%d, nftables saw out %d/%d in %d/%d",
					e.TxPackets, e.TxBytes, e.RxPackets, e.RxBytes, outPk, outBy, inPk, inBy)
			}
			hdr := uint64(40) // at least IP + TCP headers per packet
			if tc.name == "ipv6" {
				hdr = 60
			}
			if e.TxBytes < sent+hdr*e.TxPackets || e.RxBytes < answer+hdr*e.RxPackets {
				t.Errorf("counters tx %d/%d rx %d/%d cannot carry %d and %d payload bytes",
					e.TxPackets, e.TxBytes, e.RxPackets, e.RxBytes, sent, answer)
			}
			if e.Direction != flow.Egress {
				t.Errorf("direction %s, want egress", e.Direction)
			}
		})
	}
}

var counterRE = regexp.MustCompile(`counter packets (\d+) bytes (\d+)`)

// nftCounters reads the out and in counters of the oracle table.
func nftCounters(t *testing.T, p *testenv.Pair, table string) (outPk, outBy, inPk, inBy uint64) {
	t.Helper()
	var v [2][2]uint64
	for i, ch := range []string{"out", "in"} {
		out := p.Exec(t, p.A, "nft", "list", "chain", "inet", table, ch)
		m := counterRE.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no counter in %s", out)
		}
		v[i][0], _ = strconv.ParseUint(m[1], 10, 64)
		v[i][1], _ = strconv.ParseUint(m[2], 10, 64)
	}
	return v[0][0], v[0][1], v[1][0], v[1][1]
}
