package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/pipeline"
	"github.com/flowpipe/flowpipe/core/tap"
)

// BenchmarkPipelineTap measures what tap points cost the in-process runtime (generate ->
// discard, four tap points: the source, the fan-out and the sink, 1,024-event batches): with
// the rings off and nobody tapping, with the default ring, and with one subscriber that
// takes everything, whose filter matches nothing, or that never reads. docs/benchmarks.md has the figures.
func BenchmarkPipelineTap(b *testing.B) {
	for _, c := range []struct {
		name   string
		ring   int
		filter string // "" no subscriber
	}{{"rings-off", 0, ""}, {"ring-256", 256, ""}, {"ring-256+tap-none-match", 256, "port=1 proto=icmp"}, {"ring-256+tap-all", 256, "*"}, {"ring-256+stuck-tap", 256, "stuck"}} {
		b.Run(c.name, func(b *testing.B) {
			doc, err := config.Load(filepath.Join(b.TempDir(), "pipeline.yaml"), []byte(fmt.Sprintf(`
admin: {listen: ""}
sources:
  gen: {type: generate, count: %d, batch_size: 1024, seed: 1}
sinks:
  out: {type: discard, isolation: inproc}
`, b.N)), nil)
			if err != nil {
				b.Fatal(err)
			}
			taps := tap.NewRegistry(c.ring)
			log := slog.New(slog.NewTextHandler(io.Discard, nil))
			p, err := pipeline.New(context.Background(), doc, pipeline.Options{Registry: newRegistry(), Logger: log, Taps: taps})
			if err != nil {
				b.Fatal(err)
			}
			if c.filter != "" {
				var f *tap.Filter
				if c.filter != "*" && c.filter != "stuck" {
					f, _ = tap.ParseFilter([]string{c.filter})
				}
				h, _ := taps.Lookup(tap.Fanout)
				sub, _ := h.Subscribe(f, 8192, false, 0, 0)
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				defer sub.Close()
				go func() {
					if c.filter == "stuck" {
						return // never reads: its buffer fills, then every event is skipped
					}
					for {
						if _, _, err := sub.Next(ctx); err != nil {
							return
						}
					}
				}()
			}
			b.ReportAllocs()
			b.ResetTimer()
			if err := p.Run(context.Background()); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
		})
	}
}
