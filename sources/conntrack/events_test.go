package conntrack

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/netns"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// The event socket waits in ppoll, outside Go's poller: a wait ends at the deadline, when
// another goroutine sets a deadline that has passed (how Reconfigure wakes the reader), and
// when the socket is closed; and it reads the events the kernel sends.
func TestEventConnWaits(t *testing.T) {
	testenv.RequireRoot(t)
	p := testenv.NewPair(t)
	ns, err := netns.Open(p.A)
	must(t, err)
	defer ns.Close()
	ev, err := openEvents(ns, 1<<20, slog.New(slog.DiscardHandler))
	must(t, err)
	r := newRecvBatch()

	if _, err := ev.recv(r, false); !errors.Is(err, errIdle) {
		t.Fatalf("recv without waiting on an empty socket: %v, want errIdle", err)
	}
	_ = ev.setDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := ev.recv(r, true); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("recv past its deadline: %v, want os.ErrDeadlineExceeded", err)
	}

	// wait runs a waiting recv and returns what it ended with, within a bound.
	wait := func(what string, interrupt func()) error {
		t.Helper()
		_ = ev.setDeadline(time.Now().Add(time.Hour))
		done := make(chan error, 1)
		go func() { _, err := ev.recv(r, true); done <- err }()
		interrupt()
		select {
		case err := <-done:
			return err
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: a waiting recv did not return", what)
			return nil
		}
	}
	// A NEW event: the flow the namespace's conntrack sees once something tracks it.
	p.Exec(t, p.A, "nft", "add table inet fpwait; add chain inet fpwait c { type filter hook output priority 0; }; add rule inet fpwait c ct state new counter")
	err = wait("an event", func() {
		srv, stop := udpEcho(t, p, p.B, "[::]:0")
		defer stop()
		udpExchange(t, p.A, &net.UDPAddr{IP: net.ParseIP(p.B4), Port: srv.Port}, 1, 10)
	})
	if err != nil {
		t.Fatalf("recv of an event: %v", err)
	}
	for { // drain what the exchange queued
		if _, err := ev.recv(r, false); errors.Is(err, errIdle) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if err := wait("a passed deadline", func() { _ = ev.setDeadline(time.Now()) }); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("recv woken by a deadline set to now: %v, want os.ErrDeadlineExceeded", err)
	}
	if err := wait("close", ev.close); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("recv woken by close: %v, want net.ErrClosed", err)
	}
	if _, err := ev.recv(r, false); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("recv after close: %v, want net.ErrClosed", err)
	}
	ev.close() // twice is harmless
}
