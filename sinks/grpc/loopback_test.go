package grpcsink_test

import (
	"context"
	"testing"
	"time"

	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

func TestLoopbackExactlyOnce(t *testing.T) { eachProtocol(t, testLoopbackExactlyOnce) }

func testLoopbackExactlyOnce(t *testing.T, protocol string) {
	em := newMemEmitter()
	r := startReceiver(t, &grpcsrc.Config{Auth: "none"}, em)
	s := newSink(t, &grpcsink.Config{Protocol: protocol, URL: "http://" + r.Addr().String()})
	events := makeEvents(100_000)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	writeAll(ctx, t, s, events, 1000, 4)
	distinct, total := em.counts()
	if distinct != len(events) || total != len(events) {
		t.Fatalf("collector got %d distinct events, %d in all; want %d exactly once", distinct, total, len(events))
	}
}
