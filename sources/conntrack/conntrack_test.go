package conntrack

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

func newPair(t *testing.T) *testenv.Pair {
	t.Helper()
	testenv.RequireRoot(t)
	p := testenv.NewPair(t)
	for _, ns := range []string{p.A, p.B} {
		// Short timeouts so that entries end within the test.
		for _, kv := range []string{"net.netfilter.nf_conntrack_udp_timeout=1", "net.netfilter.nf_conntrack_udp_timeout_stream=1",
			"net.netfilter.nf_conntrack_icmp_timeout=1", "net.netfilter.nf_conntrack_icmpv6_timeout=1",
			"net.netfilter.nf_conntrack_tcp_timeout_time_wait=1", "net.netfilter.nf_conntrack_tcp_timeout_close=1"} {
			sysctlNS(t, p, ns, kv)
		}
	}
	return p
}

// udpExchange sends n datagrams of size bytes from namespace ns to dst and reads the echo
// server's n answers (half the size); it returns the client's address.
func udpExchange(t *testing.T, ns string, dst *net.UDPAddr, n, size int) netip.AddrPort {
	t.Helper()
	var c *net.UDPConn
	inNS(t, ns, func() (err error) {
		c, err = net.DialUDP("udp", nil, dst)
		return err
	})
	defer c.Close()
	buf := make([]byte, size)
	for i := 0; i < n; i++ {
		_, err := c.Write(buf)
		must(t, err)
		if _, err := c.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestUDPStartEndCounters(t *testing.T) {
	p := newPair(t)
	for _, tc := range []struct {
		name   string
		listen string
		hdr    uint64 // IP + UDP header bytes
	}{
		{"ipv4", p.B4 + ":0", 20 + 8},
		{"ipv6", "[" + p.B6 + "]:0", 40 + 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := startSource(t, map[string]any{"netns": p.A, "activate": true, "flush_interval": "10ms"})
			srv, stop := udpEcho(t, p, p.B, tc.listen)
			defer stop()
			const n, size = 3, 100
			client := udpExchange(t, p.A, srv, n, size)
			match := func(e *flow.Event) bool {
				return e.Protocol == flow.ProtoUDP && e.SrcPort == client.Port() && e.DstPort == uint16(srv.Port)
			}
			waitFor(t, "the UDP flow's end", func() bool {
				_, ends := byFlow(r.out.Events(), match)
				return len(ends) > 0
			}, dumpNS(p, p.A))
			r.stop()
			starts, ends := byFlow(r.out.Events(), match)
			if len(starts) != 1 || len(ends) != 1 {
				t.Fatalf("got %d starts and %d ends, want 1 and 1: %+v %+v", len(starts), len(ends), starts, ends)
			}
			s, e := starts[0], ends[0]
			if s.FlowID != e.FlowID || s.FlowID == ([16]byte{}) {
				t.Errorf("start and end flow IDs %v and %v, want equal and set", s.FlowID, e.FlowID)
			}
			if s.Reconstructed || e.Reconstructed {
				t.Errorf("events from the kernel's own NEW and DESTROY marked reconstructed")
			}
			if s.EventID == e.EventID {
				t.Errorf("start and end share event ID %v", s.EventID)
			}
			wantSrc, wantDst := client.Addr(), netip.MustParseAddr(srv.IP.String())
			for _, ev := range []flow.Event{s, e} {
				if ev.SrcAddr != wantSrc || ev.DstAddr != wantDst {
					t.Errorf("%s: %s -> %s, want %s -> %s", ev.Type, ev.SrcAddr, ev.DstAddr, wantSrc, wantDst)
				}
				if ev.Direction != flow.Egress {
					t.Errorf("%s: direction %s, want egress (the client is local to the namespace read)", ev.Type, ev.Direction)
				}
				if ev.Source != "ct-"+t.Name() {
					t.Errorf("%s: source %q", ev.Type, ev.Source)
				}
			}
			if e.TxPackets != n || e.TxBytes != n*(size+tc.hdr) {
				t.Errorf("tx %d packets %d bytes, want %d and %d", e.TxPackets, e.TxBytes, n, n*(size+tc.hdr))
			}
			if e.RxPackets != n || e.RxBytes != n*(size/2+tc.hdr) {
				t.Errorf("rx %d packets %d bytes, want %d and %d", e.RxPackets, e.RxBytes, n, n*(size/2+tc.hdr))
			}
			if s.RxBytes != 0 || s.TxBytes != 0 {
				t.Errorf("start carries counters: %+v", s)
			}
			if e.Start == 0 || e.End == 0 || e.End < e.Start {
				t.Errorf("end: kernel start %v stop %v, want both set and ordered", e.Start.Time(), e.End.Time())
			}
			if st := r.src.stats.reconstructedStarts.Load() + r.src.stats.reconstructedEnds.Load(); st != 0 {
				t.Errorf("%d reconstructed events in a quiet namespace", st)
			}
		})
	}
}

func TestPollPause(t *testing.T) {
	for _, c := range []struct {
		rcvbuf int
		want   time.Duration
	}{{128 << 10, time.Millisecond}, {8 << 20, time.Millisecond}, {16 << 20, 2 * time.Millisecond},
		{32 << 20, 4 * time.Millisecond}, {64 << 20, 5 * time.Millisecond}, {4 << 30, 5 * time.Millisecond}} {
		if got := pollPause(c.rcvbuf); got != c.want {
			t.Errorf("pollPause(%d) = %v, want %v", c.rcvbuf, got, c.want)
		}
	}
}
