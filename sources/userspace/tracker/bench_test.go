package tracker

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// cpuNanos is the CPU time the process has used. The benchmarks report it per operation as
// cpu-ns/op beside Go's wall-clock ns/op, because the machine they run on is shared and a
// wall clock there measures the neighbours as much as the code.
func cpuNanos() int64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// reportCPU starts counting CPU time; call the returned function when the timed loop ends.
func reportCPU(b *testing.B) func() {
	start := cpuNanos()
	return func() {
		b.ReportMetric(float64(cpuNanos()-start)/float64(b.N), "cpu-ns/op")
	}
}

// The tracker benchmarks measure ProcessAt on already-decoded packets (the decoder has its
// own benchmark); every 64 packets the benchmark takes the pending events once there are
// 1024, handing back a buffer to reuse, as the source does.

func BenchmarkEstablishedTCP(b *testing.B) {
	tr := New(Config{LocalPrefixes: localA})
	out := tcpPkt(addrA, addrB, 40000, 443, syn, 1000, 0, 0)
	tr.ProcessAt(out, sec)
	tr.ProcessAt(tcpPkt(addrB, addrA, 443, 40000, synack, 5000, 1001, 0), sec)
	out = tcpPkt(addrA, addrB, 40000, 443, ack, 1001, 5001, 100)
	in := tcpPkt(addrB, addrA, 443, 40000, ack, 5001, 1101, 1400)
	tr.ProcessAt(out, sec)
	b.ReportAllocs()
	b.ResetTimer()
	defer reportCPU(b)()
	for i := 0; b.Loop(); i++ {
		if i&1 == 0 {
			tr.ProcessAt(in, sec+flow.Time(i))
		} else {
			tr.ProcessAt(out, sec+flow.Time(i))
		}
	}
}

// BenchmarkEstablishedTCPManyFlows spreads packets over 10,000 established connections, so
// that lookups miss the CPU cache as they would on a busy host.
func BenchmarkEstablishedTCPManyFlows(b *testing.B) {
	const n = 10000
	tr := New(Config{LocalPrefixes: localA})
	pkts := make([]*Packet, n)
	for i := range pkts {
		pkts[i] = tcpPkt(addrA, addrB, uint16(10000+i), 443, ack, 1, 1, 100)
		tr.ProcessAt(pkts[i], sec)
	}
	tr.DrainEvents(nil)
	b.ReportAllocs()
	b.ResetTimer()
	defer reportCPU(b)()
	for i := 0; b.Loop(); i++ {
		tr.ProcessAt(pkts[(i*7919)%n], sec+flow.Time(i))
	}
}

// newFlows measures opening connections. Every packet has a new 5-tuple. With evict false
// the table has room: it is emptied (outside the timer) every 65,536 connections, after one
// untimed round that puts its memory in place, as in a tracker that has run for a while. With
// evict true the table is full (65,536 connections) so that each new connection also evicts
// the least recently active one and produces its end event: the steady state of a busy
// tracker, where every connection is opened once and removed once.
func newFlows(b *testing.B, evict bool, mk func(i int) *Packet) {
	const span = 1 << 16
	tr := New(Config{LocalPrefixes: localA, MaxEntries: span})
	pkts := make([]*Packet, 4*span)
	for i := range pkts {
		pkts[i] = mk(i)
	}
	buf := make([]flow.Event, 0, 2048)
	for i, p := range pkts[:span] {
		tr.ProcessAt(p, sec)
		if i&63 == 0 && tr.Pending() >= 1024 {
			buf = tr.DrainEvents(buf)
		}
	}
	// Emptying the table drains its end events as it goes, into the reused buffer, so that
	// the untimed flushes leave no garbage for the collector to chase during the timed part.
	empty := func() {
		for tr.Flush(sec, 1024) > 0 {
			buf = tr.DrainEvents(buf)
		}
		buf = tr.DrainEvents(buf)
	}
	if !evict {
		empty()
	}
	b.ReportAllocs()
	b.ResetTimer()
	var untimed int64
	cpu0 := cpuNanos()
	defer func() { b.ReportMetric(float64(cpuNanos()-cpu0-untimed)/float64(b.N), "cpu-ns/op") }()
	for i := 0; b.Loop(); i++ {
		j := span + i
		if !evict && i > 0 && i%span == 0 {
			b.StopTimer()
			c := cpuNanos()
			empty()
			untimed += cpuNanos() - c
			b.StartTimer()
		}
		tr.ProcessAt(pkts[j%len(pkts)], sec+flow.Time(i))
		if i&63 == 0 && tr.Pending() >= 1024 {
			buf = tr.DrainEvents(buf)
		}
	}
}

func srcAddr(i int) *Packet {
	p := &Packet{}
	p.SetAddrs(addrA, addrB)
	binary.BigEndian.PutUint16(p.Src[14:], uint16(i>>8))
	return p
}

func BenchmarkNewTCP(b *testing.B)         { newFlows(b, false, newTCP) }
func BenchmarkNewTCPEvicting(b *testing.B) { newFlows(b, true, newTCP) }
func BenchmarkNewUDP(b *testing.B)         { newFlows(b, false, newUDP) }
func BenchmarkNewUDPEvicting(b *testing.B) { newFlows(b, true, newUDP) }

func newTCP(i int) *Packet {
	{
		p := tcpPkt(addrA, addrB, uint16(i), 443, syn, 1000, 0, 0)
		binary.BigEndian.PutUint16(p.Src[13:15], uint16(i>>16))
		return p
	}
}

func newUDP(i int) *Packet {
	{
		p := udpPkt(addrA, addrB, uint16(i), 53, 40)
		binary.BigEndian.PutUint16(p.Src[13:15], uint16(i>>16))
		return p
	}
}

// BenchmarkMixed replays a mix of 1,000 TCP connections going through handshake, data and
// close, UDP request/response pairs and pings, cycling over and over: mostly established
// packets, with connections opening and closing.
func BenchmarkMixed(b *testing.B) {
	var pkts []*Packet
	for c := range 1000 {
		port := uint16(20000 + c)
		switch c % 10 {
		case 0, 1, 2, 3, 4, 5:
			pkts = append(pkts,
				tcpPkt(addrA, addrB, port, 443, syn, 1000, 0, 0),
				tcpPkt(addrB, addrA, 443, port, synack, 5000, 1001, 0),
				tcpPkt(addrA, addrB, port, 443, ack, 1001, 5001, 0))
			for k := range 10 {
				pkts = append(pkts,
					tcpPkt(addrA, addrB, port, 443, ack, 1001+uint32(k)*100, 5001, 100),
					tcpPkt(addrB, addrA, 443, port, ack, 5001, 1101+uint32(k)*100, 1400))
			}
			pkts = append(pkts,
				tcpPkt(addrA, addrB, port, 443, finack, 2001, 5001, 0),
				tcpPkt(addrB, addrA, 443, port, finack, 5001, 2002, 0),
				tcpPkt(addrA, addrB, port, 443, ack, 2002, 5002, 0))
		case 6, 7, 8:
			pkts = append(pkts, udpPkt(addrA, addrB, port, 53, 40), udpPkt(addrB, addrA, 53, port, 120))
		default:
			pkts = append(pkts, icmpPkt(addrA, addrB, 8, 0, port), icmpPkt(addrB, addrA, 0, 0, port))
		}
	}
	// Interleave the connections as a busy host would.
	inter := make([]*Packet, 0, len(pkts))
	for stride, i := 0, 0; len(inter) < len(pkts); i++ {
		_ = stride
		inter = append(inter, pkts[(i*7919)%len(pkts)])
	}
	tr := New(Config{LocalPrefixes: localA})
	buf := make([]flow.Event, 0, 2048)
	b.ReportAllocs()
	b.ResetTimer()
	defer reportCPU(b)()
	for i := 0; b.Loop(); i++ {
		tr.ProcessAt(inter[i%len(inter)], sec+flow.Time(i))
		if i&63 == 0 && tr.Pending() >= 1024 {
			buf = tr.DrainEvents(buf)
		}
	}
}

func BenchmarkDecodeIPv4TCP(b *testing.B) {
	raw := buildTCP4(b)
	var p Packet
	b.ReportAllocs()
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		if err := DecodeIP(raw, &p); err != nil {
			b.Fatal(err)
		}
	}
}

func buildTCP4(tb testing.TB) []byte {
	raw := make([]byte, 40)
	raw[0] = 0x45
	binary.BigEndian.PutUint16(raw[2:], 40)
	raw[8], raw[9] = 64, 6
	copy(raw[12:], addrA.AsSlice())
	copy(raw[16:], addrB.AsSlice())
	binary.BigEndian.PutUint16(raw[20:], 40000)
	binary.BigEndian.PutUint16(raw[22:], 443)
	raw[32] = 5 << 4
	raw[33] = ack
	return raw
}

// BenchmarkNetBirdShape repeats the shape of NetBird's own conntrack benchmarks
// (client/firewall/uspfilter/conntrack: BenchmarkTCPTracker/TrackOutbound and IsValidInbound,
// BenchmarkUDPTracker/TrackOutbound) on this tracker, so that both can be run side by side on
// the same machine: outbound SYNs and UDP datagrams whose source port cycles over 65,535
// values (new connections for the first round, then packets of known ones), and inbound
// SYN-ACKs for 1,000 connections opened beforehand.
func BenchmarkNetBirdShape(b *testing.B) {
	src, dst := netip.MustParseAddr("192.168.1.1"), netip.MustParseAddr("192.168.1.2")
	local := []netip.Prefix{netip.MustParsePrefix("192.168.1.1/32")}
	run := func(b *testing.B, tr *Tracker, mk func(i int) *Packet) {
		buf := make([]flow.Event, 0, 2048)
		b.ReportAllocs()
		b.ResetTimer()
		defer reportCPU(b)()
		for i := 0; b.Loop(); i++ {
			tr.ProcessAt(mk(i), sec+flow.Time(i))
			if tr.Pending() >= 1024 {
				buf = tr.DrainEvents(buf)
			}
		}
	}
	b.Run("TCPTrackOutboundSYN", func(b *testing.B) {
		tr := New(Config{LocalPrefixes: local})
		pk := make([]*Packet, 65535)
		for i := range pk {
			pk[i] = tcpPkt(src, dst, uint16(i), 80, syn, 0, 0, 0)
		}
		run(b, tr, func(i int) *Packet { return pk[i%65535] })
	})
	b.Run("TCPInboundEstablished", func(b *testing.B) {
		tr := New(Config{LocalPrefixes: local})
		for i := range 1000 {
			tr.ProcessAt(tcpPkt(src, dst, uint16(i), 80, syn, 0, 0, 0), sec)
		}
		tr.DrainEvents(nil)
		pk := make([]*Packet, 1000)
		for i := range pk {
			pk[i] = tcpPkt(dst, src, 80, uint16(i), synack, 0, 1, 0)
		}
		run(b, tr, func(i int) *Packet { return pk[i%1000] })
	})
	b.Run("UDPTrackOutbound", func(b *testing.B) {
		tr := New(Config{LocalPrefixes: local})
		pk := make([]*Packet, 65535)
		for i := range pk {
			pk[i] = udpPkt(src, dst, uint16(i), 80, 0)
		}
		run(b, tr, func(i int) *Packet { return pk[i%65535] })
	})
}

// BenchmarkParallelEstablished runs EstablishedTCPManyFlows's packets from GOMAXPROCS
// goroutines at once, as a firewall's packet workers would: what the table locks cost under
// contention, with one shard and with the default sixteen.
func BenchmarkParallelEstablished(b *testing.B) {
	for _, shards := range []int{1, 16} {
		b.Run(fmt.Sprintf("shards=%d", shards), func(b *testing.B) {
			const n = 10000
			tr := New(Config{LocalPrefixes: localA, Shards: shards})
			pkts := make([]*Packet, n)
			for i := range pkts {
				pkts[i] = tcpPkt(addrA, addrB, uint16(10000+i), 443, ack, 1, 1, 100)
				tr.ProcessAt(pkts[i], sec)
			}
			tr.DrainEvents(nil)
			b.ReportAllocs()
			b.ResetTimer()
			defer reportCPU(b)()
			var worker atomic.Int64
			b.RunParallel(func(pb *testing.PB) {
				// Each worker starts elsewhere in the sequence: workers handle different
				// connections, as a firewall's would.
				i := int(worker.Add(1)) * 3331
				for pb.Next() {
					tr.ProcessAt(pkts[(i*7919)%n], sec+flow.Time(i))
					i++
				}
			})
		})
	}
}
