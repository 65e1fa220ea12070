package diskqueue

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
)

// BenchmarkAppend measures writing batches of 1024 events into a disk queue, each fsynced
// (sync: batch) or left to the interval syncer.
func BenchmarkAppend(b *testing.B) {
	for _, mode := range []string{SyncBatch, SyncInterval} {
		b.Run("sync="+mode, func(b *testing.B) {
			q, err := Open(Options{Dir: b.TempDir(), MaxSize: 1 << 40, Sync: mode, Logger: quiet()})
			if err != nil {
				b.Fatal(err)
			}
			defer q.Close()
			evs := events(0, 1024)
			b.ResetTimer()
			for b.Loop() {
				if err := q.Append(context.Background(), evs); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*len(evs))/b.Elapsed().Seconds(), "events/s")
		})
	}
}

// BenchmarkAppendAsync is one source emitting batch after batch as the pipeline does with
// sync: batch: each batch is acknowledged after an fsync, but the source does not wait for
// it, so batches written during one fsync share the next.
func BenchmarkAppendAsync(b *testing.B) {
	q, err := Open(Options{Dir: b.TempDir(), MaxSize: 1 << 40, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	evs := events(0, 1024)
	var wg sync.WaitGroup
	for b.Loop() {
		wg.Add(1)
		if err := q.AppendAsync(context.Background(), evs, func(error) { wg.Done() }); err != nil {
			b.Fatal(err)
		}
	}
	wg.Wait()
	b.ReportMetric(float64(b.N*len(evs))/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkAppendParallel is several sources appending at once: their fsyncs are shared
// (group commit).
func BenchmarkAppendParallel(b *testing.B) {
	q, err := Open(Options{Dir: b.TempDir(), MaxSize: 1 << 40, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		evs := events(0, 1024)
		for pb.Next() {
			if err := q.Append(context.Background(), evs); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N*1024)/b.Elapsed().Seconds(), "events/s")
}

// filledQueue opens a queue, closed at the benchmark's end, holding b.N records of the same
// 1024 events (which it returns).
func filledQueue(b *testing.B) (*Queue, []flow.Event) {
	b.Helper()
	q, err := Open(Options{Dir: b.TempDir(), MaxSize: 1 << 40, Sync: SyncInterval, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { q.Close() })
	evs := events(0, 1024)
	for range b.N {
		if err := q.Append(context.Background(), evs); err != nil {
			b.Fatal(err)
		}
	}
	return q, evs
}

// BenchmarkDrain reads back and confirms batches of 1024 events written before the timer.
func BenchmarkDrain(b *testing.B) {
	q, evs := filledQueue(b)
	b.ResetTimer()
	for range b.N {
		bt := q.Next(context.Background())
		bt.Release(nil)
	}
	b.ReportMetric(float64(b.N*len(evs))/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkDrainBacklog writes a backlog (FLOWPIPE_BENCH_BACKLOG events, default 10
// million), reopens the queue as a restarted flowpipe would, and drains it, reporting
// events/s and the process's peak RSS. Run it with -benchtime=1x.
func BenchmarkDrainBacklog(b *testing.B) {
	total := 10_000_000
	if s := os.Getenv("FLOWPIPE_BENCH_BACKLOG"); s != "" {
		total, _ = strconv.Atoi(s)
	}
	for range b.N {
		b.StopTimer()
		dir := b.TempDir()
		q, err := Open(Options{Dir: dir, MaxSize: 1 << 40, SegmentSize: 64 << 20, Sync: SyncInterval, Logger: quiet()})
		if err != nil {
			b.Fatal(err)
		}
		const size = 1024
		evs := events(0, size)
		for n := 0; n < total; n += size {
			if err := q.Append(context.Background(), evs); err != nil {
				b.Fatal(err)
			}
		}
		bytesOnDisk := q.Stats().Bytes
		q.Close()
		b.StartTimer()
		t0 := time.Now()
		q, err = Open(Options{Dir: dir, MaxSize: 1 << 40, Logger: quiet()})
		if err != nil {
			b.Fatal(err)
		}
		opened := time.Since(t0)
		q.CloseWrites()
		got := 0
		for {
			bt := q.Next(context.Background())
			if bt == nil {
				break
			}
			got += len(bt.Events)
			bt.Release(nil)
		}
		q.Close()
		b.StopTimer()
		if got < total {
			b.Fatalf("drained %d of %d", got, total)
		}
		el := time.Since(t0)
		b.ReportMetric(float64(got)/el.Seconds(), "events/s")
		b.ReportMetric(opened.Seconds()*1000, "open-ms")
		b.ReportMetric(float64(bytesOnDisk)/(1<<20), "backlog-MiB")
		b.ReportMetric(peakRSS()/(1<<20), "peak-RSS-MiB")
	}
}

// peakRSS is the process's high-water resident set size (VmHWM), in bytes.
func peakRSS() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range bytes.Split(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(l, []byte("VmHWM:")); ok {
			kb, _ := strconv.Atoi(string(bytes.TrimSpace(bytes.TrimSuffix(bytes.TrimSpace(v), []byte("kB")))))
			return float64(kb) * 1024
		}
	}
	return 0
}

// BenchmarkDrainEncoded is BenchmarkDrain by NextEncoded, as a sink's disk queue reads: the
// payload validated and handed on in its read buffer (what a sink plugin is sent), then,
// for an in-process sink, decoded once; "copy" hands on a copy of the payload instead and
// gives the read buffer back at once, the alternative to keeping the buffer until the ack.
func BenchmarkDrainEncoded(b *testing.B) {
	for _, mode := range []string{"pass", "copy", "decode"} {
		b.Run(mode, func(b *testing.B) {
			q, evs := filledQueue(b)
			b.ReportAllocs()
			b.ResetTimer()
			var sink []byte
			for range b.N {
				bt := q.NextEncoded(context.Background())
				switch mode {
				case "copy":
					sink = append([]byte(nil), bt.Encoded()...)
				case "decode":
					if err := bt.Decode(); err != nil {
						b.Fatal(err)
					}
				}
				bt.Release(nil)
			}
			_ = sink
			b.ReportMetric(float64(b.N*len(evs))/b.Elapsed().Seconds(), "events/s")
		})
	}
}
