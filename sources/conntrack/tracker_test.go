package conntrack

import (
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// These tests drive the tracker with synthetic conntrack entries: the logic of matching
// starts and ends and of reconciling dumps, without a kernel. The namespace tests cover the
// same paths with real netlink.

type recorded struct {
	ev            flow.Event
	reconstructed bool
}

func testTracker(t *testing.T, opts map[string]any) (*tracker, *[]recorded) {
	t.Helper()
	cfg := defaultConfig()
	if errs := config.Decode(opts, cfg, ""); len(errs) > 0 {
		t.Fatal(errs)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var out []recorded
	tr := newTracker(cfg, func(e *flow.Event, r bool) { out = append(out, recorded{*e, r}) })
	tr.local = []netip.Prefix{netip.MustParsePrefix("10.0.0.1/32")}
	return tr, &out
}

// newFlow is an entry as the decoder gives it: the original tuple and its reply.
func newFlow(proto uint8, src, dst string, sport, dport uint16) ctFlow {
	s, d := netip.MustParseAddr(src), netip.MustParseAddr(dst)
	return ctFlow{orig: ctTuple{src: s, dst: d, sport: sport, dport: dport, proto: proto},
		reply: ctTuple{src: d, dst: s, sport: dport, dport: sport, proto: proto}}
}

func udpFlow(id uint32, sport uint16, origPk, replyPk uint64) ctFlow {
	f := newFlow(flow.ProtoUDP, "10.0.0.1", "192.0.2.9", sport, 53)
	f.id = id
	f.countersOrig = ctCounter{packets: origPk, bytes: origPk * 100}
	f.countersReply = ctCounter{packets: replyPk, bytes: replyPk * 200}
	return f
}

func TestTrackerStartEnd(t *testing.T) {
	tr, out := testTracker(t, nil)
	f := udpFlow(1, 40000, 2, 3)
	tr.onNew(&f, 100)
	f.start, f.stop = 90, 150
	tr.onDestroy(&f, 160)
	if len(*out) != 2 {
		t.Fatalf("%d events", len(*out))
	}
	s, e := (*out)[0].ev, (*out)[1].ev
	if s.Type != flow.TypeStart || e.Type != flow.TypeEnd || s.FlowID != e.FlowID || (*out)[0].reconstructed || (*out)[1].reconstructed {
		t.Fatalf("start %+v end %+v", s, e)
	}
	if e.Direction != flow.Egress || e.TxPackets != 2 || e.TxBytes != 200 || e.RxPackets != 3 || e.RxBytes != 600 {
		t.Errorf("end %+v", e)
	}
	if s.Start != 100 || e.Start != 90 || e.End != 150 || e.Timestamp != 160 {
		t.Errorf("times: start event %d, end event start %d end %d ts %d", s.Start, e.Start, e.End, e.Timestamp)
	}
	if len(tr.known) != 0 {
		t.Errorf("%d entries left", len(tr.known))
	}
}

func TestTrackerDestroyWithoutNew(t *testing.T) {
	tr, out := testTracker(t, nil)
	f := udpFlow(2, 40001, 1, 1)
	tr.onDestroy(&f, 10)
	if len(*out) != 2 || !(*out)[0].reconstructed || (*out)[1].reconstructed || (*out)[0].ev.FlowID != (*out)[1].ev.FlowID {
		t.Fatalf("want a reconstructed start and the end: %+v", *out)
	}
}

func TestTrackerResync(t *testing.T) {
	tr, out := testTracker(t, map[string]any{"resync_grace": "5s"})
	known, gone, late := udpFlow(1, 1, 1, 0), udpFlow(2, 2, 1, 0), udpFlow(3, 3, 1, 0)
	tr.onNew(&known, 1)
	tr.onNew(&gone, 1)
	tr.onNew(&late, 1)
	gone.countersOrig.packets = 6 // what a first dump saw
	tr.onDump([]ctFlow{known, gone, late}, 2, true)
	*out = nil
	// An overrun lost some events: the dump has `known` (with counters now), and an entry the
	// tracker never saw; `gone` and `late` are no longer in the table.
	known.countersOrig.packets = 7
	unseen := udpFlow(4, 4, 5, 5)
	starts, missing := tr.onDump([]ctFlow{known, unseen}, 10, true)
	if starts != 1 || missing != 2 || len(*out) != 1 || !(*out)[0].reconstructed || (*out)[0].ev.SrcPort != 4 {
		t.Fatalf("dump: %d starts %d missing, events %+v", starts, missing, *out)
	}
	// Its NEW was only late, not lost: no second start.
	tr.onNew(&unseen, 11)
	if len(*out) != 1 || tr.duplicates != 1 {
		t.Fatalf("duplicate start emitted: %+v", *out)
	}
	// `late`'s DESTROY arrives within the grace: a normal end.
	tr.onDestroy(&late, 12)
	if n := tr.expire(flow.Time(4 * time.Second)); n != 0 {
		t.Fatalf("expired %d entries before the grace", n)
	}
	// `gone`'s never does: after the grace it ends, reconstructed, with the last counters.
	*out = nil
	if n := tr.expire(10 + flow.Time(5*time.Second)); n != 1 {
		t.Fatalf("expired %d entries, want 1", n)
	}
	e := (*out)[0]
	if !e.reconstructed || e.ev.Type != flow.TypeEnd || e.ev.SrcPort != 2 || e.ev.TxPackets != 6 {
		t.Fatalf("reconstructed end %+v", e)
	}
	if len(tr.known) != 2 || tr.missing != 0 || tr.fromDump != 0 {
		t.Errorf("known %d missing %d fromDump %d", len(tr.known), tr.missing, tr.fromDump)
	}
}

func TestTrackerDirectionAndICMP(t *testing.T) {
	tr, out := testTracker(t, map[string]any{"ingress_mark": 0x10, "direction_mark_mask": 0xf0})
	in := newFlow(flow.ProtoICMP, "192.0.2.9", "10.0.0.1", 0, 0)
	in.orig.icmpType, in.orig.icmpID = 8, 77
	in.countersOrig = ctCounter{packets: 4, bytes: 400}
	tr.onDestroy(&in, 1)
	e := (*out)[1].ev
	if e.Direction != flow.Ingress || e.RxPackets != 4 || e.TxPackets != 0 || e.ICMPType != 8 || e.SrcPort != 0 {
		t.Errorf("ingress ICMP end %+v", e)
	}
	marked := udpFlow(9, 9, 1, 1)
	marked.mark = 0x1f // 0x10 after the mask
	tr.onDestroy(&marked, 1)
	if e := (*out)[3].ev; e.Direction != flow.Ingress || e.RxPackets != 1 {
		t.Errorf("marked flow %+v", e)
	}
	fwd := newFlow(flow.ProtoSCTP, "192.0.2.1", "198.51.100.1", 5000, 6000)
	tr.onNew(&fwd, 1)
	if e := (*out)[4].ev; e.Direction != flow.DirectionUnknown || e.SrcPort != 5000 || e.DstPort != 6000 || e.Protocol != flow.ProtoSCTP {
		t.Errorf("forwarded SCTP start %+v", e)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		opts map[string]any
		want string // substring of the error, "" for valid
	}{
		{map[string]any{}, ""},
		{map[string]any{"protocols": []any{"tcp", "UDP", "132"}}, ""},
		{map[string]any{"protocols": []any{"tcp", "tpc"}}, `protocols[1]: unknown protocol "tpc"`},
		{map[string]any{"mark_mask": 0xff}, "mark_mask: set without mark"},
		{map[string]any{"ingress_mark": 1, "egress_mark": 1}, "egress_mark: equals ingress_mark"},
		{map[string]any{"read_buffer": "1KiB"}, "read_buffer: must be between"},
		{map[string]any{"batch_size": 0}, "batch_size"},
		{map[string]any{"batch_size": 4096, "max_pending": 100}, "max_pending: must be at least batch_size"},
		{map[string]any{"sweep_interval": "10ms"}, "sweep_interval"},
		{map[string]any{"include_prefixes": []any{"10.0.0.0/33"}}, "include_prefixes[0]"},
		{map[string]any{"netnss": "x"}, `netnss: unknown key (did you mean "netns"?)`},
	} {
		cfg := defaultConfig()
		err := error(nil)
		if errs := config.Decode(tc.opts, cfg, ""); len(errs) > 0 {
			err = errs
		} else {
			err = cfg.Validate()
		}
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v: unexpected error %v", tc.opts, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v: error %v, want %q", tc.opts, err, tc.want)
		}
	}
}

// kernelSeeds reads the messages captured from a real kernel in the fuzz corpus.
func kernelSeeds(t testing.TB) [][]byte {
	files, _ := filepath.Glob("testdata/fuzz/FuzzDecodeMessages/kernel-*")
	var out [][]byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		line := strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[1])
		s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(line, "[]byte("), ")"))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		out = append(out, []byte(s))
	}
	if len(out) == 0 {
		t.Fatal("no kernel message seeds")
	}
	return out
}

func TestDecodeKernelMessages(t *testing.T) {
	var news, destroys int
	for _, b := range kernelSeeds(t) {
		var d ctDecoder
		var cur ctFlow
		if bad := d.decodeAll(b, &cur, func(typ int, f *ctFlow) {
			switch typ {
			case ctEvNew:
				news++
			case ctEvDestroy:
				destroys++
				if f.countersOrig.packets == 0 || f.stop == 0 {
					t.Errorf("DESTROY without counters or stop time: %+v", f)
				}
			}
			if !f.orig.src.IsValid() {
				t.Errorf("no source address: %+v", f)
			}
		}); bad != 0 {
			t.Errorf("%d messages not decoded", bad)
		}
	}
	if news == 0 || destroys == 0 {
		t.Errorf("%d NEW and %d DESTROY in the seeds", news, destroys)
	}
}

// FuzzDecodeMessages feeds arbitrary datagrams to the netlink parser and the tracker: no
// input may panic, and every end must carry the flow ID of a start.
func FuzzDecodeMessages(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{16, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg := defaultConfig()
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		starts := map[[16]byte]bool{}
		tr := newTracker(cfg, func(e *flow.Event, _ bool) {
			switch e.Type {
			case flow.TypeStart:
				starts[e.FlowID] = true
			case flow.TypeEnd:
				if !starts[e.FlowID] {
					t.Fatalf("end without start: %+v", e)
				}
			}
		})
		tr.onMessages(b, 1, &stats{})
		_, _ = tr.onDump(nil, 2, true)
		tr.expire(3 + flow.Time(cfg.ResyncGrace))
		if len(tr.known) != 0 {
			t.Fatalf("%d entries left after every one went missing", len(tr.known))
		}
	})
}

// The compact key gives back the addresses it was made from, and tells an IPv4 entry from
// the IPv6 entry of the same address written IPv4-mapped.
func TestKeyAddresses(t *testing.T) {
	var keys []ctKey
	for _, c := range [][2]string{{"10.0.0.1", "192.0.2.7"}, {"2001:db8::1", "fe80::2"}, {"::ffff:10.0.0.1", "::ffff:192.0.2.7"}} {
		f := &ctFlow{id: 7}
		f.orig.src, f.orig.dst, f.orig.proto = netip.MustParseAddr(c[0]), netip.MustParseAddr(c[1]), flow.ProtoUDP
		k := keyOf(f)
		if k.srcAddr() != f.orig.src || k.dstAddr() != f.orig.dst {
			t.Errorf("key of %s -> %s gives back %s -> %s", f.orig.src, f.orig.dst, k.srcAddr(), k.dstAddr())
		}
		if cf := k.flow(); cf.TupleOrig.IP.SourceAddress != f.orig.src || cf.TupleOrig.IP.DestinationAddress != f.orig.dst {
			t.Errorf("lookup flow of %s -> %s: %s -> %s", f.orig.src, f.orig.dst, cf.TupleOrig.IP.SourceAddress, cf.TupleOrig.IP.DestinationAddress)
		}
		keys = append(keys, k)
	}
	if keys[0] == keys[2] {
		t.Error("an IPv4 entry and the IPv4-mapped IPv6 entry of the same addresses have one key")
	}
}
