package conntrack

import (
	"context"
	"errors"
	"maps"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/netns"
	"github.com/flowpipe/flowpipe/sources/conntrack/internal/flood"
)

func withOpts(base, extra map[string]any) map[string]any {
	out := maps.Clone(base)
	maps.Copy(out, extra)
	return out
}

// exactlyOnce checks that each of the n flows (told apart by source port) has exactly one
// start and one end with the same flow ID, and the end the flood's counters.
func exactlyOnce(t *testing.T, evs []flow.Event, match func(*flow.Event) bool, n int) {
	t.Helper()
	starts, ends := byFlow(evs, match)
	startOf := map[uint16]uuid.UUID{}
	for _, s := range starts {
		if _, dup := startOf[s.SrcPort]; dup {
			t.Errorf("two starts for source port %d", s.SrcPort)
		}
		startOf[s.SrcPort] = s.FlowID
	}
	endOf := map[uint16]bool{}
	for _, e := range ends {
		if endOf[e.SrcPort] {
			t.Errorf("two ends for source port %d", e.SrcPort)
		}
		endOf[e.SrcPort] = true
		if id, ok := startOf[e.SrcPort]; !ok || id != e.FlowID {
			t.Errorf("end of port %d has flow ID %v, its start %v", e.SrcPort, e.FlowID, id)
		}
		if e.TxPackets != 1 || e.TxBytes != 16+28 {
			t.Errorf("end of port %d: tx %d packets %d bytes, want 1 and 44", e.SrcPort, e.TxPackets, e.TxBytes)
		}
	}
	if len(startOf) != n || len(endOf) != n {
		t.Fatalf("recorded %d of %d starts and %d of %d ends", len(startOf), n, len(endOf), n)
	}
}

// TestReconfigureDuringBurst changes the running source's options a dozen times while
// thousands of short UDP flows open and end (protocols, batch shape, socket buffer, prefixes,
// direction): the netlink subscription and the open connections are kept, so every flow
// has exactly one start and one end, with the same flow ID.
func TestReconfigureDuringBurst(t *testing.T) {
	p := newPair(t)
	base := map[string]any{"netns": p.A, "activate": true}
	r := startSource(t, withOpts(base, map[string]any{"protocols": []any{"udp"}}))
	srv, stop := udpSink(t, p.B, p.B4+":0")
	defer stop()
	variants := []map[string]any{
		{"protocols": []any{"udp", "tcp"}, "batch_size": 64, "flush_interval": "20ms"},
		{"protocols": []any{"udp"}, "read_buffer": "8MiB", "max_pending": 100000},
		{"protocols": []any{"udp", "icmp"}, "exclude_prefixes": []any{"192.0.2.0/24"}, "batch_size": 4096},
		{"protocols": []any{"17", "tcp"}, "local_prefixes": []any{p.A4 + "/32"}, "flush_interval": "5ms", "resync_grace": "20s"},
	}
	ns, err := netns.Open(p.A)
	must(t, err)
	defer ns.Close()
	const rounds, per, first = 12, 400, 20000
	var took []time.Duration // how long each Reconfigure took, for the log (not asserted)
	for i := 0; i < rounds; i++ {
		flooded := make(chan error, 1)
		go func() {
			flooded <- ns.Do(func() error {
				return flood.UDP(netip.Addr{}, srv.AddrPort(), first+i*per, per, 16)
			})
		}()
		began := time.Now()
		if err := r.src.Reconfigure(context.Background(), withOpts(base, variants[i%len(variants)])); err != nil {
			t.Fatalf("reconfigure %d: %v", i, err)
		}
		took = append(took, time.Since(began))
		must(t, <-flooded)
	}
	const n = rounds * per
	inFlood := func(e *flow.Event) bool {
		return e.Protocol == flow.ProtoUDP && e.DstPort == srv.AddrPort().Port() && e.SrcPort >= first && e.SrcPort < first+n
	}
	count := func() (int, int) {
		s, e := byFlow(r.out.Events(), inFlood)
		return len(s), len(e)
	}
	waitFor(t, "every start", func() bool { s, _ := count(); return s >= n }, nil)
	waitFor(t, "every end", func() bool { _, e := count(); return e >= n }, dumpNS(p, p.A))
	r.stop()
	exactlyOnce(t, r.out.Events(), inFlood, n)
	st := &r.src.stats
	slices.Sort(took)
	t.Logf("%d reconfigures, each took %v to %v (median %v); kernel events: %d NEW, %d DESTROY; overruns %d, resyncs %d, reconstructed %d starts %d ends",
		rounds, took[0], took[len(took)-1], took[len(took)/2], st.newEvents.Load(), st.destroyEvents.Load(), st.overruns.Load(), st.resyncs.Load(),
		st.reconstructedStarts.Load(), st.reconstructedEnds.Load())
	if d := st.queueFull.Load(); d != 0 {
		t.Errorf("%d events dropped by the source's queue", d)
	}
	if c := r.src.config(); c.FlushInterval != 5*time.Millisecond || c.BatchSize != 2048 { // the last variant
		t.Errorf("in force: flush_interval %v, batch_size %d; want 5ms and the default 2048", c.FlushInterval, c.BatchSize)
	}
}

// TestReconfigureFilters: a connection already reported whose protocol the new options
// exclude is still followed and gets its real end; a connection of a newly included protocol
// that was open already is picked up by a table dump (a start marked reconstructed) and gets
// its end; new connections of the excluded protocol are filtered.
func TestReconfigureFilters(t *testing.T) {
	p := newPair(t)
	// Long enough that the UDP entries live until the test deletes them.
	sysctlNS(t, p, p.A, "net.netfilter.nf_conntrack_udp_timeout=120")
	sysctlNS(t, p, p.A, "net.netfilter.nf_conntrack_udp_timeout_stream=120")
	base := map[string]any{"netns": p.A, "activate": true, "flush_interval": "10ms"}
	r := startSource(t, withOpts(base, map[string]any{"protocols": []any{"udp"}}))
	echo, stopEcho := udpEcho(t, p, p.B, p.B4+":0")
	defer stopEcho()
	var ln net.Listener
	inNS(t, p.B, func() (err error) {
		ln, err = net.Listen("tcp", p.B4+":0")
		return err
	})
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()

	udpX := udpExchange(t, p.A, echo, 1, 10) // reported: udp is included
	var tcpConn net.Conn
	inNS(t, p.A, func() (err error) {
		tcpConn, err = net.Dial("tcp", ln.Addr().String())
		return err
	})
	defer tcpConn.Close()
	tcpPort := uint16(tcpConn.LocalAddr().(*net.TCPAddr).Port)
	isX := func(e *flow.Event) bool { return e.Protocol == flow.ProtoUDP && e.SrcPort == udpX.Port() }
	isT := func(e *flow.Event) bool { return e.Protocol == flow.ProtoTCP && e.SrcPort == tcpPort }
	waitFor(t, "the UDP flow's start", func() bool { s, _ := byFlow(r.out.Events(), isX); return len(s) == 1 }, nil)

	if err := r.src.Reconfigure(context.Background(), withOpts(base, map[string]any{"protocols": []any{"tcp"}})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the TCP connection picked up", func() bool { s, _ := byFlow(r.out.Events(), isT); return len(s) == 1 }, nil)
	udpY := udpExchange(t, p.A, echo, 1, 10) // udp is excluded now
	isY := func(e *flow.Event) bool { return e.Protocol == flow.ProtoUDP && e.SrcPort == udpY.Port() }

	// The kernel destroys all three entries.
	for _, proto := range []string{"udp", "tcp"} {
		_ = p.Command(p.A, "conntrack", "-D", "-p", proto).Run()
	}
	waitFor(t, "the ends", func() bool {
		_, ex := byFlow(r.out.Events(), isX)
		_, et := byFlow(r.out.Events(), isT)
		return len(ex) == 1 && len(et) == 1
	}, nil)
	r.stop()
	evs := r.out.Events()
	for _, c := range []struct {
		what               string
		match              func(*flow.Event) bool
		reconstructedStart bool
	}{{"udp flow open before udp was excluded", isX, false}, {"tcp connection open before tcp was included", isT, true}} {
		s, e := byFlow(evs, c.match)
		if len(s) != 1 || len(e) != 1 {
			t.Fatalf("%s: %d starts, %d ends, want 1 and 1", c.what, len(s), len(e))
		}
		if s[0].FlowID != e[0].FlowID {
			t.Errorf("%s: start flow ID %v, end %v", c.what, s[0].FlowID, e[0].FlowID)
		}
		if s[0].Reconstructed != c.reconstructedStart || e[0].Reconstructed {
			t.Errorf("%s: start reconstructed %v (want %v), end reconstructed %v (want false: the kernel's DESTROY)",
				c.what, s[0].Reconstructed, c.reconstructedStart, e[0].Reconstructed)
		}
	}
	if e := byFlowAll(evs, isX); e[1].RxPackets != 1 || e[1].TxPackets != 1 {
		t.Errorf("end of the excluded udp flow: %d/%d packets, want its real counters 1/1", e[1].TxPackets, e[1].RxPackets)
	}
	if s, e := byFlow(evs, isY); len(s)+len(e) != 0 {
		t.Errorf("a udp flow opened after udp was excluded: %d starts %d ends", len(s), len(e))
	}
	if r.met.FilteredCount("protocol") == 0 {
		t.Errorf("the excluded udp flow was not counted as filtered: %v", r.met)
	}
}

func byFlowAll(evs []flow.Event, match func(*flow.Event) bool) []flow.Event {
	s, e := byFlow(evs, match)
	return append(s, e...)
}

// TestReconfigureRefuses: bad options come back positioned at their keys and change
// nothing; a change of namespace or of what the source changes on the host asks for a new
// instance.
func TestReconfigureRefuses(t *testing.T) {
	src, err := New(component.Env{Name: "ct"}, func() *Config {
		c := defaultConfig()
		c.Protocols = []string{"udp"}
		must(t, c.Validate())
		return c
	}())
	must(t, err)
	s := src.(*Source)
	err = s.Reconfigure(context.Background(), map[string]any{"protocols": []any{"udb"}, "batch_sise": 3})
	fe, ok := options.FieldErrorsOf(err)
	if !ok || len(fe) != 2 || errors.Is(err, component.ErrRestartNeeded) {
		t.Fatalf("got %v, want two option problems", err)
	}
	paths := map[string]bool{fe[0].Path: true, fe[1].Path: true}
	if !paths["protocols[0]"] || !paths["batch_sise"] {
		t.Errorf("problems at %v, want protocols[0] and batch_sise", fe)
	}
	for _, opts := range []map[string]any{{"netns": "/proc/1/ns/net"}, {"activate": true}, {"counters": false}, {"timestamps": false}} {
		if err := s.Reconfigure(context.Background(), opts); !errors.Is(err, component.ErrRestartNeeded) {
			t.Errorf("%v: got %v, want ErrRestartNeeded", opts, err)
		}
	}
	if got := s.config().Protocols; len(got) != 1 || got[0] != "udp" {
		t.Errorf("refused options changed protocols to %v", got)
	}
	// Accepted before the source starts: it starts with them.
	must(t, s.Reconfigure(context.Background(), map[string]any{"protocols": []any{"tcp"}, "batch_size": 7}))
	if c := s.config(); c.BatchSize != 7 || !c.protoSet[flow.ProtoTCP] || c.protoSet[flow.ProtoUDP] {
		t.Errorf("options in force: %+v", c)
	}
}
