package conntrack

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// TestDirection reads the server's namespace (the flow comes in), and the client's with
// local_prefixes and with marks that override the addresses.
func TestDirection(t *testing.T) {
	p := newPair(t)
	// A connection mark on every new connection from A, to test mark-based direction.
	p.Exec(t, p.A, "nft", `add table inet marker
add chain inet marker out { type filter hook output priority 0; }
add rule inet marker out ct state new ct mark set 0x42`)
	for _, tc := range []struct {
		name string
		ns   string
		opts map[string]any
		want flow.Direction
	}{
		{"server side is ingress", p.B, nil, flow.Ingress},
		{"client side is egress", p.A, nil, flow.Egress},
		{"local_prefixes decide", p.A, map[string]any{"local_prefixes": []any{p.B4 + "/32", p.B6 + "/128"}}, flow.Ingress},
		{"ingress_mark overrides addresses", p.A, map[string]any{"ingress_mark": 0x42}, flow.Ingress},
		{"egress_mark with mask", p.A, map[string]any{"egress_mark": 0x2, "direction_mark_mask": 0xf}, flow.Egress},
		{"unmatched mark falls back to addresses", p.A, map[string]any{"ingress_mark": 0x7}, flow.Egress},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := map[string]any{"netns": tc.ns, "activate": true, "flush_interval": "10ms"}
			for k, v := range tc.opts {
				opts[k] = v
			}
			r := startSource(t, opts)
			srv, stop := udpEcho(t, p, p.B, p.B4+":0")
			defer stop()
			client := udpExchange(t, p.A, srv, 2, 100)
			match := func(e *flow.Event) bool { return e.Protocol == flow.ProtoUDP && e.SrcPort == client.Port() }
			waitFor(t, "the flow's end", func() bool { _, e := byFlow(r.out.Events(), match); return len(e) > 0 }, dumpNS(p, tc.ns))
			r.stop()
			starts, ends := byFlow(r.out.Events(), match)
			if len(starts) != 1 || len(ends) != 1 {
				t.Fatalf("%d starts %d ends", len(starts), len(ends))
			}
			e := ends[0]
			if starts[0].Direction != tc.want || e.Direction != tc.want {
				t.Fatalf("direction %s/%s, want %s", starts[0].Direction, e.Direction, tc.want)
			}
			// The client sent 2×128 bytes and got 2×78 back; rx and tx follow the direction.
			sent, back := uint64(2*(100+28)), uint64(2*(50+28))
			wantTx, wantRx := sent, back
			if tc.want == flow.Ingress {
				wantTx, wantRx = back, sent
			}
			if e.TxBytes != wantTx || e.RxBytes != wantRx || e.TxPackets != 2 || e.RxPackets != 2 {
				t.Errorf("tx %d bytes rx %d bytes, want %d and %d", e.TxBytes, e.RxBytes, wantTx, wantRx)
			}
		})
	}
}

func TestFilters(t *testing.T) {
	p := newPair(t)
	p.Exec(t, p.A, "nft", `add table inet marker
add chain inet marker out { type filter hook output priority 0; }
add rule inet marker out ct state new udp dport != 0 ct mark set 0x105`)
	for _, tc := range []struct {
		name         string
		opts         map[string]any
		udp, icmp    bool
		reason       string
		filteredKind string
	}{
		{"protocols", map[string]any{"protocols": []any{"icmp"}}, false, true, "protocol", ""},
		{"protocols by number", map[string]any{"protocols": []any{"17"}}, true, false, "protocol", ""},
		{"exclude_prefixes", map[string]any{"exclude_prefixes": []any{p.B4 + "/32"}}, false, false, "exclude_prefixes", ""},
		{"include_prefixes", map[string]any{"include_prefixes": []any{"192.0.2.0/24"}}, false, false, "include_prefixes", ""},
		{"include_prefixes match", map[string]any{"include_prefixes": []any{p.B4 + "/32"}}, true, true, "", ""},
		{"mark", map[string]any{"mark": 0x105}, true, false, "mark", ""},
		{"mark with mask", map[string]any{"mark": 0x100, "mark_mask": 0xf00}, true, false, "mark", ""},
		{"zone", map[string]any{"zone": 7}, false, false, "zone", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := map[string]any{"netns": p.A, "activate": true, "flush_interval": "10ms"}
			for k, v := range tc.opts {
				opts[k] = v
			}
			r := startSource(t, opts)
			srv, stop := udpEcho(t, p, p.B, p.B4+":0")
			defer stop()
			client := udpExchange(t, p.A, srv, 1, 10)
			p.Exec(t, p.A, "ping", "-c", "1", p.B4)
			// A sentinel that every filter lets through would need its own rules; instead wait
			// until the kernel has destroyed both entries (the table is empty again) and the
			// reader has seen both DESTROYs.
			waitFor(t, "both entries destroyed", func() bool {
				out, _ := p.Command(p.A, "conntrack", "-L").CombinedOutput()
				return !strings.Contains(string(out), p.B4) && r.src.stats.destroyEvents.Load() >= 2
			}, nil)
			r.stop()
			isUDP := func(e *flow.Event) bool { return e.Protocol == flow.ProtoUDP && e.SrcPort == client.Port() }
			isICMP := func(e *flow.Event) bool { return e.Protocol == flow.ProtoICMP }
			evs := r.out.Events()
			for _, c := range []struct {
				what  string
				match func(*flow.Event) bool
				want  bool
			}{{"udp", isUDP, tc.udp}, {"icmp", isICMP, tc.icmp}} {
				s, e := byFlow(evs, c.match)
				if c.want && (len(s) != 1 || len(e) != 1) {
					t.Errorf("%s: %d starts %d ends, want 1 and 1", c.what, len(s), len(e))
				}
				if !c.want && (len(s) != 0 || len(e) != 0) {
					t.Errorf("%s: %d starts %d ends, want it filtered", c.what, len(s), len(e))
				}
			}
			if tc.reason != "" && r.met.FilteredCount(tc.reason) == 0 {
				t.Errorf("nothing counted as filtered by %q: %v", tc.reason, r.met)
			}
		})
	}
}

// TestNetNSSelection reads two namespaces at once, by name and by path: a flow between them
// shows in both, a flow inside one namespace only in that one.
func TestNetNSSelection(t *testing.T) {
	p := newPair(t)
	ra := startSource(t, map[string]any{"netns": p.A, "activate": true, "flush_interval": "10ms"})
	rb := startSource(t, map[string]any{"netns": "/run/netns/" + p.B, "activate": true, "flush_interval": "10ms"})
	srv, stop := udpEcho(t, p, p.B, p.B4+":0")
	defer stop()
	cross := udpExchange(t, p.A, srv, 1, 10)
	local, stop2 := udpEcho(t, p, p.B, "127.0.0.1:0")
	defer stop2()
	inside := udpExchange(t, p.B, local, 1, 10)
	isCross := func(e *flow.Event) bool { return e.Protocol == flow.ProtoUDP && e.SrcPort == cross.Port() }
	isInside := func(e *flow.Event) bool {
		return e.Protocol == flow.ProtoUDP && e.SrcPort == inside.Port() && e.DstAddr == netip.MustParseAddr("127.0.0.1")
	}
	waitFor(t, "ends in both namespaces", func() bool {
		_, a := byFlow(ra.out.Events(), isCross)
		_, b := byFlow(rb.out.Events(), isCross)
		_, c := byFlow(rb.out.Events(), isInside)
		return len(a) == 1 && len(b) == 1 && len(c) == 1
	}, func() { dumpNS(p, p.A)(); dumpNS(p, p.B)() })
	ra.stop()
	rb.stop()
	if s, e := byFlow(ra.out.Events(), isInside); len(s)+len(e) != 0 {
		t.Errorf("namespace A's source saw B's loopback flow")
	}
	if _, e := byFlow(ra.out.Events(), isCross); e[0].Direction != flow.Egress {
		t.Errorf("A: direction %s", e[0].Direction)
	}
	if _, e := byFlow(rb.out.Events(), isCross); e[0].Direction != flow.Ingress {
		t.Errorf("B: direction %s", e[0].Direction)
	}
}

func TestSysctlsRestoredAndActivateRemoved(t *testing.T) {
	p := newPair(t)
	hostAcct, _ := os.ReadFile(sysctlAcct)
	for _, kv := range []string{"net.netfilter.nf_conntrack_acct=0", "net.netfilter.nf_conntrack_timestamp=0"} {
		sysctlNS(t, p, p.A, kv)
	}
	read := func(key string) string {
		return readSysctlNS(t, p.A, key)
	}
	// Without activation, a fresh namespace tracks nothing.
	srv, stop := udpEcho(t, p, p.B, p.B4+":0")
	defer stop()
	udpExchange(t, p.A, srv, 1, 10)
	if out := p.Exec(t, p.A, "conntrack", "-L"); strings.Contains(out, p.B4) {
		t.Fatalf("namespace tracks connections before activation:\n%s", out)
	}

	r := startSource(t, map[string]any{"netns": p.A, "activate": true})
	if read("net.netfilter.nf_conntrack_acct") != "1" || read("net.netfilter.nf_conntrack_timestamp") != "1" {
		t.Fatal("counters and timestamps not enabled while running")
	}
	table := activationTable(r.src.env.Name, r.src.id)
	if out := p.Exec(t, p.A, "nft", "list", "tables"); !strings.Contains(out, table) {
		t.Fatalf("table %s missing while running:\n%s", table, out)
	}
	udpExchange(t, p.A, srv, 1, 10)
	if out := p.Exec(t, p.A, "conntrack", "-L"); !strings.Contains(out, p.B4) {
		t.Fatalf("activation did not make the namespace track connections:\n%s", out)
	}
	r.stop()
	if read("net.netfilter.nf_conntrack_acct") != "0" || read("net.netfilter.nf_conntrack_timestamp") != "0" {
		t.Error("sysctls not restored to 0 on stop")
	}
	if out := p.Exec(t, p.A, "nft", "list", "tables"); strings.Contains(out, table) {
		t.Errorf("table %s left after stop:\n%s", table, out)
	}
	if after, _ := os.ReadFile(sysctlAcct); string(after) != string(hostAcct) {
		t.Errorf("the host's nf_conntrack_acct changed from %q to %q", hostAcct, after)
	}
}

// TestExistingFlows starts the source while a connection is open: the dump at start reports
// it (reconstructed), and since the kernel sends no DESTROY for an entry without an event
// cache (nf_conntrack_events=0 below), the periodic sweep reports its end with the counters of
// the last dump.
func TestExistingFlows(t *testing.T) {
	// The sweep looks a few entries up one by one, many with a full dump; test both.
	for _, tc := range []struct {
		name   string
		getMax int
	}{{"get", 256}, {"dump", 0}} {
		t.Run(tc.name, func(t *testing.T) { existingFlows(t, tc.getMax) })
	}
}

func existingFlows(t *testing.T, getMax int) {
	p := newPair(t)
	p.Exec(t, p.A, "nft", `add table inet keep
add chain inet keep c
add rule inet keep c ct state new counter`)
	sysctlNS(t, p, p.A, "net.netfilter.nf_conntrack_acct=1")
	sysctlNS(t, p, p.A, "net.netfilter.nf_conntrack_udp_timeout=3")
	// 0: entries get no event cache, so the kernel never reports their end and only the sweep
	// can. Not 2 ("auto", the default): whether an entry gets the cache then depends on
	// whether any ctnetlink listener exists on the whole host when it is created (the kernel
	// tracks that globally, not per namespace), and in CI other test packages listen at the
	// same time, so the kernel sent the DESTROY and the test failed.
	sysctlNS(t, p, p.A, "net.netfilter.nf_conntrack_events=0")
	srv, stop := udpEcho(t, p, p.B, p.B4+":0")
	defer stop()
	client := udpExchange(t, p.A, srv, 2, 100)
	r := startSource(t, map[string]any{"netns": p.A, "flush_interval": "10ms", "sweep_interval": "1s", "resync_grace": "1s"},
		func(s *Source) { s.sweepGetMax = getMax })
	match := func(e *flow.Event) bool { return e.Protocol == flow.ProtoUDP && e.SrcPort == client.Port() }
	waitFor(t, "the existing flow's end", func() bool { _, e := byFlow(r.out.Events(), match); return len(e) > 0 }, nil)
	r.stop()
	starts, ends := byFlow(r.out.Events(), match)
	if len(starts) != 1 || len(ends) != 1 || starts[0].FlowID != ends[0].FlowID {
		t.Fatalf("%d starts %d ends", len(starts), len(ends))
	}
	if e := ends[0]; e.TxPackets != 2 || e.TxBytes != 2*128 || e.RxPackets != 2 || e.RxBytes != 2*78 {
		t.Errorf("end counters tx %d/%d rx %d/%d, want the last dump's 2/256 and 2/156", e.TxPackets, e.TxBytes, e.RxPackets, e.RxBytes)
	}
	if !starts[0].Reconstructed || !ends[0].Reconstructed {
		t.Errorf("start and end of a connection found by dumps not marked reconstructed: %v, %v", starts[0].Reconstructed, ends[0].Reconstructed)
	}
	if got := r.src.stats.reconstructedStarts.Load(); got != 1 {
		t.Errorf("%d reconstructed starts, want 1", got)
	}
	if got := r.src.stats.reconstructedEnds.Load(); got != 1 {
		t.Errorf("%d reconstructed ends, want 1", got)
	}
}

// TestOverlappingInstancesKeepEachOthersChanges: two instances of one source (as a reload
// that replaces it runs them, overlapping) with a data directory. The second must not take
// the first's record for a leftover of a killed run and undo it under the running one; each
// has its own table; a sysctl the first changed stays while the second needs it (the first
// hands it the value to put back), and the last to stop puts the host's own back. A record
// whose instance is gone (its lock free, as after kill -9) is undone at the next start.
func TestOverlappingInstancesKeepEachOthersChanges(t *testing.T) {
	p := newPair(t)
	sysctlNS(t, p, p.A, "net.netfilter.nf_conntrack_acct=0")
	sysctlNS(t, p, p.A, "net.netfilter.nf_conntrack_timestamp=0")
	acct := func() string { return readSysctlNS(t, p.A, "net.netfilter.nf_conntrack_acct") }
	stamp := func() string { return readSysctlNS(t, p.A, "net.netfilter.nf_conntrack_timestamp") }
	tables := func() string { return p.Exec(t, p.A, "nft", "list", "tables") }
	data := t.TempDir()
	sameName := func(s *Source) { s.env.Name, s.env.DataDir = "kernel", data }

	a := startSource(t, map[string]any{"netns": p.A, "activate": true, "counters": true, "timestamps": false}, sameName)
	ta := activationTable("kernel", a.src.id)
	b := startSource(t, map[string]any{"netns": p.A, "activate": true, "counters": true, "timestamps": true}, sameName)
	tb := activationTable("kernel", b.src.id)
	if got := tables(); !strings.Contains(got, ta) || !strings.Contains(got, tb) {
		t.Fatalf("tables %q while both run, want %s and %s", got, ta, tb)
	}
	if acct() != "1" || stamp() != "1" {
		t.Fatalf("acct=%s timestamp=%s while both run, want 1 and 1", acct(), stamp())
	}
	a.stop()
	if got := tables(); strings.Contains(got, ta) || !strings.Contains(got, tb) {
		t.Errorf("tables %q after the first stopped, want only %s", got, tb)
	}
	if acct() != "1" {
		t.Errorf("acct=%s after the first stopped: the second still needs it", acct())
	}
	b.stop()
	if acct() != "0" || stamp() != "0" {
		t.Errorf("acct=%s timestamp=%s after both stopped, want the host's 0 and 0", acct(), stamp())
	}
	if got := tables(); strings.Contains(got, "flowpipe_kernel") {
		t.Errorf("tables %q left after both stopped", got)
	}
	if m, _ := filepath.Glob(filepath.Join(data, "conntrack", "kernel", "host-changes*")); len(m) != 0 {
		t.Errorf("records left after both stopped: %v", m)
	}

	// A leftover: the record of an instance whose lock nobody holds.
	c := startSource(t, map[string]any{"netns": p.A, "activate": true, "counters": true}, sameName)
	tc := activationTable("kernel", c.src.id)
	c.src.lock.Close() // as if its process had been killed: the kernel drops the lock
	c.src.lock = nil
	c.src.recorded, c.src.act, c.src.sysctls = false, nil, nil // and it never undoes anything
	d := startSource(t, map[string]any{"netns": p.A, "activate": true, "counters": true}, sameName)
	if got := tables(); strings.Contains(got, tc) {
		t.Errorf("tables %q: the leftover table %s was not removed", got, tc)
	}
	c.stop()
	d.stop()
	if acct() != "0" {
		t.Errorf("acct=%s after the leftover was undone and the new instance stopped, want 0", acct())
	}
	if got := tables(); strings.Contains(got, "flowpipe_kernel") {
		t.Errorf("tables %q left at the end", got)
	}
}
