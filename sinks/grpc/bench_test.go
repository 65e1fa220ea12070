package grpcsink_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/pipeline"
	"github.com/flowpipe/flowpipe/internal/flowwire"
	"github.com/flowpipe/flowpipe/internal/testenv"
	pb "github.com/flowpipe/flowpipe/proto/flow"
	"github.com/flowpipe/flowpipe/sinks/file"
	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	"github.com/flowpipe/flowpipe/sources/generate"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

const benchSecret = "bench-secret-0123456789abcdef"

func benchRegistry() *component.Registry {
	reg := component.NewRegistry()
	for _, f := range []component.Factory{grpcsrc.Factory(), grpcsink.Factory(), generate.Factory(), file.Factory()} {
		reg.Register(f)
	}
	return reg
}

// runPipeline builds a pipeline from yaml in dir and runs it until ctx ends; the returned
// channel closes when Run returns.
func runPipeline(b *testing.B, ctx context.Context, dir, yaml string) <-chan error {
	b.Helper()
	doc, err := config.Load(filepath.Join(dir, "pipeline.yaml"), []byte(yaml), nil)
	if err != nil {
		b.Fatal(err)
	}
	p, err := pipeline.New(ctx, doc, pipeline.Options{Registry: benchRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	return done
}

// startCollector runs a collector pipeline (grpc source → file sink, fsync per batch) in
// this process and returns its address.
func startCollector(b *testing.B) string {
	b.Helper()
	addr := testenv.FreeTCPAddr(b)
	ctx, cancel := context.WithCancel(context.Background())
	done := runPipeline(b, ctx, b.TempDir(), fmt.Sprintf(`
admin: {listen: ""}
sources:
  agents: {type: grpc, isolation: inproc, listen: %q, auth: hmac, secrets: [%q]}
sinks:
  out: {type: file, isolation: inproc, in_flight: 4, path: flows.jsonl, max_size: 0}
`, addr, benchSecret))
	b.Cleanup(func() { cancel(); <-done })
	waitListening(b, addr)
	return addr
}

// BenchmarkAgentToCollector: an agent pipeline (generate → grpc sink) streams b.N events to a
// collector pipeline (grpc source → file sink) over loopback, over each protocol: flowpipe's
// (a run of events per message, an ACK per message) and NetBird's (an event per message, an
// ACK per event). Events are ACKed once the collector's file sink has fsynced them.
func BenchmarkAgentToCollector(b *testing.B) {
	for _, protocol := range []string{"flowpipe", "netbird"} {
		b.Run(protocol, func(b *testing.B) {
			addr := startCollector(b)
			b.ResetTimer()
			cpu0 := cpuTime()
			n := b.N + b.N%2 // generate makes starts and ends: an even count
			err := <-runPipeline(b, context.Background(), b.TempDir(), fmt.Sprintf(`
admin: {listen: ""}
sources:
  gen: {type: generate, isolation: inproc, count: %d, batch_size: 1024, seed: 1}
sinks:
  collector: {type: grpc, isolation: inproc, in_flight: 16, protocol: %s, url: "http://%s", hmac_secret: %q}
`, n, protocol, addr, benchSecret))
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			report(b, cpu0)
		})
	}
}

// BenchmarkNetBirdClientToReceiver: NetBird's client (as in BenchmarkNetBirdClientToCollector)
// into a receiver whose pipeline acknowledges at once: what a NetBird client can get out of a
// collector that costs nothing behind it.
func BenchmarkNetBirdClientToReceiver(b *testing.B) {
	r := startReceiver(b, &grpcsrc.Config{Auth: "hmac", Secrets: []string{benchSecret}}, newMemEmitter())
	netbirdClientRun(b, r.Addr().String())
}

// BenchmarkNetBirdClientToCollector: a client as NetBird's sends events — generated code,
// the standard protobuf codec, one event per message, ACKs read on the side — to the same
// collector.
func BenchmarkNetBirdClientToCollector(b *testing.B) {
	netbirdClientRun(b, startCollector(b))
}

// netbirdClientRun streams b.N events to addr as NetBird's client does and waits for every ACK.
func netbirdClientRun(b *testing.B, addr string) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	tok := flowwire.MintToken([]byte(benchSecret), time.Now().Add(time.Hour))
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", tok.Authorization())
	stream, err := pb.NewFlowServiceClient(conn).Events(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if err := stream.Send(&pb.FlowEvent{IsInitiator: true}); err != nil {
		b.Fatal(err)
	}
	if md, err := stream.Header(); err != nil || len(md) == 0 {
		b.Fatalf("no headers: %v", err)
	}
	events := makeEvents(b.N)
	acked := make(chan error, 1)
	b.ResetTimer()
	cpu0 := cpuTime()
	go func() {
		n := 0
		for n < b.N {
			ack, err := stream.Recv()
			if err != nil {
				acked <- err
				return
			}
			if !ack.IsInitiator {
				n++
			}
		}
		acked <- nil
	}()
	for i := range events {
		e := &events[i]
		msg := netbirdEvent(e)
		if err := stream.Send(msg); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-acked; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	report(b, cpu0)
}

// BenchmarkSinkToReceiver isolates the transport: the sink writes batches of 1,000 (four in
// flight) to a receiver whose pipeline acknowledges at once, over each protocol.
func BenchmarkSinkToReceiver(b *testing.B) {
	for _, protocol := range []string{"flowpipe", "netbird"} {
		b.Run(protocol, func(b *testing.B) {
			em := newMemEmitter()
			r := startReceiver(b, &grpcsrc.Config{Auth: "none"}, em)
			s := newSink(b, &grpcsink.Config{Protocol: protocol, URL: "http://" + r.Addr().String()})
			events := makeEvents(b.N)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			b.ResetTimer()
			cpu0 := cpuTime()
			writeAll(ctx, b, s, events, 1000, 4)
			b.StopTimer()
			report(b, cpu0)
		})
	}
}

// netbirdEvent is e as NetBird's client builds it, in the generated struct.
func netbirdEvent(e *flow.Event) *pb.FlowEvent {
	return &pb.FlowEvent{
		EventId: e.EventID[:], Timestamp: timestamppb.New(e.Timestamp.Time()), PublicKey: []byte("peer"),
		FlowFields: &pb.FlowFields{
			FlowId: e.FlowID[:], Type: pb.Type_TYPE_START, Direction: pb.Direction_EGRESS, Protocol: uint32(e.Protocol),
			SourceIp: e.SrcAddr.AsSlice(), DestIp: e.DstAddr.AsSlice(), RuleId: []byte(e.RuleID),
			ConnectionInfo: &pb.FlowFields_PortInfo{PortInfo: &pb.PortInfo{SourcePort: uint32(e.SrcPort), DestPort: uint32(e.DstPort)}},
			RxPackets:      e.RxPackets, TxBytes: e.TxBytes,
		},
	}
}

// cpuTime is the CPU time (user + system) this process has used: both ends run in it, so
// CPU per event is the cost of the whole path, independent of how busy the machine is.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func report(b *testing.B, cpu0 time.Duration) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N)/1e3, "cpu-µs/event")
}
