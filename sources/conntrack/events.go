package conntrack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"time"

	"github.com/flowpipe/flowpipe/internal/netns"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"

	"github.com/flowpipe/flowpipe/core/flow"
)

// eventConn is the netlink socket subscribed to conntrack NEW and DESTROY events. It reads
// raw datagrams itself (one recvmsg each, into one reused buffer) instead of through
// netlink.Conn.Receive, which peeks and allocates for every message.
type eventConn struct {
	c      *netlink.Conn
	raw    syscall.RawConn
	rcvbuf int
	once   sync.Once
}

var (
	errIdle      = errors.New("no event waiting")
	errTruncated = errors.New("netlink message larger than the read buffer")
)

func openEvents(ns *netns.NS, readBuffer int, log *slog.Logger) (*eventConn, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: ns.Fd()})
	if err != nil {
		return nil, fmt.Errorf("open conntrack event socket in %s: %w", ns, err)
	}
	e := &eventConn{c: c}
	fail := func(what string, err error) (*eventConn, error) {
		c.Close()
		return nil, fmt.Errorf("conntrack event socket in %s: %s: %w", ns, what, err)
	}
	if e.raw, err = c.SyscallConn(); err != nil {
		return fail("raw connection", err)
	}
	// Reliable delivery: when a DESTROY does not fit the buffer, the kernel keeps the entry
	// and sends its event again later instead of dropping it. Overruns are still reported
	// (no NETLINK_NO_ENOBUFS) so that lost NEW events lead to a resync.
	if err := c.SetOption(netlink.BroadcastError, true); err != nil {
		return fail("set NETLINK_BROADCAST_ERROR", err)
	}
	var serr error
	if err := e.raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, readBuffer)
	}); err != nil {
		return fail("control", err)
	}
	if serr != nil {
		// Without CAP_NET_ADMIN the buffer is capped by net.core.rmem_max.
		if err := c.SetReadBuffer(readBuffer); err != nil {
			return fail("set receive buffer", err)
		}
		log.Warn("could not force the conntrack socket buffer; it is capped by net.core.rmem_max",
			"wanted", readBuffer, "error", serr)
	}
	_ = e.raw.Control(func(fd uintptr) {
		if v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF); err == nil {
			e.rcvbuf = v
		}
	})
	for _, g := range []netfilter.NetlinkGroup{netfilter.GroupCTNew, netfilter.GroupCTDestroy} {
		if err := c.JoinGroup(uint32(g)); err != nil {
			return fail(fmt.Sprintf("join multicast group %d", g), err)
		}
	}
	return e, nil
}

// recv reads one datagram into buf. When wait is false and nothing is waiting, it returns
// errIdle instead of blocking.
func (e *eventConn) recv(buf []byte, wait bool) (int, error) {
	var n int
	var rerr error
	err := e.raw.Read(func(fd uintptr) bool {
		var flags int
		n, _, flags, _, rerr = unix.Recvmsg(int(fd), buf, nil, unix.MSG_DONTWAIT)
		if rerr == unix.EAGAIN || rerr == unix.EINTR {
			if wait {
				return false
			}
			rerr = errIdle
		}
		if rerr == nil && flags&unix.MSG_TRUNC != 0 {
			rerr = errTruncated
		}
		return true
	})
	if err != nil {
		return 0, err
	}
	return n, rerr
}

func (e *eventConn) setDeadline(t time.Time) error { return e.c.SetReadDeadline(t) }

func (e *eventConn) close() { e.once.Do(func() { e.c.Close() }) }

// onMessages decodes the netlink messages in b and hands conntrack NEW and DESTROY events to
// the tracker.
func (t *tracker) onMessages(b []byte, now flow.Time, st *stats) {
	bad := decodeMessages(b, func(ev *ct.Event) {
		switch ev.Type {
		case ct.EventNew:
			st.newEvents.Add(1)
			t.onNew(ev.Flow, now)
		case ct.EventDestroy:
			st.destroyEvents.Add(1)
			t.onDestroy(ev.Flow, now)
		}
	})
	if bad > 0 {
		st.decodeErrors.Add(uint64(bad))
	}
}

const nlmsgHdrLen = 16

// decodeMessages splits a netlink datagram into messages and decodes each conntrack message;
// it returns how many messages could not be decoded. It is the parser of what the kernel
// sends, so it must survive any input (see the fuzz test).
func decodeMessages(b []byte, fn func(*ct.Event)) (bad int) {
	for len(b) >= nlmsgHdrLen {
		l := int(binary.NativeEndian.Uint32(b[0:4]))
		if l < nlmsgHdrLen || l > len(b) {
			return bad + 1
		}
		h := netlink.Header{
			Length:   uint32(l),
			Type:     netlink.HeaderType(binary.NativeEndian.Uint16(b[4:6])),
			Flags:    netlink.HeaderFlags(binary.NativeEndian.Uint16(b[6:8])),
			Sequence: binary.NativeEndian.Uint32(b[8:12]),
			PID:      binary.NativeEndian.Uint32(b[12:16]),
		}
		data := b[nlmsgHdrLen:l]
		next := (l + 3) &^ 3
		if next > len(b) {
			next = len(b)
		}
		b = b[next:]
		switch h.Type {
		case netlink.Noop, netlink.Error, netlink.Done, netlink.Overrun:
			continue
		}
		var ev ct.Event
		if err := ev.Unmarshal(netlink.Message{Header: h, Data: data}); err != nil || ev.Flow == nil {
			bad++
			continue
		}
		fn(&ev)
	}
	return bad
}
