package pluginproto

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// The data channel: batches between the host and a plugin travel on a private Unix stream
// socket (a socketpair the host creates and the plugin inherits as DataFDEnv), in frames,
// instead of on go-plugin's gRPC connection, which stays for the handshake, the lifecycle
// and the control calls (Describe, Configure, Start, Close, Watch, Health, Gather). A
// socketpair has no path and no name: no other process can connect to it, so it needs
// neither TLS nor a listener. A frame is a fixed header, a small protobuf message (the same
// messages as the gRPC services, with their events left out) and the packed events
// (internal/codec) as they are:
//
//	offset  size  field
//	0       2     magic "fP"
//	2       1     FrameVersion
//	3       1     type (FrameType)
//	4       4     length of the message (big endian), at most MaxFrameMeta
//	8       4     length of the events, at most MaxMessageSize
//	12      4     zero
//	16      8     id: the call, or the source stream, the frame belongs to
//
// Every field is checked before anything is allocated for it: a frame that breaks a rule
// ends the channel, and the host fails that plugin (it is restarted as after a crash).

// DataFDEnv names the file descriptor of the data channel in a plugin process.
const DataFDEnv = "FLOWPIPE_PLUGIN_DATA_FD"

// DataChannelEnv set to "off" turns the data channel off: in the host's environment, the
// host offers it to no plugin (every batch goes over gRPC); in a plugin's, the plugin
// declines it and behaves as a plugin built before it.
const DataChannelEnv = "FLOWPIPE_PLUGIN_DATA_CHANNEL"

// DataChannelOff reports whether DataChannelEnv turns the channel off in this process.
func DataChannelOff() bool { return os.Getenv(DataChannelEnv) == "off" }

// EnrichChangesEnv set to "off" turns off enrich answers as changes (ConfigureRequest
// .enrich_changes): in the host's environment, the host asks no enricher for them (every
// answer is a whole batch); in a plugin's, the plugin answers whole batches, as a plugin
// built before them.
const EnrichChangesEnv = "FLOWPIPE_PLUGIN_ENRICH_CHANGES"

// EnrichChangesOff reports whether EnrichChangesEnv turns changes off in this process.
func EnrichChangesOff() bool { return os.Getenv(EnrichChangesEnv) == "off" }

// FrameVersion is the version of the frame layout.
const FrameVersion = 1

// MaxFrameMeta bounds a frame's message: counts and error strings, never events.
const MaxFrameMeta = 16 << 20

const frameHeader = 24

// FrameType says what a frame carries; each type travels in one direction only.
type FrameType uint8

const (
	// Host to plugin.
	FrameWrite       FrameType = 1 // Batch (events apart): Sink.Write
	FrameEnrich      FrameType = 2 // Batch (events apart): Enricher.Enrich
	FrameCancel      FrameType = 3 // no message: the call or stream id is cancelled
	FrameRun         FrameType = 4 // no message: Source.Run, as stream id
	FrameSourceAck   FrameType = 5 // SourceAck on stream id
	FrameSourceClose FrameType = 6 // no message: the host will send no more on stream id

	// Plugin to host.
	FrameWriteResp  FrameType = 16 // WriteResponse
	FrameEnrichResp FrameType = 17 // EnrichResponse (its batch's events apart)
	FrameCallError  FrameType = 18 // Error: the call failed as a gRPC call would (not configured, undecodable batch)
	FrameSourceMsg  FrameType = 19 // SourceMessage (a batch's events apart)
	FrameSourceEOF  FrameType = 20 // no message: Run returned; stream id is over
)

var frameNames = map[FrameType]string{
	FrameWrite: "write", FrameEnrich: "enrich", FrameCancel: "cancel", FrameRun: "run",
	FrameSourceAck: "source ack", FrameSourceClose: "source close",
	FrameWriteResp: "write response", FrameEnrichResp: "enrich response", FrameCallError: "call error",
	FrameSourceMsg: "source message", FrameSourceEOF: "source end",
}

func (t FrameType) String() string {
	if n, ok := frameNames[t]; ok {
		return n
	}
	return fmt.Sprintf("frame type %d", uint8(t))
}

// FromHost reports whether t is a frame type the host sends.
func (t FrameType) FromHost() bool { return t >= FrameWrite && t <= FrameSourceClose }

// FromPlugin reports whether t is a frame type a plugin sends.
func (t FrameType) FromPlugin() bool { return t >= FrameWriteResp && t <= FrameSourceEOF }

// ErrBadFrame wraps every violation of the frame layout.
var ErrBadFrame = errors.New("bad frame on the plugin data channel")

// Frame is one frame as read: Meta is valid until the next ReadFrame; Events, when not nil,
// is a buffer from Buffers that the receiver owns (PutEvents gives it back).
type Frame struct {
	Type   FrameType
	ID     uint64
	Meta   []byte
	Events []byte
}

// PutEvents gives a received frame's events back to Buffers.
func PutEvents(b []byte) {
	if cap(b) > 0 {
		Buffers.Put(&b)
	}
}

// FrameConn reads and writes frames on one end of a data channel. One goroutine reads;
// any number write, one frame at a time.
//
// A channel is two socketpairs, one for each direction (Socketpairs), or, with a plugin
// built before that, one socketpair both ways. One each way matters for the wake-ups: Go
// waits for every socket it reads in its poller, for reading and for writing alike, so a
// socket that is written and read wakes its process whenever the peer has read what it
// wrote (the socket has room again) as well as when an answer comes: two wake-ups per batch
// where one is needed, which cost a tenth of a batch's CPU. Each direction has its own
// socket: the reading end is in Go's poller, and the writing end is written with plain
// system calls, outside it (it never has to wait in practice: a batch is far smaller than
// the socket's buffer; when it must, it polls for room).
type FrameConn struct {
	conn *net.UnixConn // reads; and writes, when wfd is -1 (one socketpair both ways)
	r    *bufio.Reader
	meta []byte
	hdr  [frameHeader]byte

	wsem    chan struct{} // one writer at a time; waiting for it can be given up
	wbuf    []byte
	wfd     int // the writing end, outside the poller (non-blocking); -1: conn
	wclosed atomic.Bool
}

// readBuffer is the frame reader's buffer: large enough that the small frames that follow
// one another (answers, acknowledgements) come in one read, small enough that a batch's
// events are mostly read straight into their own buffer rather than copied through it.
const readBuffer = 32 << 10

// NewFrameConn uses c, one end of a one-socketpair data channel, both ways.
func NewFrameConn(c *net.UnixConn) *FrameConn {
	return &FrameConn{conn: c, r: bufio.NewReaderSize(c, readBuffer), wsem: make(chan struct{}, 1), wfd: -1}
}

// NewSplitFrameConn reads frames from r and writes them to w, the ends of two socketpairs
// (Socketpairs); it owns w's descriptor from now on (w is closed).
func NewSplitFrameConn(r *net.UnixConn, w *os.File) (*FrameConn, error) {
	fd, err := unix.FcntlInt(w.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	w.Close()
	if err != nil {
		return nil, fmt.Errorf("plugin data channel: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("plugin data channel: %w", err)
	}
	return &FrameConn{conn: r, r: bufio.NewReaderSize(r, readBuffer), wsem: make(chan struct{}, 1), wfd: fd}, nil
}

// Close closes the channel; a blocked read or write returns.
func (fc *FrameConn) Close() error {
	err := fc.conn.Close()
	if fc.wfd >= 0 && fc.wclosed.CompareAndSwap(false, true) {
		_ = unix.Shutdown(fc.wfd, unix.SHUT_RDWR) // the peer sees the end at once
		// The descriptor is closed by the writer that holds it, or here once none does (a
		// writer waiting for room sees wclosed within a poll interval).
		go func() {
			fc.wsem <- struct{}{}
			unix.Close(fc.wfd)
			<-fc.wsem
		}()
	}
	return err
}

// closeLocked is Close for a writer holding wsem.
func (fc *FrameConn) closeLocked() {
	_ = fc.conn.Close()
	if fc.wfd >= 0 && fc.wclosed.CompareAndSwap(false, true) {
		_ = unix.Shutdown(fc.wfd, unix.SHUT_RDWR)
		unix.Close(fc.wfd)
	}
}

// ReadFrames reads frames and hands each to handle until the channel ends or handle returns
// an error; it returns why it stopped. A frame handle refused gives its events back, but
// for ErrHandedOff: handle took the frame, and another goroutine reads on. It is the
// receive loop of both sides.
func (fc *FrameConn) ReadFrames(handle func(Frame) error) error {
	for {
		f, err := fc.ReadFrame()
		if err != nil {
			return err
		}
		if err := handle(f); err != nil {
			if !errors.Is(err, ErrHandedOff) {
				PutEvents(f.Events)
			}
			return err
		}
	}
}

// ErrHandedOff, from a ReadFrames handler: it took its frame, and from now on another
// goroutine reads the channel (ReadFrames on the same FrameConn); this one stops.
var ErrHandedOff = errors.New("plugin data channel: reading handed to another goroutine")

// Ended reports whether err, from ReadFrames, is the channel's end (the peer closed it, or
// this side did) rather than a broken rule.
func Ended(err error) bool { return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) }

// BadFrame is an error for a frame that breaks the protocol (ErrBadFrame).
func BadFrame(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadFrame, fmt.Sprintf(format, args...))
}

// Buffered reports whether more of what the peer sent is already read in: a reader that
// may serve a call itself, before reading on, does not when more frames wait.
func (fc *FrameConn) Buffered() bool { return fc.r.Buffered() > 0 }

// ReadFrame reads the next frame, checking its header before reading the rest.
func (fc *FrameConn) ReadFrame() (Frame, error) {
	if _, err := io.ReadFull(fc.r, fc.hdr[:]); err != nil {
		return Frame{}, err
	}
	h := fc.hdr[:]
	typ := FrameType(h[3])
	metaLen, evLen := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint32(h[8:])
	switch {
	case h[0] != 'f' || h[1] != 'P':
		return Frame{}, fmt.Errorf("%w: no frame magic (got %#x %#x)", ErrBadFrame, h[0], h[1])
	case h[2] != FrameVersion:
		return Frame{}, fmt.Errorf("%w: frame version %d, this build speaks %d", ErrBadFrame, h[2], FrameVersion)
	case frameNames[typ] == "":
		return Frame{}, fmt.Errorf("%w: unknown frame type %d", ErrBadFrame, uint8(typ))
	case metaLen > MaxFrameMeta:
		return Frame{}, fmt.Errorf("%w: %s message of %d bytes (at most %d)", ErrBadFrame, typ, metaLen, MaxFrameMeta)
	case evLen > MaxMessageSize:
		return Frame{}, fmt.Errorf("%w: %s events of %d bytes (at most %d)", ErrBadFrame, typ, evLen, MaxMessageSize)
	case binary.BigEndian.Uint32(h[12:]) != 0:
		return Frame{}, fmt.Errorf("%w: reserved header bytes are not zero", ErrBadFrame)
	}
	f := Frame{Type: typ, ID: binary.BigEndian.Uint64(h[16:])}
	if cap(fc.meta) < int(metaLen) {
		fc.meta = make([]byte, metaLen)
	}
	f.Meta = fc.meta[:metaLen]
	if _, err := io.ReadFull(fc.r, f.Meta); err != nil {
		return Frame{}, truncated(err)
	}
	if cap(fc.meta) > 1<<20 {
		fc.meta = nil // a rare large message is not kept
	}
	if evLen > 0 {
		buf := Buffers.Get(int(evLen))
		if _, err := io.ReadFull(fc.r, *buf); err != nil {
			Buffers.Put(buf)
			return Frame{}, truncated(err)
		}
		f.Events = *buf
	}
	return f, nil
}

func truncated(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// errWriteAborted: a write was cut short (the caller gave up while it was blocked), so the
// channel holds a partial frame and cannot be used any more.
var errWriteAborted = errors.New("plugin data channel: a frame write was interrupted; the channel is unusable")

// WriteFrame writes one frame: meta marshalled (nil for none), then events. When ctx ends,
// the write is given up: while waiting for another writer, at no cost; during the write, by
// breaking the channel (a partial frame cannot be taken back), which the caller must treat
// as the plugin failing.
func (fc *FrameConn) WriteFrame(ctx context.Context, typ FrameType, id uint64, meta proto.Message, events []byte) error {
	select {
	case fc.wsem <- struct{}{}:
	case <-ctx.Done():
		return errGaveUp
	}
	defer func() { <-fc.wsem }()
	var metaLen int
	if meta != nil {
		metaLen = proto.Size(meta)
	}
	if metaLen > MaxFrameMeta || len(events) > MaxMessageSize {
		return fmt.Errorf("plugin data channel: %s frame too large (message %d, events %d bytes)", typ, metaLen, len(events))
	}
	// Small events go in the same buffer as the header (one write); large ones, and every
	// one on a split channel, are written from where they are (writev), without a copy.
	inline := fc.wfd < 0 && len(events) <= 64<<10
	need := frameHeader + metaLen
	if inline {
		need += len(events)
	}
	if cap(fc.wbuf) < need {
		fc.wbuf = make([]byte, 0, max(need, 64<<10+4096))
	}
	b := fc.wbuf[:frameHeader]
	b[0], b[1], b[2], b[3] = 'f', 'P', FrameVersion, byte(typ)
	binary.BigEndian.PutUint32(b[4:], uint32(metaLen))
	binary.BigEndian.PutUint32(b[8:], uint32(len(events)))
	binary.BigEndian.PutUint32(b[12:], 0)
	binary.BigEndian.PutUint64(b[16:], id)
	if meta != nil {
		var err error
		if b, err = (proto.MarshalOptions{}).MarshalAppend(b, meta); err != nil {
			return err
		}
	}
	if inline {
		b = append(b, events...)
	}
	if cap(fc.wbuf) > 1<<20 {
		fc.wbuf = nil
	} else {
		fc.wbuf = b[:0]
	}
	if fc.wfd >= 0 {
		return fc.writeRaw(ctx, b, events, inline)
	}
	var (
		stop    func() bool
		aborted chan struct{}
	)
	if ctx.Done() != nil {
		// The write is given up only if it blocks: a deadline in the past ends it.
		aborted = make(chan struct{})
		stop = context.AfterFunc(ctx, func() { _ = fc.conn.SetWriteDeadline(time.Unix(1, 0)); close(aborted) })
	}
	var err error
	if inline {
		_, err = fc.conn.Write(b)
	} else {
		bufs := net.Buffers{b, events}
		_, err = bufs.WriteTo(fc.conn)
	}
	if stop != nil && !stop() {
		<-aborted
		if err == nil {
			_ = fc.conn.SetWriteDeadline(time.Time{}) // it completed before the deadline took
			return nil
		}
		_ = fc.conn.Close()
		return errWriteAborted
	}
	if err != nil {
		_ = fc.conn.Close() // a partial frame may have gone: nothing after it can be read
	}
	return err
}

// writeRaw writes a frame (b, then events unless inline) to the writing end, outside the
// poller: one writev, as a rule; when the socket is full, it waits for room with poll(2),
// giving up when ctx ends or the channel closes, which breaks the channel as a partial frame
// would (see WriteFrame).
func (fc *FrameConn) writeRaw(ctx context.Context, b, events []byte, inline bool) error {
	if fc.wclosed.Load() {
		return net.ErrClosed
	}
	raceReleaseIO(fc.wfd)
	iov := [][]byte{b, events}
	if inline || len(events) == 0 {
		iov = iov[:1]
	}
	for len(iov) > 0 {
		n, err := unix.SendmsgBuffers(fc.wfd, iov, nil, nil, unix.MSG_NOSIGNAL)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			if err := fc.waitRoom(ctx); err != nil {
				fc.closeLocked()
				return err
			}
			continue
		case err != nil:
			fc.closeLocked() // a partial frame may have gone: nothing after it can be read
			return fmt.Errorf("plugin data channel: write: %w", err)
		}
		for len(iov) > 0 && n >= len(iov[0]) {
			n -= len(iov[0])
			iov = iov[1:]
		}
		if len(iov) > 0 {
			iov[0] = iov[0][n:]
		}
	}
	return nil
}

// waitRoom waits until the writing end has room, checking ctx and the channel's end between
// polls.
func (fc *FrameConn) waitRoom(ctx context.Context) error {
	for {
		if fc.wclosed.Load() {
			return net.ErrClosed
		}
		if ctx.Err() != nil {
			return errWriteAborted
		}
		fds := []unix.PollFd{{Fd: int32(fc.wfd), Events: unix.POLLOUT}}
		n, err := unix.Poll(fds, 20)
		if err != nil && err != unix.EINTR {
			return fmt.Errorf("plugin data channel: poll: %w", err)
		}
		if n > 0 {
			if fds[0].Revents&(unix.POLLERR|unix.POLLHUP) != 0 && fds[0].Revents&unix.POLLOUT == 0 {
				return fmt.Errorf("plugin data channel: the peer closed it: %w", io.ErrClosedPipe)
			}
			return nil
		}
	}
}

// errGaveUp: the caller gave up before its frame was written; the channel is intact.
var errGaveUp = errors.New("plugin data channel: gave up waiting to send")

// IsGaveUp reports whether WriteFrame returned because ctx ended before it wrote
// anything (the channel is intact).
func IsGaveUp(err error) bool { return errors.Is(err, errGaveUp) }

// Socketpair returns the two ends of a new socketpair: one ready to read (and write) as a
// connection, and the other, to pass down as an inherited file or to wrap (both close on
// exec in this process).
func Socketpair() (host *net.UnixConn, plugin *os.File, err error) {
	hf, plugin, err := rawSocketpair()
	if err != nil {
		return nil, nil, err
	}
	defer hf.Close() // FileConn has its own copy
	c, err := net.FileConn(hf)
	if err != nil {
		plugin.Close()
		return nil, nil, fmt.Errorf("plugin data channel: %w", err)
	}
	return c.(*net.UnixConn), plugin, nil
}

func rawSocketpair() (a, b *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("plugin data channel: socketpair: %w", err)
	}
	for _, fd := range fds {
		// A batch is hundreds of kilobytes: large buffers let one be written in one go.
		// Beyond net.core.wmem_max only with CAP_NET_ADMIN (FORCE); the default otherwise.
		for _, opt := range []int{unix.SO_SNDBUFFORCE, unix.SO_RCVBUFFORCE} {
			_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, 4<<20)
		}
	}
	return os.NewFile(uintptr(fds[0]), "flowpipe-data"), os.NewFile(uintptr(fds[1]), "flowpipe-data"), nil
}

// Channel is a new data channel, before the host knows how the plugin uses it: two
// socketpairs, In (host to plugin) and Out (plugin to host). The plugin inherits InChild as
// DataFDEnv and OutChild as DataOutFDEnv; a plugin built before the split ignores OutChild
// and uses InChild both ways.
type Channel struct {
	InHost, OutHost   *os.File
	InChild, OutChild *os.File
}

// NewChannel makes the socketpairs of a data channel.
func NewChannel() (*Channel, error) {
	inHost, inChild, err := rawSocketpair()
	if err != nil {
		return nil, err
	}
	outHost, outChild, err := rawSocketpair()
	if err != nil {
		inHost.Close()
		inChild.Close()
		return nil, err
	}
	return &Channel{InHost: inHost, OutHost: outHost, InChild: inChild, OutChild: outChild}, nil
}

// CloseChildren closes the plugin's ends in this process (once the plugin has its copies).
func (c *Channel) CloseChildren() {
	c.InChild.Close()
	c.OutChild.Close()
}

// Close closes every end still held.
func (c *Channel) Close() {
	c.CloseChildren()
	c.InHost.Close()
	c.OutHost.Close()
}

// HostConn is the host's end: split when the plugin said it writes on Out
// (DescribeResponse.data_channel_out), else In both ways. The Channel's host files are
// consumed.
func (c *Channel) HostConn(split bool) (*FrameConn, error) {
	if !split {
		c.OutHost.Close()
		defer c.InHost.Close() // FileConn has its own copy
		conn, err := net.FileConn(c.InHost)
		if err != nil {
			return nil, fmt.Errorf("plugin data channel: %w", err)
		}
		return NewFrameConn(conn.(*net.UnixConn)), nil
	}
	r, err := net.FileConn(c.OutHost)
	c.OutHost.Close()
	if err != nil {
		c.InHost.Close()
		return nil, fmt.Errorf("plugin data channel: %w", err)
	}
	return NewSplitFrameConn(r.(*net.UnixConn), c.InHost)
}

// PluginConn is the plugin's end of a channel the host made in this process (in memory):
// split, as a plugin of this build uses it. The Channel's child files are consumed.
func (c *Channel) PluginConn() (*FrameConn, error) {
	r, err := net.FileConn(c.InChild)
	c.InChild.Close()
	if err != nil {
		c.OutChild.Close()
		return nil, fmt.Errorf("plugin data channel: %w", err)
	}
	return NewSplitFrameConn(r.(*net.UnixConn), c.OutChild)
}

// DataOutFDEnv names the descriptor a plugin process writes its frames to (the Out
// socketpair of the channel); without it, the plugin writes on DataFDEnv's.
const DataOutFDEnv = "FLOWPIPE_PLUGIN_DATA_OUT_FD"

// OpenDataFDs takes the data channel a plugin process inherited: it reads at fd and writes at
// out (-1: at fd too, as from a host before the split). The inherited descriptors are closed
// (the channel keeps close-on-exec copies), so that nothing the plugin runs inherits it.
func OpenDataFDs(fd, out int) (fc *FrameConn, split bool, err error) {
	r, err := OpenDataFD(fd)
	if err != nil {
		if out >= 0 {
			unix.Close(out)
		}
		return nil, false, err
	}
	if out < 0 {
		return NewFrameConn(r), false, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(out, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		r.Close()
		return nil, false, fmt.Errorf("plugin data channel fd %d is not a socket", out)
	}
	fc, err = NewSplitFrameConn(r, os.NewFile(uintptr(out), "flowpipe-data-out"))
	if err != nil {
		r.Close()
		return nil, false, err
	}
	return fc, true, nil
}

// OpenDataFD takes the data channel a plugin process inherited at fd. The inherited
// descriptor is closed (the connection keeps a close-on-exec copy), so that nothing the
// plugin runs inherits the channel.
func OpenDataFD(fd int) (*net.UnixConn, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("plugin data channel fd %d: %w", fd, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("plugin data channel fd %d is not a socket", fd)
	}
	f := os.NewFile(uintptr(fd), "flowpipe-data")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("plugin data channel fd %d: %w", fd, err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("plugin data channel fd %d is not a Unix socket", fd)
	}
	return uc, nil
}

// SyscallConn is the channel's socket, for inspection.
func (fc *FrameConn) SyscallConn() (syscall.RawConn, error) { return fc.conn.SyscallConn() }
