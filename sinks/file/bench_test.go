package file

import (
	"context"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/schema"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// benchEvents are n events shaped like the generate source's: starts and ends of TCP, UDP
// and ICMP flows between a few hundred hosts, random IDs, times within one second.
func benchEvents(n int) []flow.Event {
	r := rand.New(rand.NewPCG(1, 2))
	ids := flow.NewIDGen()
	now := flow.Now()
	evs := make([]flow.Event, n)
	for i := range evs {
		e := &evs[i]
		e.EventID, e.FlowID = ids.New(), ids.New()
		e.Type = flow.TypeStart + flow.Type(r.IntN(2))
		e.Timestamp, e.Start = now+flow.Time(i*1000), now-flow.Time(r.IntN(5e9))
		e.Direction = flow.Ingress + flow.Direction(r.IntN(2))
		e.SrcAddr = netip.AddrFrom4([4]byte{10, 0, 0, byte(r.IntN(250))})
		e.DstAddr = netip.AddrFrom4([4]byte{192, 0, 2, byte(r.IntN(250))})
		switch r.IntN(10) {
		case 0:
			e.Protocol, e.ICMPType = flow.ProtoICMP, 8
		case 1, 2, 3:
			e.Protocol, e.SrcPort, e.DstPort = flow.ProtoUDP, uint16(32768+r.IntN(28000)), 53
		default:
			e.Protocol, e.SrcPort, e.DstPort = flow.ProtoTCP, uint16(32768+r.IntN(28000)), 443
		}
		if e.Type == flow.TypeEnd {
			e.End = e.Timestamp
			e.RxPackets, e.TxPackets = uint64(r.IntN(100)), uint64(r.IntN(100))
			e.RxBytes, e.TxBytes = e.RxPackets*uint64(40+r.IntN(1400)), e.TxPackets*uint64(40+r.IntN(1400))
		}
	}
	return evs
}

// BenchmarkWrite is the sink's Write of a 4,096-event batch to /dev/null (no fsync): JSON
// encoding and, per case, compression, with the batch cut into parts for the machine's CPUs.
// cpu-ns/event is the process's CPU time (all goroutines) per event.
func BenchmarkWrite(b *testing.B) {
	evs := benchEvents(4096)
	for _, tc := range []struct{ name, compression, level string }{
		{"none", "none", ""}, {"zstd-fastest", "zstd", "fastest"}, {"zstd-default", "zstd", "default"}, {"zstd-lines", "zstd", "lines"},
		{"gzip-fastest", "gzip", "fastest"}, {"gzip-default", "gzip", "default"},
	} {
		b.Run(tc.name, func(b *testing.B) {
			cfg := defaults()
			cfg.Path, cfg.Sync, cfg.Compression, cfg.CompressionLevel = "/dev/null", "none", tc.compression, tc.level
			s := New(env(b.TempDir()), cfg)
			if err := s.Start(context.Background()); err != nil {
				b.Fatal(err)
			}
			defer s.Close(context.Background())
			batch := flow.NewBatch(evs, nil)
			in, out := 0, s.written.Load()
			b.ReportAllocs()
			cpu := testenv.CPUNanos()
			for b.Loop() {
				if err := s.Write(context.Background(), batch); err != nil {
					b.Fatal(err)
				}
				in += len(evs)
			}
			b.ReportMetric(float64(testenv.CPUNanos()-cpu)/float64(in), "cpu-ns/event")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(in), "ns/event")
			b.ReportMetric(float64(s.written.Load()-out)/float64(in), "bytes/event")
		})
	}
}

// BenchmarkZstdOptions compresses 2,048 generated-like lines (one frame) on one goroutine,
// with the sink's lines encoder and with klauspost's encoder at SpeedFastest and with the
// options that trade its ratio for speed: CPU per event, compressed bytes per event, ratio.
func BenchmarkZstdOptions(b *testing.B) {
	evs := benchEvents(2048)
	enc := schema.Encoder{Format: schema.Flowpipe}
	var src []byte
	for i := range evs {
		src = enc.Append(src, &evs[i])
		src = append(src, '\n')
	}
	b.Run("lines", func(b *testing.B) {
		var dst []byte
		cpu := testenv.CPUNanos()
		n := 0
		for b.Loop() {
			dst = linesEncodeAll(src, dst[:0])
			n++
		}
		b.SetBytes(int64(len(src)))
		b.ReportMetric(float64(testenv.CPUNanos()-cpu)/float64(n*len(evs)), "cpu-ns/event")
		b.ReportMetric(float64(len(dst))/float64(len(evs)), "B/event")
		b.ReportMetric(float64(len(src))/float64(len(dst)), "ratio")
	})
	for _, tc := range []struct {
		name string
		opts []zstd.EOption
	}{
		{"fastest", nil},
		{"fastest-nocrc", []zstd.EOption{zstd.WithEncoderCRC(false)}},
		{"fastest-noentropy", []zstd.EOption{zstd.WithNoEntropyCompression(true)}},
		{"fastest-win64k", []zstd.EOption{zstd.WithWindowSize(1 << 16)}},
		{"fastest-lowmem", []zstd.EOption{zstd.WithLowerEncoderMem(true)}},
		{"fastest-all", []zstd.EOption{zstd.WithEncoderCRC(false), zstd.WithNoEntropyCompression(true), zstd.WithWindowSize(1 << 16), zstd.WithLowerEncoderMem(true)}},
		{"default", []zstd.EOption{zstd.WithEncoderLevel(zstd.SpeedDefault)}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			opts := append([]zstd.EOption{zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1)}, tc.opts...)
			if tc.name == "default" {
				opts = append([]zstd.EOption{zstd.WithEncoderConcurrency(1)}, tc.opts...)
			}
			z, _ := zstd.NewWriter(nil, opts...)
			var dst []byte
			cpu := testenv.CPUNanos()
			n := 0
			for b.Loop() {
				dst = z.EncodeAll(src, dst[:0])
				n++
			}
			b.SetBytes(int64(len(src)))
			b.ReportMetric(float64(testenv.CPUNanos()-cpu)/float64(n*len(evs)), "cpu-ns/event")
			b.ReportMetric(float64(len(dst))/float64(len(evs)), "B/event")
			b.ReportMetric(float64(len(src))/float64(len(dst)), "ratio")
		})
	}
}
