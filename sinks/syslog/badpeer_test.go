package syslog

import (
	"bufio"
	"context"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// rsyslog restarts between batches: the batch written while it is down fails (the sink
// noticed the closed connection and could not reconnect), and the retry after it is back
// delivers all of it. Nothing accepted is lost.
func TestRsyslogRestartNothingLost(t *testing.T) {
	r := startRsyslog(t, "tcp", nil)
	m := &componenttest.Metrics{}
	s := newSink(t, func(c *Config) { c.Address = r.addr }, m)
	rec := recording(t)
	if err := s.Write(context.Background(), flow.NewBatch(rec[:4], nil)); err != nil {
		t.Fatal(err)
	}
	checkSDMessages(t, r.lines(t, 4), rec[:4])
	r.stop()
	err := s.Write(context.Background(), flow.NewBatch(rec[4:], nil))
	if err == nil || !strings.Contains(err.Error(), r.addr) {
		t.Fatalf("write to a stopped rsyslog: %v", err)
	}
	t.Logf("while down: %v", err)
	r2 := startRsyslogOn(t, "tcp", nil, testenv.Port(t, r.addr))
	if err := s.Write(context.Background(), flow.NewBatch(rec[4:], nil)); err != nil {
		t.Fatal(err)
	}
	checkSDMessages(t, r2.lines(t, len(rec)-4), rec[4:])
	if m.ErrorCount("syslog_connect")+m.ErrorCount("syslog_write") == 0 {
		t.Errorf("the failure was not counted: %s", m)
	}
}

// An rsyslog whose certificate the sink does not trust: a clear error, nothing delivered.
func TestRsyslogTLSWrongCertificate(t *testing.T) {
	p := testenv.NewPKI(t)
	r := startRsyslog(t, "tls", p)
	s := newSink(t, func(c *Config) { c.Address, c.Transport, c.CAFile = r.addr, "tls", p.OtherCA }, nil)
	for range 2 {
		err := s.Write(context.Background(), flow.NewBatch(recording(t), nil))
		if err == nil || !strings.Contains(err.Error(), "certificate signed by unknown authority") || !strings.Contains(err.Error(), r.addr) {
			t.Fatalf("error %v does not name the server and the certificate problem", err)
		}
	}
	if data, _ := os.ReadFile(r.out); len(data) != 0 {
		t.Errorf("an untrusted server received:\n%s", data)
	}
}

// readFrames reads octet-counted messages (RFC 6587) until it has n.
func readFrames(t *testing.T, c net.Conn, n int) []string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(c)
	var out []string
	for len(out) < n {
		l, err := br.ReadString(' ')
		if err != nil {
			t.Fatalf("after %d of %d messages: %v", len(out), n, err)
		}
		size, err := strconv.Atoi(strings.TrimSuffix(l, " "))
		if err != nil {
			t.Fatalf("bad frame length %q", l)
		}
		msg := make([]byte, size)
		if _, err := io.ReadFull(br, msg); err != nil {
			t.Fatal(err)
		}
		out = append(out, string(msg))
	}
	return out
}

// A server that reads part of a message and closes: the Write in progress fails, and the
// retry delivers the whole batch, every frame intact, on a new connection.
func TestPeerClosesMidMessageNothingLost(t *testing.T) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) }); err != nil {
			return err
		}
		return serr
	}}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(time.Minute))
	accepted := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); accepted <- c }()
	s := newSink(t, func(c *Config) { c.Address = addr }, nil)
	first := <-accepted
	if first == nil {
		t.Fatal("no connection")
	}
	rec := recording(t)
	var big []flow.Event
	for len(big) < 16000 { // ~10 MB of messages: more than the sink's socket can buffer
		big = append(big, rec...)
	}
	go func() {
		buf := make([]byte, 300) // part of the first message
		io.ReadFull(first, buf)
		first.Close()
	}()
	err = s.Write(context.Background(), flow.NewBatch(big, nil))
	if err == nil {
		t.Fatal("a batch cut off by the server was reported written")
	}
	t.Logf("cut off: %v", err)
	ln.Close()
	ln, err = net.Listen("tcp", addr)
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
	defer second.Close()
	msgs := readFrames(t, second, len(big))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for i, m := range msgs {
		if !strings.Contains(m, `event_id="`+big[i].EventID.String()+`"`) {
			t.Fatalf("message %d is not event %d: %.120s", i, i, m)
		}
	}
}
