package grpcsink_test

import (
	"context"
	"testing"
	"time"

	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
)

// With urls, the sink keeps its stream on one collector and moves to another when that one
// stops; every event is ACKed, by one collector or the other.
func TestURLsFailOverToALiveCollector(t *testing.T) {
	eachProtocol(t, testURLsFailOverToALiveCollector)
}

func testURLsFailOverToALiveCollector(t *testing.T, protocol string) {
	m1, m2 := newMemEmitter(), newMemEmitter()
	r1 := startReceiver(t, &grpcsrc.Config{Auth: "none"}, m1)
	r2 := startReceiver(t, &grpcsrc.Config{Auth: "none"}, m2)
	def := grpcsink.Factory().NewConfig().(*grpcsink.Config)
	def.Protocol = protocol
	def.URLs = []string{"http://" + r1.Addr().String(), "http://" + r2.Addr().String()}
	def.ReconnectMin, def.ReconnectMax = 20*time.Millisecond, 200*time.Millisecond
	if err := def.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := grpcsink.New(component.Env{Name: "agent"}, def)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	first := makeEvents(2000)
	if err := s.Write(context.Background(), flow.NewBatch(first, nil)); err != nil {
		t.Fatal(err)
	}
	d1, _ := m1.counts()
	d2, _ := m2.counts()
	if d1+d2 != 2000 || (d1 != 0 && d2 != 0) {
		t.Fatalf("first batch: %d events at collector 1, %d at collector 2; want all 2000 at one", d1, d2)
	}
	used, otherMem := r1, m2
	if d2 != 0 {
		used, otherMem = r2, m1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	used.Close(ctx)
	cancel()
	second := makeEvents(2000)
	wctx, wcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer wcancel()
	if err := s.Write(wctx, flow.NewBatch(second, nil)); err != nil {
		t.Fatalf("write after the collector stopped: %v", err)
	}
	if d, _ := otherMem.counts(); d != 2000 {
		t.Fatalf("%d events at the live collector, want the 2000 written after the other stopped", d)
	}
}
