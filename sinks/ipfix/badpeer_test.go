package ipfix

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// readStream reads IPFIX messages from a TCP or TLS stream until it holds n data records,
// checking that the session starts with the templates and that sequence numbers count the
// records before each message.
func readStream(t *testing.T, c net.Conn, n int) []record {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	d := newDecoder()
	var recs []record
	var seq uint32
	first := true
	hdr := make([]byte, headerLen)
	for len(recs) < n {
		if _, err := io.ReadFull(c, hdr); err != nil {
			t.Fatalf("after %d of %d records: %v", len(recs), n, err)
		}
		msg := make([]byte, binary.BigEndian.Uint16(hdr[2:]))
		copy(msg, hdr)
		if _, err := io.ReadFull(c, msg[headerLen:]); err != nil {
			t.Fatalf("message cut short: %v", err)
		}
		m, _, err := d.message(msg)
		if err != nil {
			t.Fatal(err)
		}
		if first && m.header.templateSets == 0 {
			t.Fatal("the session does not start with the templates")
		}
		first = false
		if m.header.seq != seq {
			t.Fatalf("sequence %d, want %d", m.header.seq, seq)
		}
		seq += uint32(m.header.dataRecords)
		recs = append(recs, m.records...)
	}
	return recs
}

func checkAll(t *testing.T, got []record, want []flow.Event, pen uint32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d records, want %d", len(got), len(want))
	}
	for i := range want {
		checkRecord(t, got[i], &want[i], pen)
	}
}

func TestTLSRoundTrip(t *testing.T) {
	p := testenv.NewPKI(t)
	cert, err := tls.LoadX509KeyPair(p.ServerCert, p.ServerKey)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.(*tls.Conn).Handshake()
		}
		accepted <- c
	}()
	s := newSink(t, func(c *Config) {
		c.Address, c.Transport, c.CAFile, c.EnterpriseNumber, c.Events = ln.Addr().String(), "tls", p.CAFile, 7, "start,end,aggregate"
	}, nil)
	conn := <-accepted
	if conn == nil {
		t.Fatal("no connection")
	}
	defer conn.Close()
	rec := recording(t)
	if err := s.Write(context.Background(), flow.NewBatch(rec, nil)); err != nil {
		t.Fatal(err)
	}
	checkAll(t, readStream(t, conn, len(exported(rec, "start,end,aggregate"))), exported(rec, "start,end,aggregate"), 7)
}

// A collector whose certificate the sink does not trust: a clear error naming the problem,
// nothing sent, and the batch left for the runtime to retry.
func TestTLSWrongCertificate(t *testing.T) {
	p := testenv.NewPKI(t)
	cert, _ := tls.LoadX509KeyPair(p.ServerCert, p.ServerKey)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 10)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(got)
				return
			}
			n, _ := io.Copy(io.Discard, c) // the handshake fails: nothing arrives
			got <- n
		}
	}()
	m := &componenttest.Metrics{}
	s := newSink(t, func(c *Config) { c.Address, c.Transport, c.CAFile = ln.Addr().String(), "tls", p.OtherCA }, m)
	for range 2 { // retried, failing the same way
		err := s.Write(context.Background(), flow.NewBatch(recording(t), nil))
		if err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") || !strings.Contains(err.Error(), ln.Addr().String()) {
			t.Fatalf("error %v does not name the address and the certificate problem", err)
		}
	}
	if m.ErrorCount("ipfix_connect") < 2 {
		t.Errorf("connect errors counted: %s", m)
	}
	ln.Close()
	for n := range got {
		if n != 0 {
			t.Errorf("%d bytes reached a collector the sink does not trust", n)
		}
	}
}

// A collector that is down: Write fails naming it; once it is up the same batch is written
// whole, templates first.
func TestCollectorDownThenUp(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	s := newSink(t, func(c *Config) { c.Address, c.Transport = addr, "tcp" }, nil)
	rec := recording(t)
	err = s.Write(context.Background(), flow.NewBatch(rec, nil))
	if err == nil || !strings.Contains(err.Error(), "connect to "+addr) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("error %v does not say the collector refused", err)
	}
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s taken meanwhile: %v", addr, err)
	}
	defer ln.Close()
	if err := s.Write(context.Background(), flow.NewBatch(rec, nil)); err != nil {
		t.Fatal(err)
	}
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	want := exported(rec, "end,aggregate")
	checkAll(t, readStream(t, conn, len(want)), want, 0)
}

// smallBufferListener listens with a receive buffer so small that a large batch cannot
// vanish into kernel buffers: the write is still in progress when the collector cuts it.
func smallBufferListener(t *testing.T) net.Listener {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		if err != nil {
			return err
		}
		return serr
	}}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(time.Minute)) // no test hangs on Accept
	return ln
}

// A collector that reads part of a message and closes the connection: the Write in progress
// fails, and the next one sends the whole batch again on a new connection (new session:
// templates first, sequence from 0). Between batches, a collector that closed is noticed
// before anything is written to its dead connection.
func TestPeerClosesMidRecordNothingLost(t *testing.T) {
	ln := smallBufferListener(t)
	m := &componenttest.Metrics{}
	s := newSink(t, func(c *Config) { c.Address, c.Transport, c.EnterpriseNumber = ln.Addr().String(), "tcp", 9 }, m)
	first, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	rec := recording(t)
	var big []flow.Event
	for len(big) < 100000 { // ~6.5 MB of records: more than the sink's socket can buffer
		big = append(big, rec...)
	}
	want := exported(big, "end,aggregate")
	cut := make(chan struct{})
	go func() {
		defer close(cut)
		buf := make([]byte, 1000) // the template message and part of the first data message
		io.ReadFull(first, buf)
		first.Close()
	}()
	err = s.Write(context.Background(), flow.NewBatch(big, nil))
	<-cut
	if err == nil {
		t.Fatal("a batch cut off by the collector was reported written")
	}
	t.Logf("cut off: %v", err)
	// The runtime retries the batch: it arrives whole on a new connection (to a listener
	// with ordinary buffers on the same port, to keep the test quick).
	ln.Close()
	ln, err = net.Listen("tcp", ln.Addr().String())
	if err != nil {
		t.Skipf("port taken meanwhile: %v", err)
	}
	defer ln.Close()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(time.Minute))
	done := make(chan error, 1)
	go func() { done <- s.Write(context.Background(), flow.NewBatch(big, nil)) }()
	second, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	got := readStream(t, second, len(want))
	if len(got) != len(want) {
		t.Fatalf("%d records after the retry, want %d", len(got), len(want))
	}
	for i := 0; i < len(want); i += 97 { // every element of a sample; readStream checked the count and sequence
		checkRecord(t, got[i], &want[i], 9)
	}
	checkRecord(t, got[len(got)-1], &want[len(want)-1], 9)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Now the collector closes between batches.
	sinkPort := second.RemoteAddr().(*net.TCPAddr).Port
	second.Close()
	waitFor(t, "the sink's end of the connection to see the close", func() bool { return tcpState(t, sinkPort) == "08" }) // CLOSE_WAIT
	small := flow.NewBatch(rec, nil)
	go func() { done <- s.Write(context.Background(), small) }()
	third, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	checkAll(t, readStream(t, third, len(exported(rec, "end,aggregate"))), exported(rec, "end,aggregate"), 9)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if m.ErrorCount("ipfix_write") < 1 {
		t.Errorf("write errors not counted: %s", m)
	}
}

// tcpState is the kernel's state (the st column of /proc/net/tcp, hex) of the IPv4 TCP
// socket bound to the loopback port, "" when there is none.
func tcpState(t *testing.T, port int) string {
	t.Helper()
	data, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	local := fmt.Sprintf("0100007F:%04X", port)
	for _, line := range strings.Split(string(data), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 3 && f[1] == local {
			return f[3]
		}
	}
	return ""
}

// A collector that requires a client certificate (mTLS, TLS 1.3): without one, or with one it
// does not trust, the sink fails clearly instead of writing a batch the collector will not
// read; with the right one, every record arrives.
func TestMutualTLS(t *testing.T) {
	p := testenv.NewPKI(t)
	other := testenv.NewPKI(t) // a client certificate from a CA the collector does not trust
	cert, _ := tls.LoadX509KeyPair(p.ServerCert, p.ServerKey)
	pool := x509.NewCertPool()
	ca, _ := os.ReadFile(p.CAFile)
	pool.AppendCertsFromPEM(ca)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs: pool, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conns := make(chan net.Conn, 10)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				if c.(*tls.Conn).Handshake() != nil {
					c.Close()
					return
				}
				conns <- c
			}()
		}
	}()
	rec := recording(t)
	for _, tc := range []struct{ name, cert, key string }{{"no client certificate", "", ""}, {"untrusted client certificate", other.ClientCert, other.ClientKey}} {
		s := newSink(t, func(c *Config) {
			c.Address, c.Transport, c.CAFile, c.CertFile, c.KeyFile = ln.Addr().String(), "tls", p.CAFile, tc.cert, tc.key
		}, nil)
		err := s.Write(context.Background(), flow.NewBatch(rec, nil))
		if err == nil || !strings.Contains(err.Error(), "refused this client's certificate") {
			t.Errorf("%s: Write returned %v", tc.name, err)
		}
	}
	s := newSink(t, func(c *Config) {
		c.Address, c.Transport, c.CAFile, c.CertFile, c.KeyFile = ln.Addr().String(), "tls", p.CAFile, p.ClientCert, p.ClientKey
	}, nil)
	if err := s.Write(context.Background(), flow.NewBatch(rec, nil)); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-conns:
		defer c.Close()
		want := exported(rec, "end,aggregate")
		checkAll(t, readStream(t, c, len(want)), want, 0)
	case <-time.After(20 * time.Second):
		t.Fatal("no accepted connection")
	}
}
