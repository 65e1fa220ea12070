package jetstream_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/logcodec"
	"github.com/flowpipe/flowpipe/internal/testenv"
	jssink "github.com/flowpipe/flowpipe/sinks/jetstream"
)

// countingEmitter acknowledges every batch and counts its events.
type countingEmitter struct{ n atomic.Int64 }

func (c *countingEmitter) Emit(_ context.Context, b *flow.Batch) error {
	c.n.Add(int64(len(b.Events)))
	b.Release(nil)
	return nil
}

// BenchmarkLogTier is sink → 3-node R3 stream → source, in one process, per format:
// 200,000 events in batches of 2000 written by 4 writers, until the source has them all.
//
//	go test -run '^$' -bench BenchmarkLogTier -benchtime 1x ./sources/jetstream
func BenchmarkLogTier(b *testing.B) {
	cl := testenv.StartNATSCluster(b, 3, testenv.NATSAuth{})
	const total, batch = 200_000, 2000
	in := events(total)
	for _, f := range logcodec.Formats {
		b.Run(string(f), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				stream := "BENCH_" + strings.ToUpper(string(f))
				c := jssink.Factory().NewConfig().(*jssink.Config)
				c.Servers, c.Stream, c.Subject, c.Format = cl.URLs(), stream, "bench."+string(f), string(f)
				c.CreateStream = &jssink.StreamConfig{Replicas: 3}
				if err := c.Validate(); err != nil {
					b.Fatal(err)
				}
				sink, _ := jssink.New(component.Env{Name: "log"}, c)
				if err := sink.Start(context.Background()); err != nil {
					b.Fatal(err)
				}
				sc := sourceConfigB(b, cl.URLs(), stream)
				src := newSourceB(b, sc)
				var got countingEmitter
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan struct{})
				go func() { src.Run(ctx, &got); close(done) }()
				start := time.Now()
				work := make(chan int)
				errs := make(chan error, 4)
				for range 4 {
					go func() {
						for off := range work {
							if err := sink.Write(context.Background(), flow.NewBatch(in[off:off+batch], nil)); err != nil {
								errs <- err
								return
							}
						}
						errs <- nil
					}()
				}
				for off := 0; off < total; off += batch {
					work <- off
				}
				close(work)
				for range 4 {
					if err := <-errs; err != nil {
						b.Fatal(err)
					}
				}
				written := time.Since(start)
				for got.n.Load() < total {
					time.Sleep(time.Millisecond)
				}
				all := time.Since(start)
				cancel()
				<-done
				src.Close(context.Background())
				sink.Close(context.Background())
				b.ReportMetric(float64(total)/written.Seconds(), "published_events/s")
				b.ReportMetric(float64(total)/all.Seconds(), "end_to_end_events/s")
			}
		})
	}
}
