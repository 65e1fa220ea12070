package grpcsink_test

import (
	"io"
	"net"
	"sync"
	"testing"
)

// proxy is a loopback TCP proxy the tests put between agent and collector, to cut the network
// under a stream or hold back what the collector sends (its ACKs).
type proxy struct {
	lis    net.Listener
	target string

	mu     sync.Mutex
	conns  []net.Conn
	frozen bool
	thaw   *sync.Cond
}

func newProxy(t testing.TB, target string) *proxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{lis: lis, target: target}
	p.thaw = sync.NewCond(&p.mu)
	go p.accept()
	t.Cleanup(func() {
		lis.Close()
		p.Freeze(false)
		p.Cut()
	})
	return p
}

func (p *proxy) Addr() string { return p.lis.Addr().String() }

func (p *proxy) accept() {
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, up)
		p.mu.Unlock()
		go func() { io.Copy(up, c); up.Close(); c.Close() }()
		go func() { p.copyDown(c, up); up.Close(); c.Close() }()
	}
}

// copyDown copies collector → agent, waiting while frozen.
func (p *proxy) copyDown(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			for p.frozen {
				p.thaw.Wait()
			}
			p.mu.Unlock()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Cut closes every connection through the proxy, as a network failure would.
func (p *proxy) Cut() {
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// Freeze holds back (or, with false, lets through again) everything the collector sends.
func (p *proxy) Freeze(on bool) {
	p.mu.Lock()
	p.frozen = on
	p.mu.Unlock()
	p.thaw.Broadcast()
}
