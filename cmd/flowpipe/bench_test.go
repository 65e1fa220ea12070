package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/pipeline"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// benchPipeline runs a whole in-process pipeline of b.N generated events through the real
// runtime and reports events/s. The whole-binary version is scripts/bench-pipeline.sh.
func benchPipeline(b *testing.B, sinkYAML string) {
	benchPipelineBatch(b, 1024, sinkYAML)
}

func benchPipelineBatch(b *testing.B, batchSize int, sinkYAML string) {
	// generate's count must be even (a start and an end per flow): b.N rounded up.
	dir := b.TempDir()
	doc, err := config.Load(filepath.Join(dir, "pipeline.yaml"), []byte(fmt.Sprintf(`
admin: {listen: ""}
sources:
  gen: {type: generate, count: %d, batch_size: %d, seed: 1}
sinks:
  out: %s
`, (b.N+1)&^1, batchSize, sinkYAML)), nil)
	if err != nil {
		b.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	p, err := pipeline.New(context.Background(), doc, pipeline.Options{Registry: newRegistry(), Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := testenv.CPUNanos()
	if err := p.Run(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(testenv.CPUNanos()-cpu0)/float64(b.N), "cpu-ns/event")
	// What a file sink wrote (flows.jsonl, flows.jsonl.zst, ...) per event.
	if files, _ := filepath.Glob(filepath.Join(dir, "flows.*")); len(files) > 0 {
		var size int64
		for _, f := range files {
			if st, err := os.Stat(f); err == nil {
				size += st.Size()
			}
		}
		b.ReportMetric(float64(size)/float64(b.N), "file-bytes/event")
	}
}

func BenchmarkPipelineGenerateToDiscard(b *testing.B) {
	benchPipeline(b, "{type: discard, isolation: inproc}")
}

func BenchmarkPipelineGenerateToFile(b *testing.B) {
	benchPipeline(b, "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0}")
}

func BenchmarkPipelineGenerateToFileNoSync(b *testing.B) {
	benchPipeline(b, "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none}")
}

// Compressed files, fsync per batch: one zstd frame or gzip member per batch; with two
// batches in flight, one is compressed while the other is written and fsynced.
// The default level is the sink's own encoder (lines); BenchmarkPipelineGenerateToFileZstdFastest
// is klauspost's SpeedFastest.
func BenchmarkPipelineGenerateToFileZstd(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl.zst, max_size: 0, compression: zstd, in_flight: 2}")
}

func BenchmarkPipelineGenerateToFileZstdFastest(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl.zst, max_size: 0, compression: zstd, compression_level: fastest, in_flight: 2}")
}

// The same with the sink's own zstd encoder for JSON lines (compression_level: lines).
func BenchmarkPipelineGenerateToFileZstdLines(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl.zst, max_size: 0, compression: zstd, compression_level: lines, in_flight: 2}")
}

// The same with one batch in flight (the default, which keeps the order of batches): a
// batch's parts are still compressed in parallel. klauspost's SpeedFastest.
func BenchmarkPipelineGenerateToFileZstdInFlight1(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl.zst, max_size: 0, compression: zstd, compression_level: fastest}")
}

// sync: interval: acknowledged once written, fsynced every 100ms.
func BenchmarkPipelineGenerateToFileSyncInterval(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: interval}")
}

func BenchmarkPipelineGenerateToFileGzip(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl.gz, max_size: 0, compression: gzip, in_flight: 2}")
}

// Group commit: two batches in flight, so one is encoded and written while the other's
// fsync runs, and larger batches to amortise each fsync.
func BenchmarkPipelineGenerateToFileGroupCommit(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, in_flight: 2}")
}

// The same shapes with the sink's queue on disk: every batch is written (and, with
// sync: batch, fsynced) into the queue, then read back and written by the sink.
func BenchmarkPipelineGenerateToDiscardDiskQueue(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: discard, isolation: inproc, queue: {type: disk, path: q, max_size: 64GiB}}")
}

func BenchmarkPipelineGenerateToFileNoSyncMemoryQueue(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none}")
}

func BenchmarkPipelineGenerateToFileNoSyncDiskQueue(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none, queue: {type: disk, path: q, max_size: 64GiB}}")
}

func BenchmarkPipelineGenerateToFileNoSyncDiskQueueInterval(b *testing.B) {
	benchPipelineBatch(b, 4096, "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none, queue: {type: disk, path: q, max_size: 64GiB, sync: interval}}")
}
