package userspace

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// TestLiveReconfigureKeepsOpenConnections reconfigures a live capture while a TCP
// connection is open (snaplen, promiscuous, timeouts, batch shape, local_prefixes): the
// connection is not forgotten, so it has one start and one end with one flow ID, its end
// counts the packets from before and after the change, and comes by the new timeouts.
func TestLiveReconfigureKeepsOpenConnections(t *testing.T) {
	testenv.RequireRoot(t)
	p := testenv.NewPair(t)
	s, err := New(testEnv(t), func() *Config {
		c := defaults()
		c.Interface, c.Netns, c.FlushInterval = p.IfA, p.A, 100*time.Millisecond
		return c
	}())
	if err != nil {
		t.Fatal(err)
	}
	s.started = make(chan struct{})
	var col collector
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, &col) }()
	<-s.started

	ln := listen(t, p.B, "tcp", hostPort(p.B4, 0))
	served := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			served <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(c, c) // echo until the client closes
		served <- n
	}()
	conn := dial(t, p.A, "tcp", ln.Addr().String())
	echo := func(n int) {
		t.Helper()
		buf := make([]byte, n)
		if _, err := conn.Write(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			t.Fatal(err)
		}
	}
	echo(1000)
	client := conn.LocalAddr().(*net.TCPAddr).AddrPort()
	isConn := func(e *flow.Event) bool { return e.Protocol == flow.ProtoTCP && e.SrcPort == client.Port() }
	waitStart := time.Now().Add(30 * time.Second)
	for {
		if n := count(col.Events(), isConn, flow.TypeStart); n == 1 {
			break
		}
		if time.Now().After(waitStart) {
			t.Fatal("no start for the open connection")
		}
		time.Sleep(20 * time.Millisecond)
	}

	err = s.Reconfigure(context.Background(), map[string]any{
		"interface": p.IfA, "netns": p.A, "snaplen": 128, "promiscuous": true, "batch_size": 8,
		"flush_interval": "50ms", "max_entries": 1000, "max_pending": 1000,
		// Short ends for a closed connection: its end must come from the new timeouts.
		"timeouts": map[string]any{"tcp_established": "1h", "tcp_fin_wait": "1s", "tcp_close_wait": "1s",
			"tcp_last_ack": "1s", "tcp_time_wait": "1s", "tcp_close": "1s"},
		"local_prefixes": []any{p.B4 + "/32"}, // now B is "local": new connections would be ingress
	})
	if err != nil {
		t.Fatalf("Reconfigure: %v", err)
	}
	if c := s.config(); c.Snaplen != 128 || !c.Promiscuous || c.BatchSize != 8 {
		t.Fatalf("options in force: %+v", c)
	}
	echo(2000)
	conn.Close()
	if n := <-served; n != 3000 {
		t.Fatalf("server echoed %d bytes, want 3000", n)
	}
	waitEnd := time.Now().Add(30 * time.Second)
	for count(col.Events(), isConn, flow.TypeEnd) == 0 {
		if time.Now().After(waitEnd) {
			t.Fatal("the closed connection did not end by the new timeouts") // the old ones: 2 minutes
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var starts, ends []flow.Event
	for _, e := range col.Events() {
		if isConn(&e) {
			switch e.Type {
			case flow.TypeStart:
				starts = append(starts, e)
			case flow.TypeEnd:
				ends = append(ends, e)
			}
		}
	}
	if len(starts) != 1 || len(ends) != 1 {
		t.Fatalf("%d starts and %d ends for the connection open across the reload, want 1 and 1", len(starts), len(ends))
	}
	e := ends[0]
	if e.FlowID != starts[0].FlowID {
		t.Errorf("end flow ID %v, start %v", e.FlowID, starts[0].FlowID)
	}
	// Opened before the change, its direction stays egress (A's address was local then).
	if e.Direction != flow.Egress || e.SrcAddr != netip.MustParseAddr(p.A4) {
		t.Errorf("end %+v: want egress from %s, as when it opened", e, p.A4)
	}
	// IP-level bytes: the 3,000 payload bytes each way and the headers of every packet.
	if e.TxBytes < 3000 || e.RxBytes < 3000 {
		t.Errorf("end counts tx %d rx %d bytes, want at least the 3000 payload bytes each way (before and after the change)", e.TxBytes, e.RxBytes)
	}
}

func count(evs []flow.Event, match func(*flow.Event) bool, typ flow.Type) int {
	n := 0
	for _, e := range evs {
		if e.Type == typ && match(&e) {
			n++
		}
	}
	return n
}

// TestReconfigureRefuses: option problems come back at their keys; a new interface, file,
// namespace or ring asks for a new instance.
func TestReconfigureRefuses(t *testing.T) {
	c := defaults()
	c.Interface = "lo"
	s, err := New(testEnv(t), c)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Reconfigure(context.Background(), map[string]any{"interface": "lo", "snaplen": 10, "timeouts": map[string]any{"udp_stram": "1s"}})
	fe, ok := options.FieldErrorsOf(err)
	if !ok || len(fe) != 2 {
		t.Fatalf("got %v, want two option problems", err)
	}
	paths := map[string]bool{fe[0].Path: true, fe[1].Path: true}
	if !paths["snaplen"] || !paths["timeouts.udp_stram"] {
		t.Errorf("problems at %v, want snaplen and timeouts.udp_stram", fe)
	}
	for _, opts := range []map[string]any{
		{"interface": "eth9"}, {"pcap": "x.pcap"}, {"interface": "lo", "netns": "x"}, {"interface": "lo", "ring_size": "16MiB"},
	} {
		if err := s.Reconfigure(context.Background(), opts); !errors.Is(err, component.ErrRestartNeeded) {
			t.Errorf("%v: got %v, want ErrRestartNeeded", opts, err)
		}
	}
	if s.config().Snaplen != 256 {
		t.Errorf("refused options changed snaplen to %d", s.config().Snaplen)
	}
}
