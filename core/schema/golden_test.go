package schema

import (
	"bytes"
	"flag"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

var update = flag.Bool("update", false, "rewrite testdata/golden-*.jsonl from the encoders")

// goldenEvents is a fixed, varied set of events: every type, direction and branch of the
// encoders (ICMP or ports, IPv4, IPv6, mapped and missing addresses, zero, negative and
// far-future times, strings that need escaping or are not UTF-8, large counters).
func goldenEvents() []flow.Event {
	r := rand.New(rand.NewPCG(14, 2026))
	addrs := []netip.Addr{{}, netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("192.0.2.255"),
		netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("fe80::1:2:3:4"), netip.MustParseAddr("::ffff:10.1.2.3"),
		netip.MustParseAddr("0.0.0.0"), netip.MustParseAddr("::")}
	strs := []string{"", "rule-1", "res-\"quoted\"\n", "tab\tand\\slash", "ünïcode ✓", "bad\xffutf8", "\x00\x1f\x7f", "</script>&",
		"1:LQU9qZlK+B5F3KDmev6m5PMibrg="}
	times := []flow.Time{0, 1, 999_999_999, 1_000_000_000, -1, -1_500_000_000, 1_764_638_725_123_456_789,
		1_764_638_725_999_999_999, 253_402_300_800_000_000_000 / 1000, 9_223_372_036_854_775_807}
	protos := []uint8{flow.ProtoTCP, flow.ProtoUDP, flow.ProtoICMP, flow.ProtoICMPv6, flow.ProtoSCTP, 47, 0, 255}
	counters := []uint64{0, 1, 9, 10, 99, 100, 65535, 1 << 32, 1<<64 - 1}
	var evs []flow.Event
	for i := range 400 {
		var e flow.Event
		for j := range e.EventID {
			e.EventID[j] = byte(r.Uint32())
			e.FlowID[j] = byte(r.Uint32())
		}
		e.Type = flow.Type(i % 6) // includes an out-of-range type
		e.Direction = flow.Direction(r.IntN(4))
		e.Protocol = protos[r.IntN(len(protos))]
		e.SrcAddr, e.DstAddr = addrs[r.IntN(len(addrs))], addrs[r.IntN(len(addrs))]
		e.SrcPort, e.DstPort = uint16(r.Uint32()), uint16(r.IntN(3)*443)
		e.ICMPType, e.ICMPCode = uint8(r.Uint32()), uint8(r.IntN(3))
		e.Timestamp = times[r.IntN(len(times))]
		if i%3 == 0 {
			e.Timestamp = flow.Time(1_764_638_725_000_000_000 + int64(i)*12_345_678) // seconds shared and not
		}
		e.Start, e.End = times[r.IntN(len(times))], times[r.IntN(len(times))]
		e.WindowStart, e.WindowEnd = times[r.IntN(len(times))], times[r.IntN(len(times))]
		e.RxPackets, e.RxBytes = counters[r.IntN(len(counters))], counters[r.IntN(len(counters))]
		e.TxPackets, e.TxBytes = counters[r.IntN(len(counters))], r.Uint64()>>r.Uint64N(64)
		e.NumStarts, e.NumEnds, e.NumDrops = counters[r.IntN(len(counters))], r.Uint64()>>40, uint64(i)
		e.RuleID, e.SrcResourceID = strs[r.IntN(len(strs))], strs[r.IntN(len(strs))]
		e.DstResourceID, e.CommunityID, e.Source = strs[r.IntN(len(strs))], strs[r.IntN(len(strs))], strs[r.IntN(len(strs))]
		e.Reconstructed = r.IntN(4) == 0
		evs = append(evs, e)
	}
	return evs
}

// TestGolden holds every encoder to the bytes it wrote when the golden files were made: the
// encoders are tuned for speed by hand, and that must never change what they write.
func TestGolden(t *testing.T) {
	evs := goldenEvents()
	for _, f := range []Format{Flowpipe, ECS, OCSF} {
		// One encoder for all (it caches the last second), and a fresh one per event.
		var shared, fresh []byte
		enc := Encoder{Format: f}
		for i := range evs {
			shared = append(enc.Append(shared, &evs[i]), '\n')
			one := Encoder{Format: f}
			fresh = append(one.Append(fresh, &evs[i]), '\n')
		}
		if !bytes.Equal(shared, fresh) {
			t.Errorf("%s: an encoder reused across events writes other bytes than fresh ones", f)
		}
		path := filepath.Join("testdata", "golden-"+f.String()+".jsonl")
		if *update {
			if err := os.WriteFile(path, shared, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(shared, want) {
			got, exp := bytes.Split(shared, []byte("\n")), bytes.Split(want, []byte("\n"))
			for i := range min(len(got), len(exp)) {
				if !bytes.Equal(got[i], exp[i]) {
					t.Fatalf("%s: line %d differs from %s:\n got %s\nwant %s", f, i+1, path, got[i], exp[i])
				}
			}
			t.Fatalf("%s: %d lines, %s has %d", f, len(got), path, len(exp))
		}
	}
}
