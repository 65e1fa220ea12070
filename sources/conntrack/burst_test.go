package conntrack

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/sources/conntrack/internal/flood"
)

// TestBurstNoLoss opens 5,000 short UDP flows as fast as one thread can, lets them expire and
// makes the kernel reap them all at once with a table dump: every flow must have exactly one
// start and one end, with the same flow ID.
func TestBurstNoLoss(t *testing.T) {
	burst(t, map[string]any{})
}

// TestBurstTinyBuffer runs the same burst through a socket buffer far too small for it, so
// that the kernel overruns it: reliable DESTROY delivery and the resync by table dump must
// still give every flow its start and its end.
func TestBurstTinyBuffer(t *testing.T) {
	burst(t, map[string]any{"read_buffer": "64KiB"})
}

func burst(t *testing.T, opts map[string]any) {
	p := newPair(t)
	opts["netns"], opts["activate"] = p.A, true
	r := startSource(t, opts)
	srv, stop := udpSink(t, p.B, p.B4+":0")
	defer stop()

	const n, first = 5000, 20000
	begin := time.Now()
	inNS(t, p.A, func() error {
		return flood.UDP(netip.Addr{}, srv.AddrPort(), first, n, 16)
	})
	t.Logf("opened %d flows in %v", n, time.Since(begin))
	inFlood := func(e *flow.Event) bool {
		return e.Protocol == flow.ProtoUDP && e.DstPort == srv.AddrPort().Port() && e.SrcPort >= first && e.SrcPort < first+n
	}
	count := func() (int, int) {
		s, e := byFlow(r.out.Events(), inFlood)
		return len(s), len(e)
	}
	waitFor(t, "5,000 starts", func() bool { s, _ := count(); return s >= n }, nil)
	time.Sleep(1500 * time.Millisecond) // past nf_conntrack_udp_timeout=1 set by newPair
	// One dump: the kernel destroys every expired entry in it, the worst burst of DESTROYs.
	dumpNS(p, p.A)()
	waitFor(t, "5,000 ends", func() bool { _, e := count(); return e >= n }, dumpNS(p, p.A))
	r.stop()

	exactlyOnce(t, r.out.Events(), inFlood, n)
	st := &r.src.stats
	t.Logf("kernel events: %d NEW, %d DESTROY; overruns %d, resyncs %d, reconstructed %d starts %d ends; batches %d",
		st.newEvents.Load(), st.destroyEvents.Load(), st.overruns.Load(), st.resyncs.Load(),
		st.reconstructedStarts.Load(), st.reconstructedEnds.Load(), r.out.Batches())
	var marked uint64
	for _, e := range r.out.Events() {
		if e.Reconstructed {
			marked++
		}
	}
	if want := st.reconstructedStarts.Load() + st.reconstructedEnds.Load(); marked != want {
		t.Errorf("%d events marked reconstructed, the source counted %d", marked, want)
	}
	if d := st.queueFull.Load(); d != 0 {
		t.Errorf("%d events dropped by the source's queue", d)
	}
}

// udpSink listens for UDP in a namespace and discards what it reads, so the flood gets no
// ICMP port-unreachable answers.
func udpSink(t *testing.T, ns, listen string) (*net.UDPAddr, func()) {
	t.Helper()
	var pc net.PacketConn
	inNS(t, ns, func() (err error) {
		pc, err = net.ListenPacket("udp", listen)
		return err
	})
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr), func() { pc.Close() }
}
