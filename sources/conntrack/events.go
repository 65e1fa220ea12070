package conntrack

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/flowpipe/flowpipe/internal/netns"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"

	"github.com/flowpipe/flowpipe/core/flow"
)

// eventConn is the netlink socket subscribed to conntrack NEW and DESTROY events. It reads
// raw datagrams itself (up to recvBatchLen with one recvmmsg, into reused buffers) instead of
// through netlink.Conn.Receive, which peeks and allocates for every message.
type eventConn struct {
	c      *netlink.Conn
	raw    syscall.RawConn
	rcvbuf int
	once   sync.Once
}

var errIdle = errors.New("no event waiting")

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
	if err := e.setReadBuffer(readBuffer, log); err != nil {
		return fail("set receive buffer", err)
	}
	for _, g := range []netfilter.NetlinkGroup{netfilter.GroupCTNew, netfilter.GroupCTDestroy} {
		if err := c.JoinGroup(uint32(g)); err != nil {
			return fail(fmt.Sprintf("join multicast group %d", g), err)
		}
	}
	return e, nil
}

// setReadBuffer sizes the socket's receive buffer, forced past net.core.rmem_max as root;
// it works on an open socket too (Reconfigure), which keeps what is in the buffer.
func (e *eventConn) setReadBuffer(readBuffer int, log *slog.Logger) error {
	var serr error
	if err := e.raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, readBuffer)
	}); err != nil {
		return err
	}
	if serr != nil {
		// Without CAP_NET_ADMIN the buffer is capped by net.core.rmem_max.
		if err := e.c.SetReadBuffer(readBuffer); err != nil {
			return err
		}
		log.Warn("could not force the conntrack socket buffer; it is capped by net.core.rmem_max",
			"wanted", readBuffer, "error", serr)
	}
	_ = e.raw.Control(func(fd uintptr) {
		if v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF); err == nil {
			e.rcvbuf = v
		}
	})
	return nil
}

// Each recvmmsg call reads up to recvBatchLen datagrams into slots of recvSlotLen bytes. A
// ctnetlink event is well under a kilobyte; one larger than a slot is counted as a decode
// error (MSG_TRUNC), not read in part.
const (
	recvBatchLen = 128
	recvSlotLen  = 8 << 10
)

// recvBatch holds the buffers and headers of one recvmmsg call, reused for every call.
type recvBatch struct {
	buf  []byte
	iov  [recvBatchLen]unix.Iovec
	hdrs [recvBatchLen]mmsghdr
}

// mmsghdr is struct mmsghdr (linux/socket.h); Go's alignment pads it as C does.
type mmsghdr struct {
	Hdr unix.Msghdr
	Len uint32
}

func newRecvBatch() *recvBatch {
	r := &recvBatch{buf: make([]byte, recvBatchLen*recvSlotLen)}
	for i := range r.hdrs {
		r.iov[i].Base = &r.buf[i*recvSlotLen]
		r.iov[i].SetLen(recvSlotLen)
		r.hdrs[i].Hdr.Iov = &r.iov[i]
		r.hdrs[i].Hdr.SetIovlen(1)
	}
	return r
}

// msg returns the i-th datagram of the last call and whether it was truncated.
func (r *recvBatch) msg(i int) ([]byte, bool) {
	h := &r.hdrs[i]
	return r.buf[i*recvSlotLen : i*recvSlotLen+int(h.Len)], h.Hdr.Flags&unix.MSG_TRUNC != 0
}

// recv reads as many waiting datagrams as fit r with one recvmmsg and returns their count.
// When wait is false and nothing is waiting, it returns errIdle instead of blocking.
func (e *eventConn) recv(r *recvBatch, wait bool) (int, error) {
	var n int
	var rerr error
	err := e.raw.Read(func(fd uintptr) bool {
		for i := range r.hdrs {
			r.hdrs[i].Len, r.hdrs[i].Hdr.Flags = 0, 0
		}
		m, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])),
			recvBatchLen, unix.MSG_DONTWAIT, 0, 0)
		n, rerr = int(m), nil
		if errno != 0 {
			n, rerr = 0, errno
		}
		if rerr == unix.EAGAIN || rerr == unix.EINTR {
			if wait {
				return false
			}
			rerr = errIdle
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

// onMessages decodes the netlink messages of one datagram and hands conntrack NEW and
// DESTROY events to the tracker. The flow is decoded into a variable on the stack and the
// calls that follow are direct, so that it stays there: no allocation, no write barriers.
func (t *tracker) onMessages(b []byte, now flow.Time, st *stats) {
	sp := nlSplit{b: b}
	bad := 0
	var f ctFlow
	for {
		typ, flags, data, ok := sp.next()
		if !ok {
			break
		}
		ev, ok := t.dec.decodeMessage(typ, flags, data, &f)
		if !ok {
			bad++ // expectations count here too, as they did with ti-mo
			continue
		}
		switch ev {
		case ctEvNew:
			st.newEvents.Add(1)
			t.onNew(&f, now)
		case ctEvDestroy:
			st.destroyEvents.Add(1)
			t.onDestroy(&f, now)
		}
	}
	if bad += sp.bad; bad > 0 {
		st.decodeErrors.Add(uint64(bad))
	}
}

const nlmsgHdrLen = 16
