// Package netout is the connection of a sink that pushes a one-way stream to a collector
// (IPFIX, syslog): UDP, TCP or TLS, dialled on demand, written with a deadline, and dropped
// as soon as the peer closes it, so that the next batch goes to a fresh connection instead of
// into a socket nobody reads. Such protocols have no acknowledgement: over TCP and TLS a
// batch counts as delivered once the kernel took all of it, over UDP once it was sent.
package netout

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Config says where and how to connect.
type Config struct {
	Network      string      // udp, tcp or tls
	Address      string      // host:port
	TLS          *tls.Config // for tls
	DialTimeout  time.Duration
	WriteTimeout time.Duration
}

func (c Config) stream() bool { return c.Network != "udp" }

// established asks the kernel whether a TCP connection is still established: once the peer's
// FIN or RST has arrived it is not, even before the watcher has run. A batch written after
// that would be taken by the kernel and lost.
func established(conn net.Conn) bool {
	if tc, ok := conn.(*tls.Conn); ok {
		conn = tc.NetConn()
	}
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	state := uint8(0)
	if err := rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			state = info.State
		}
	}); err != nil {
		return false
	}
	return state == tcpEstablished
}

const tcpEstablished = 1 // TCP_ESTABLISHED in the kernel's tcp_states.h

// Conn is a connection that redials when needed. It is safe for concurrent use; writes are
// serialised.
type Conn struct {
	cfg Config

	mu     sync.Mutex
	c      net.Conn
	closed chan struct{} // closed by the watcher when the peer closes c
	peer   error         // why the peer side ended, once it has
	batch  batchWriter   // UDP: sendmmsg on c
	msgs   []ipv4.Message
	bufs   [][]byte
}

// New returns an unconnected Conn.
func New(cfg Config) *Conn { return &Conn{cfg: cfg} }

// Ensure connects unless a live connection exists; fresh reports that it made a new one (a
// protocol then sends what a new transport session needs first, e.g. IPFIX templates).
func (c *Conn) Ensure(ctx context.Context) (fresh bool, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.c != nil {
		select {
		case <-c.closed:
			c.dropLocked()
		default:
			if !c.cfg.stream() || established(c.c) {
				return false, nil
			}
			c.dropLocked()
		}
	}
	return true, c.dialLocked(ctx)
}

func (c *Conn) dialLocked(ctx context.Context) error {
	d := net.Dialer{Timeout: c.cfg.DialTimeout, KeepAlive: 30 * time.Second}
	var conn net.Conn
	var err error
	switch c.cfg.Network {
	case "tls":
		conn, err = c.dialTLS(ctx, &d)
	default:
		conn, err = d.DialContext(ctx, c.cfg.Network, c.cfg.Address)
	}
	if err != nil {
		return fmt.Errorf("connect to %s over %s: %w", c.cfg.Address, c.cfg.Network, err)
	}
	c.c, c.closed, c.peer = conn, make(chan struct{}), nil
	if c.cfg.stream() {
		go c.watch(conn, c.closed)
	}
	return nil
}

// dialTLS connects and completes the handshake. In TLS 1.3 a server verifies the client's
// certificate only after the client has finished its handshake, and answers a rejected one
// with an alert the client sees on its next read: a batch written first would count as
// accepted and be lost. So when the server asked for a certificate under TLS 1.3, wait up to
// clientCertVerdict for that alert (a server that accepted sends nothing or a session
// ticket) before the connection is used.
func (c *Conn) dialTLS(ctx context.Context, d *net.Dialer) (net.Conn, error) {
	cfg := c.cfg.TLS.Clone()
	if cfg == nil {
		cfg = &tls.Config{}
	}
	requested := false
	certs := cfg.Certificates
	cfg.Certificates = nil
	cfg.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		requested = true
		for i := range certs {
			if cri.SupportsCertificate(&certs[i]) == nil {
				return &certs[i], nil
			}
		}
		return &tls.Certificate{}, nil // none: the server decides
	}
	td := tls.Dialer{NetDialer: d, Config: cfg}
	conn, err := td.DialContext(ctx, "tcp", c.cfg.Address)
	if err != nil {
		return nil, err
	}
	tc := conn.(*tls.Conn)
	if !requested || tc.ConnectionState().Version != tls.VersionTLS13 {
		return tc, nil
	}
	_ = tc.SetReadDeadline(time.Now().Add(clientCertVerdict))
	var buf [1]byte
	_, err = tc.Read(buf[:])
	_ = tc.SetReadDeadline(time.Time{})
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return tc, nil
	}
	tc.Close()
	if err == nil {
		err = errors.New("the server sent data on a connection it should only read")
	}
	return nil, fmt.Errorf("the server refused this client's certificate: %w", err)
}

// clientCertVerdict bounds the wait for a TLS 1.3 server's verdict on the client certificate.
const clientCertVerdict = 500 * time.Millisecond

// watch reads from a stream the peer never writes to: whatever ends the read (EOF, a reset,
// a TLS alert such as a rejected certificate) means the connection is gone.
func (c *Conn) watch(conn net.Conn, closed chan struct{}) {
	var buf [512]byte
	var err error
	for err == nil {
		_, err = conn.Read(buf[:])
	}
	c.mu.Lock()
	if c.c == conn {
		if errors.Is(err, io.EOF) {
			err = errors.New("the collector closed the connection")
		}
		c.peer = err
	}
	c.mu.Unlock()
	close(closed)
}

// Write writes p to the stream (TCP, TLS) in full, or each of ps as one datagram (UDP).
// On error the connection is dropped; the next Ensure makes a new one.
func (c *Conn) Write(ctx context.Context, ps ...[]byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.c == nil {
		return errors.New("not connected")
	}
	select {
	case <-c.closed:
		err := c.peerErrLocked()
		c.dropLocked()
		return err
	default:
	}
	if c.cfg.stream() && !established(c.c) {
		c.dropLocked()
		return fmt.Errorf("connection to %s: the collector closed it", c.cfg.Address)
	}
	deadline := time.Now().Add(c.cfg.WriteTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = c.c.SetWriteDeadline(deadline)
	if !c.cfg.stream() && len(ps) > 1 {
		if err := c.writeBatchLocked(ps); err != nil {
			c.dropLocked()
			return fmt.Errorf("send to %s over udp: %w", c.cfg.Address, err)
		}
		return nil
	}
	for _, p := range ps {
		if _, err := c.c.Write(p); err != nil {
			// A write that fails because the peer went away says more with the peer's reason.
			select {
			case <-c.closed:
				err = fmt.Errorf("%w (%v)", err, c.peerErrLocked())
			default:
			}
			c.dropLocked()
			return fmt.Errorf("write to %s over %s: %w", c.cfg.Address, c.cfg.Network, err)
		}
	}
	return nil
}

// writeBatchLocked sends datagrams with as few system calls as the kernel allows
// (sendmmsg), since one call per message is most of the cost of UDP export.
func (c *Conn) writeBatchLocked(ps [][]byte) error {
	uc, ok := c.c.(*net.UDPConn)
	if !ok {
		return errors.New("not a UDP connection")
	}
	if c.batch == nil {
		if ra, _ := uc.RemoteAddr().(*net.UDPAddr); ra != nil && ra.IP.To4() == nil {
			c.batch = ipv6.NewPacketConn(uc)
		} else {
			c.batch = ipv4.NewPacketConn(uc)
		}
	}
	c.msgs, c.bufs = c.msgs[:0], append(c.bufs[:0], ps...)
	for i := range c.bufs {
		c.msgs = append(c.msgs, ipv4.Message{Buffers: c.bufs[i : i+1 : i+1]})
	}
	for msgs := c.msgs; len(msgs) > 0; {
		n, err := c.batch.WriteBatch(msgs, 0)
		if err != nil {
			return err
		}
		msgs = msgs[n:]
	}
	return nil
}

// batchWriter is ipv4.PacketConn or ipv6.PacketConn (their Message types are the same).
type batchWriter interface {
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

func (c *Conn) peerErrLocked() error {
	if c.peer != nil {
		return fmt.Errorf("connection to %s: %w", c.cfg.Address, c.peer)
	}
	return fmt.Errorf("connection to %s closed", c.cfg.Address)
}

func (c *Conn) dropLocked() {
	if c.c != nil {
		_ = c.c.Close()
		c.c, c.batch = nil, nil
	}
}

// Close closes the connection; a later Ensure reconnects.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dropLocked()
	return nil
}
