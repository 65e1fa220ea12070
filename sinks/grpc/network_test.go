package grpcsink_test

import (
	"context"
	"testing"
	"time"

	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

// TestNetworkDropsExactlyOnce cuts every connection between agent and collector several
// times while 100,000 events stream: the sink reconnects and resends what was not ACKed, the
// receiver drops what it already has, and every event reaches the collector exactly once.
func TestNetworkDropsExactlyOnce(t *testing.T) { eachProtocol(t, testNetworkDropsExactlyOnce) }

func testNetworkDropsExactlyOnce(t *testing.T, protocol string) {
	em := newMemEmitter()
	r := startReceiver(t, &grpcsrc.Config{Auth: "none"}, em)
	px := newProxy(t, r.Addr().String())
	s := newSink(t, &grpcsink.Config{Protocol: protocol, URL: "http://" + px.Addr(), MaxInFlight: 5000})
	events := makeEvents(100_000)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	done := make(chan struct{})
	go func() {
		defer close(done)
		writeAll(ctx, t, s, events, 500, 4)
	}()
	// Cut whenever another fifth of the events has arrived, while the writers still run.
	cuts := 0
	for next := len(events) / 5; next < len(events); next += len(events) / 5 {
	wait:
		for {
			if d, _ := em.counts(); d >= next {
				break
			}
			select {
			case <-em.change:
			case <-done:
				break wait
			}
		}
		px.Cut()
		cuts++
	}
	<-done
	distinct, total := em.counts()
	if distinct != len(events) {
		t.Fatalf("collector has %d distinct events of %d", distinct, len(events))
	}
	if total != len(events) {
		t.Fatalf("collector got %d events for %d distinct: duplicates reached the pipeline", total, len(events))
	}
	t.Logf("%d cuts; %d events exactly once", cuts, total)
}
