package conntrack

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/flowpipe/flowpipe/internal/netns"

	"github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"

	"github.com/flowpipe/flowpipe/core/flow"
)

// eventConn is the netlink socket subscribed to conntrack NEW and DESTROY events. It reads
// raw datagrams itself (up to recvBatchLen with one recvmmsg, into reused buffers) instead of
// through netlink.Conn.Receive, which peeks and allocates for every message.
//
// The socket is deliberately not registered with Go's network poller: an edge-triggered
// poller wakes an idle thread of the process for every datagram that arrives while nobody
// waits for it, which during a burst (the reader pausing between drains, see Source.read)
// was thousands of wake-ups a second, each costing more than decoding an event. The reader
// waits in ppoll(2) instead, on the socket and on an eventfd that close and Reconfigure
// write to interrupt it.
type eventConn struct {
	fd     int // the netlink socket (non-blocking; reads always pass MSG_DONTWAIT)
	wakeFd int // eventfd: written to interrupt a recv blocked in ppoll
	rcvbuf int

	deadline atomic.Int64 // UnixNano of the read deadline; 0: none
	closed   atomic.Bool
	// mu is held shared by every use of the descriptors and exclusively by close, which
	// closes them only once no call is using them (a number closed under a running call
	// could be reused by another file).
	mu   sync.RWMutex
	once sync.Once
}

var errIdle = errors.New("no event waiting")

func openEvents(ns *netns.NS, readBuffer int, log *slog.Logger) (*eventConn, error) {
	var fd int
	if err := ns.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_NETFILTER)
		return err
	}); err != nil {
		return nil, fmt.Errorf("open conntrack event socket in %s: %w", ns, err)
	}
	e := &eventConn{fd: fd, wakeFd: -1}
	fail := func(what string, err error) (*eventConn, error) {
		e.close()
		return nil, fmt.Errorf("conntrack event socket in %s: %s: %w", ns, what, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fail("bind", err)
	}
	var err error
	if e.wakeFd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return fail("eventfd", err)
	}
	// Reliable delivery: when a DESTROY does not fit the buffer, the kernel keeps the entry
	// and sends its event again later instead of dropping it. Overruns are still reported
	// (no NETLINK_NO_ENOBUFS) so that lost NEW events lead to a resync.
	if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_BROADCAST_ERROR, 1); err != nil {
		return fail("set NETLINK_BROADCAST_ERROR", err)
	}
	if err := e.setReadBuffer(readBuffer, log); err != nil {
		return fail("set receive buffer", err)
	}
	for _, g := range []netfilter.NetlinkGroup{netfilter.GroupCTNew, netfilter.GroupCTDestroy} {
		if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, int(g)); err != nil {
			return fail(fmt.Sprintf("join multicast group %d", g), err)
		}
	}
	return e, nil
}

// setReadBuffer sizes the socket's receive buffer, forced past net.core.rmem_max as root;
// it works on an open socket too (Reconfigure), which keeps what is in the buffer.
func (e *eventConn) setReadBuffer(readBuffer int, log *slog.Logger) error {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.closed.Load() {
		return net.ErrClosed
	}
	if serr := unix.SetsockoptInt(e.fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, readBuffer); serr != nil {
		// Without CAP_NET_ADMIN the buffer is capped by net.core.rmem_max.
		if err := unix.SetsockoptInt(e.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, readBuffer); err != nil {
			return err
		}
		log.Warn("could not force the conntrack socket buffer; it is capped by net.core.rmem_max",
			"wanted", readBuffer, "error", serr)
	}
	if v, err := unix.GetsockoptInt(e.fd, unix.SOL_SOCKET, unix.SO_RCVBUF); err == nil {
		e.rcvbuf = v
	}
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
// When wait is false and nothing is waiting, it returns errIdle instead of blocking; when it
// is true it waits in ppoll for a datagram, the read deadline (os.ErrDeadlineExceeded) or
// close (net.ErrClosed).
func (e *eventConn) recv(r *recvBatch, wait bool) (int, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	for {
		if e.closed.Load() {
			return 0, net.ErrClosed
		}
		for i := range r.hdrs {
			r.hdrs[i].Len, r.hdrs[i].Hdr.Flags = 0, 0
		}
		m, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(e.fd), uintptr(unsafe.Pointer(&r.hdrs[0])),
			recvBatchLen, unix.MSG_DONTWAIT, 0, 0)
		switch {
		case errno == 0:
			return int(m), nil
		case errno == unix.EINTR:
			continue
		case errno != unix.EAGAIN:
			return 0, errno
		case !wait:
			return 0, errIdle
		}
		var ts *unix.Timespec
		if d := e.deadline.Load(); d != 0 {
			left := time.Until(time.Unix(0, d))
			if left <= 0 {
				return 0, os.ErrDeadlineExceeded
			}
			t := unix.NsecToTimespec(int64(left))
			ts = &t
		}
		fds := [2]unix.PollFd{{Fd: int32(e.fd), Events: unix.POLLIN}, {Fd: int32(e.wakeFd), Events: unix.POLLIN}}
		if _, err := unix.Ppoll(fds[:], ts, nil); err != nil && err != unix.EINTR {
			return 0, err
		}
		if fds[1].Revents != 0 {
			var b [8]byte
			_, _ = unix.Read(e.wakeFd, b[:]) // reset the eventfd; what woke us is checked above
		}
	}
}

// setDeadline sets the time at which a waiting recv returns os.ErrDeadlineExceeded; one that
// has passed already also interrupts a recv waiting now (Reconfigure wakes the reader so).
func (e *eventConn) setDeadline(t time.Time) error {
	e.deadline.Store(t.UnixNano())
	if !t.After(time.Now()) {
		e.mu.RLock()
		defer e.mu.RUnlock()
		if !e.closed.Load() {
			e.wake()
		}
	}
	return nil
}

// wake interrupts a recv waiting in ppoll; the caller holds mu or is close.
func (e *eventConn) wake() {
	one := [8]byte{1}
	_, _ = unix.Write(e.wakeFd, one[:])
}

// close interrupts a waiting recv, waits until no call uses the descriptors and closes them.
func (e *eventConn) close() {
	e.once.Do(func() {
		e.closed.Store(true)
		if e.wakeFd >= 0 {
			e.wake()
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		unix.Close(e.fd)
		if e.wakeFd >= 0 {
			unix.Close(e.wakeFd)
		}
	})
}

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
