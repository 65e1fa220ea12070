package resources

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
)

// benchTables is n distinct resource prefixes (90% IPv4, mostly /24 as in real address
// plans, 10% IPv6 /48-/64), an overlay, a default route and 50 rules, plus addresses to look
// up: half inside a resource, half random.
func benchTables(b *testing.B, n int) (*Tables, []netip.Addr) {
	rng := rand.New(rand.NewPCG(1, 2))
	tb := &Tables{
		Overlay: []string{"100.64.0.0/10"},
		Routes:  []Route{{Prefix: "0.0.0.0/0"}, {Prefix: "::/0"}},
	}
	seen := map[netip.Prefix]bool{}
	var inside []netip.Addr
	for len(seen) < n {
		var p netip.Prefix
		if rng.IntN(10) == 0 {
			var a16 [16]byte
			a16[0], a16[1] = 0x20, 0x01
			for i := 2; i < 8; i++ {
				a16[i] = byte(rng.UintN(256))
			}
			p = netip.PrefixFrom(netip.AddrFrom16(a16), 48+rng.IntN(17)).Masked()
		} else {
			bits := []int{16, 20, 22, 24, 24, 24, 24, 28, 32}[rng.IntN(9)]
			a4 := [4]byte{byte(1 + rng.UintN(99)), byte(rng.UintN(256)), byte(rng.UintN(256)), byte(rng.UintN(256))}
			p = netip.PrefixFrom(netip.AddrFrom4(a4), bits).Masked()
		}
		if seen[p] {
			continue
		}
		seen[p] = true
		tb.Resources = append(tb.Resources, Resource{ID: fmt.Sprintf("res-%d", len(seen)), Prefixes: []string{p.String()}})
		inside = append(inside, p.Addr())
	}
	for i := 0; i < 50; i++ {
		tb.Rules = append(tb.Rules, Rule{
			ID:        fmt.Sprintf("rule-%d", i),
			Protocols: []string{"tcp"},
			Dst:       []string{tb.Resources[i*7].ID},
			Ports:     []string{fmt.Sprint(1000 + i), "8000-8100"},
		})
	}
	tb.Rules = append(tb.Rules, Rule{ID: "catch-all"})
	addrs := make([]netip.Addr, 1<<16)
	for i := range addrs {
		if i%2 == 0 {
			addrs[i] = inside[rng.IntN(len(inside))]
		} else if i%10 == 1 {
			var a16 [16]byte
			a16[0], a16[1] = 0x20, 0x01
			for k := 2; k < 16; k++ {
				a16[k] = byte(rng.UintN(256))
			}
			addrs[i] = netip.AddrFrom16(a16)
		} else {
			addrs[i] = netip.AddrFrom4([4]byte{byte(rng.UintN(256)), byte(rng.UintN(256)), byte(rng.UintN(256)), byte(rng.UintN(256))})
		}
	}
	return tb, addrs
}

// BenchmarkLookup100k is one address resolved against 100,000 prefixes (overlay check,
// longest prefix match, resource ID); ns/op is the time of one lookup.
//   - random: 65,536 different addresses, so most lookups miss the CPU caches (the worst case).
//   - working-set-1k: 1,024 different addresses, closer to a host's real traffic, where a
//     batch of flows goes to a limited set of destinations.
//   - bart-only: the bare bart.Table lookup on the random set, to show what the enricher adds.
func BenchmarkLookup100k(b *testing.B) {
	tb, addrs := benchTables(b, 100_000)
	c, errs := compile(tb, "")
	if len(errs) > 0 {
		b.Fatal(errs)
	}
	run := func(name string, set []netip.Addr, lookup func(netip.Addr)) {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			mask := len(set) - 1
			cpu := startThreadCPU()
			for i := 0; i < b.N; i++ {
				lookup(set[i&mask])
			}
			cpu.report(b, "lookups")
		})
	}
	run("random", addrs, func(a netip.Addr) { c.lookup(a) })
	run("working-set-1k", addrs[:1024], func(a netip.Addr) { c.lookup(a) })
	run("bart-only", addrs, func(a netip.Addr) { c.lpm.Lookup(a) })
}

// BenchmarkEnrichPerEvent is the whole enricher (two lookups, the rule scan, the filters)
// over batches of 1,000 events with the 100,000-prefix tables: ns/op is per event.
func BenchmarkEnrichPerEvent(b *testing.B) {
	tb, addrs := benchTables(b, 100_000)
	cfg := DefaultConfig()
	cfg.Tables = *tb
	cfg.DNSCollection = false
	cfg.ExitNodeCollection = true
	enr, err := New(testEnv(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	e := enr.(*Enricher)
	rng := rand.New(rand.NewPCG(3, 4))
	src := make([]flow.Event, 1000)
	for i := range src {
		src[i] = flow.Event{
			Type: flow.TypeEnd, Protocol: flow.ProtoTCP, Direction: flow.Egress,
			SrcAddr: netip.MustParseAddr("100.64.3.4"), DstAddr: addrs[rng.IntN(len(addrs))],
			SrcPort: uint16(30000 + i), DstPort: uint16(1000 + rng.IntN(100)),
		}
	}
	evs := make([]flow.Event, len(src))
	b.ReportAllocs()
	b.ResetTimer()
	cpu := startThreadCPU()
	cpu.per = len(src)
	for range b.N {
		copy(evs, src)
		batch := flow.NewBatch(evs, nil)
		_ = e.Enrich(context.Background(), batch)
	}
	cpu.report(b, "events")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(src)), "ns/event")
}

// threadCPU measures the CPU time of the benchmark's thread. The machine these figures come
// from is shared by several busy builds, so wall-clock ns/op includes the time the thread
// waited for a core; CPU time per operation does not (caches are still shared, so it is not
// noise-free either).
type threadCPU struct {
	start time.Duration
	per   int // operations per b.N iteration
}

func startThreadCPU() *threadCPU {
	runtime.LockOSThread()
	return &threadCPU{start: threadTime(), per: 1}
}

func threadTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(1 /* RUSAGE_THREAD */, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func (c *threadCPU) report(b *testing.B, what string) {
	used := threadTime() - c.start
	runtime.UnlockOSThread()
	ops := float64(b.N * c.per)
	b.ReportMetric(float64(used.Nanoseconds())/ops, "cpu-ns/"+strings.TrimSuffix(what, "s"))
	b.ReportMetric(ops/b.Elapsed().Seconds()/1e6, "M"+what+"/s")
	if used > 0 {
		b.ReportMetric(ops/used.Seconds()/1e6, "M"+what+"/cpu-s")
	}
}
