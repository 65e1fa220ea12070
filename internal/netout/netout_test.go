package netout

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// A peer that closes is noticed from the kernel's TCP state before anything is written to
// the dead connection: the next Ensure dials a new one.
func TestEnsureReplacesAConnectionThePeerClosed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 2)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	c := New(Config{Network: "tcp", Address: ln.Addr().String(), DialTimeout: time.Second, WriteTimeout: time.Second})
	defer c.Close()
	ctx := context.Background()
	if fresh, err := c.Ensure(ctx); err != nil || !fresh {
		t.Fatalf("first Ensure: fresh %v, %v", fresh, err)
	}
	first := <-accepted
	if fresh, err := c.Ensure(ctx); err != nil || fresh {
		t.Fatalf("Ensure on a live connection: fresh %v, %v", fresh, err)
	}
	if err := c.Write(ctx, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(first, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("peer read %q, %v", buf, err)
	}
	first.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		alive := c.c != nil && established(c.c)
		c.mu.Unlock()
		if !alive {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the closed connection still looks established")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := c.Write(ctx, []byte("lost?")); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("Write to a closed connection: %v", err)
	}
	if fresh, err := c.Ensure(ctx); err != nil || !fresh {
		t.Fatalf("Ensure after the close: fresh %v, %v", fresh, err)
	}
	second := <-accepted
	defer second.Close()
	if err := c.Write(ctx, []byte("again")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(second, buf); err != nil || string(buf) != "again" {
		t.Fatalf("second peer read %q, %v", buf, err)
	}
}

// A batch of datagrams goes out whole (sendmmsg), each one datagram, in order.
func TestUDPBatch(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	c := New(Config{Network: "udp", Address: pc.LocalAddr().String(), DialTimeout: time.Second, WriteTimeout: time.Second})
	defer c.Close()
	if _, err := c.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
	var ps [][]byte
	for i := range 100 {
		ps = append(ps, []byte{byte(i), byte(i), byte(i)})
	}
	if err := c.Write(context.Background(), ps...); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i := range 100 {
		n, _, err := pc.ReadFrom(buf)
		if err != nil || n != 3 || buf[0] != byte(i) {
			t.Fatalf("datagram %d: %d bytes %v, %v", i, n, buf[:n], err)
		}
	}
}

func TestConnectRefusedNamesTheAddress(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	c := New(Config{Network: "tcp", Address: addr, DialTimeout: time.Second, WriteTimeout: time.Second})
	if _, err := c.Ensure(context.Background()); err == nil || !strings.Contains(err.Error(), "connect to "+addr+" over tcp") {
		t.Fatalf("Ensure: %v", err)
	}
	if err := c.Write(context.Background(), []byte("x")); err == nil {
		t.Fatal("Write without a connection succeeded")
	}
}
