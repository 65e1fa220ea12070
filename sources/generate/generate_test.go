package generate

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
)

func TestCountedRunIsRealisticAndBalanced(t *testing.T) {
	env := component.Env{Name: "g", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Metrics: component.NopMetrics{}}
	out := &componenttest.Collector{}
	if err := New(env, &Config{Count: 10_000, BatchSize: 256, Flows: 300, Seed: 3}).Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	events := out.Events()
	if len(events) < 10_000 || len(events) > 10_300 {
		t.Fatalf("%d events, want 10,000 plus the ends of at most 300 open flows", len(events))
	}
	ids := map[[16]byte]bool{}
	open := map[[16]byte]flow.Event{}
	protos := map[uint8]int{}
	v6 := 0
	for _, e := range events {
		if ids[e.EventID] {
			t.Fatalf("event ID %s twice", e.EventID)
		}
		ids[e.EventID] = true
		switch e.Type {
		case flow.TypeStart:
			open[e.FlowID] = e
			protos[e.Protocol]++
			if e.SrcAddr.Is6() {
				v6++
			}
		case flow.TypeEnd:
			s, ok := open[e.FlowID]
			if !ok {
				t.Fatalf("end without a start: %+v", e)
			}
			if e.SrcAddr != s.SrcAddr || e.DstPort != s.DstPort || e.TxPackets == 0 || e.RxBytes == 0 || e.End < e.Start {
				t.Fatalf("end does not continue its start or lacks counters:\nstart %+v\nend   %+v", s, e)
			}
			delete(open, e.FlowID)
		default:
			t.Fatalf("unexpected type %v", e.Type)
		}
		if flow.IsICMP(e.Protocol) && (e.SrcPort != 0 || e.DstPort != 0) {
			t.Fatalf("ICMP event with ports: %+v", e)
		}
	}
	if len(open) != 0 {
		t.Fatalf("%d flows never ended", len(open))
	}
	if protos[flow.ProtoTCP] == 0 || protos[flow.ProtoUDP] == 0 || protos[flow.ProtoICMP]+protos[flow.ProtoICMPv6] == 0 || v6 == 0 {
		t.Fatalf("not a realistic mix: protocols %v, IPv6 flows %d", protos, v6)
	}
}

// count is the number of events, exactly, and the last of them end the open flows.
func TestCountIsExact(t *testing.T) {
	env := component.Env{Name: "g", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Metrics: component.NopMetrics{}}
	for _, c := range []Config{{Count: 1000, BatchSize: 1024, Flows: 4096}, {Count: 10_000, BatchSize: 1024, Flows: 4096}, {Count: 2, BatchSize: 1, Flows: 1}} {
		out := &componenttest.Collector{}
		if err := New(env, &c).Run(context.Background(), out); err != nil {
			t.Fatal(err)
		}
		open := map[[16]byte]bool{}
		events := out.Events()
		for _, e := range events {
			if e.Type == flow.TypeStart {
				open[e.FlowID] = true
			} else {
				delete(open, e.FlowID)
			}
		}
		if int64(len(events)) != c.Count || len(open) != 0 {
			t.Errorf("count %d: %d events, %d flows left open", c.Count, len(events), len(open))
		}
	}
	c := &Config{Count: 1001, BatchSize: 1, Flows: 1}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "count: must be even") {
		t.Errorf("odd count: %v", err)
	}
}
