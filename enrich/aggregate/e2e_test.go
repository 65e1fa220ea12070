package aggregate_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/pipeline"
	"github.com/flowpipe/flowpipe/enrich/aggregate"
	"github.com/flowpipe/flowpipe/enrich/communityid"
	"github.com/flowpipe/flowpipe/enrich/resources"
	"github.com/flowpipe/flowpipe/sinks/discard"
	"github.com/flowpipe/flowpipe/sinks/file"
	"github.com/flowpipe/flowpipe/sources/generate"
)

// ackSource emits batches of TCP end events with known counters and records every ack, so
// the test can tell whether acknowledgement went end to end through the aggregator.
type ackSource struct {
	batches, size int
	mu            sync.Mutex
	acks          []error
}

func (s *ackSource) Run(ctx context.Context, out component.Emitter) error {
	for i := range s.batches {
		evs := make([]flow.Event, s.size)
		for k := range evs {
			evs[k] = flow.Event{
				Type: flow.TypeEnd, Protocol: flow.ProtoTCP, Direction: flow.Egress,
				SrcAddr: netip.MustParseAddr("100.64.0.1"), DstAddr: netip.AddrFrom4([4]byte{10, 0, 0, byte(k % 7)}),
				SrcPort: uint16(1000 + i), DstPort: 443, TxPackets: 1, TxBytes: 100,
			}
		}
		evs = append(evs, flow.Event{Type: flow.TypeStart, Protocol: 47, SrcAddr: netip.MustParseAddr("100.64.0.1"), DstAddr: netip.MustParseAddr("10.0.0.1")})
		b := flow.NewBatch(evs, func(err error) {
			s.mu.Lock()
			s.acks = append(s.acks, err)
			s.mu.Unlock()
		})
		if err := out.Emit(ctx, b); err != nil {
			return nil
		}
	}
	return nil
}

func run(t *testing.T, reg *component.Registry, yaml string) string {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "pipeline.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	doc, err := config.LoadFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := pipeline.New(context.Background(), doc, pipeline.Options{Registry: reg, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestEndToEnd runs the real runtime: a source → aggregate → the file sink (fsynced JSON
// lines). Every source batch must be acknowledged once, with success, and only because the
// aggregates carrying its events were written; the written aggregates must add up to the
// input, and the port-less GRE events must pass through.
func TestEndToEnd(t *testing.T) {
	src := &ackSource{batches: 40, size: 50}
	reg := component.NewRegistry()
	reg.Register(component.NewSourceFactory("acksource", "test source", func() *struct{} { return &struct{}{} },
		func(component.Env, *struct{}) (component.Source, error) { return src, nil }))
	reg.Register(aggregate.Factory())
	reg.Register(file.Factory())
	dir := run(t, reg, `
admin: {listen: ""}
sources:
  s: {type: acksource}
enrichers:
  - {type: aggregate, window: 1h}   # the shutdown flush closes the window (or an hour boundary)
sinks:
  out: {type: file, path: out.jsonl}
`)
	evs := componenttest.ReadJSONLines(t, filepath.Join(dir, "out.jsonl"))
	var gre int
	var ends, tx uint64
	keys := map[netip.Addr]bool{} // a window boundary during the test may split a key in two
	for _, ev := range evs {
		switch ev.Type {
		case flow.TypeAggregate:
			keys[ev.DstAddr] = true
			ends += ev.NumEnds
			tx += ev.TxPackets
			if ev.WindowStart == 0 || ev.WindowEnd < ev.WindowStart || ev.Source != "s" {
				t.Errorf("aggregate without its window or source: %+v", ev)
			}
		default:
			if ev.Protocol != 47 {
				t.Errorf("unexpected pass-through event %+v", ev)
			}
			gre++
		}
	}
	if len(keys) != 7 || ends != 40*50 || tx != 40*50 || gre != 40 {
		t.Errorf("got aggregates for %d keys (want 7) of %d ends, %d packets (want 2000 each), %d GRE (want 40)", len(keys), ends, tx, gre)
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	if len(src.acks) != 40 {
		t.Fatalf("%d batches acknowledged, want 40", len(src.acks))
	}
	for i, err := range src.acks {
		if err != nil {
			t.Errorf("ack %d: %v", i, err)
		}
	}
}

// TestGenerateResourcesAggregate is the pipeline an operator would write: the generate source,
// the resources enricher dropping DNS, and aggregation, into a file. Every generated flow has
// a start and an end event, so the aggregates must count as many starts as ends and no DNS.
func TestGenerateResourcesAggregate(t *testing.T) {
	reg := component.NewRegistry()
	for _, f := range []component.Factory{generate.Factory(), resources.Factory(), aggregate.Factory(), file.Factory()} {
		reg.Register(f)
	}
	dir := run(t, reg, `
admin: {listen: ""}
sources:
  gen: {type: generate, count: 20000, seed: 3, batch_size: 500}
enrichers:
  - type: resources
    dns_collection: false
    resources:
      - {id: web, prefixes: [198.51.100.0/24]}
    rules:
      - {id: r-web, protocols: [tcp], dst: [web]}
  - {type: aggregate, window: 50ms, by_rule_id: true}
sinks:
  out: {type: file, path: out.jsonl}
`)
	var starts, ends uint64
	var web int
	for _, ev := range componenttest.ReadJSONLines(t, filepath.Join(dir, "out.jsonl")) {
		if ev.Type != flow.TypeAggregate {
			t.Fatalf("generate emits only TCP, UDP and ICMP; %v passed through", ev.Type)
		}
		if (ev.Protocol == flow.ProtoUDP || ev.Protocol == flow.ProtoTCP) && ev.DstPort == 53 {
			t.Errorf("a DNS flow was not filtered: %+v", ev)
		}
		if ev.RuleID == "r-web" {
			web++
			if ev.DstResourceID != "web" || ev.Protocol != flow.ProtoTCP {
				t.Errorf("r-web aggregate for %v proto %d resource %q", ev.DstAddr, ev.Protocol, ev.DstResourceID)
			}
		}
		starts += ev.NumStarts
		ends += ev.NumEnds
	}
	if starts == 0 || starts != ends || web == 0 {
		t.Errorf("aggregates count %d starts and %d ends (%d for r-web); want equal and non-zero", starts, ends, web)
	}
}

// BenchmarkPipeline runs b.N generated events through the real runtime into the discard
// sink, with and without the enrichers, so that their cost shows as a ratio measured in one
// run: events/s is the throughput of the whole pipeline.
func BenchmarkPipeline(b *testing.B) {
	reg := component.NewRegistry()
	for _, f := range []component.Factory{generate.Factory(), resources.Factory(), aggregate.Factory(),
		communityid.Factory(), discard.Factory()} {
		reg.Register(f)
	}
	const tables = `
    overlay: [10.0.0.0/24, "fd00:f10e::/32"]
    resources:
      - {id: web, prefixes: [198.51.100.0/24]}
      - {id: docs, prefixes: [203.0.113.0/25]}
    routes: [{prefix: 0.0.0.0/0}, {prefix: "::/0"}]
    rules:
      - {id: r-web, protocols: [tcp], dst: [web], ports: [80, 443]}
      - {id: r-dns, protocols: [udp], ports: [53]}
      - {id: r-docs, dst: [docs]}
      - {id: r-in, direction: ingress}`
	for _, tc := range []struct{ name, enrichers string }{
		{"none", ""},
		{"resources", "enrichers:\n  - type: resources" + tables},
		{"community_id", "enrichers:\n  - type: community_id"},
		{"aggregate", "enrichers:\n  - {type: aggregate, window: 1s}"},
		{"resources+community_id+aggregate", "enrichers:\n  - type: resources" + tables +
			"\n  - type: community_id\n  - {type: aggregate, window: 1s}"},
	} {
		b.Run(tc.name, func(b *testing.B) {
			doc, err := config.Load(filepath.Join(b.TempDir(), "pipeline.yaml"), []byte(fmt.Sprintf(`
admin: {listen: ""}
sources:
  gen: {type: generate, count: %d, batch_size: 1024, seed: 1}
%s
sinks:
  out: {type: discard}
`, b.N, tc.enrichers)), nil)
			if err != nil {
				b.Fatal(err)
			}
			p, err := pipeline.New(context.Background(), doc, pipeline.Options{Registry: reg, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			if err := p.Run(context.Background()); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
		})
	}
}
