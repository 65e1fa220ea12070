package grpc_test

import (
	"context"
	"testing"
	"time"

	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

// BenchmarkSinkToReceiver measures events/s from the sink to the receiver over loopback,
// each event one message and ACKed one by one, the receiver's pipeline replaced by an
// emitter that acknowledges at once.
func BenchmarkSinkToReceiver(b *testing.B) {
	em := newMemEmitter()
	r := startReceiver(b, &grpcsrc.Config{Auth: "none"}, em)
	s := newSink(b, &grpcsink.Config{URL: "http://" + r.Addr().String()})
	const n = 200_000
	events := makeEvents(n)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	b.ResetTimer()
	start := time.Now()
	total := 0
	for b.Loop() {
		// Fresh IDs each round, or the receiver would take them for duplicates.
		b.StopTimer()
		events = makeEvents(n)
		b.StartTimer()
		writeAll(ctx, b, s, events, 1000, 4)
		total += n
	}
	b.ReportMetric(float64(total)/time.Since(start).Seconds(), "events/s")
}
