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
type FrameConn struct {
	conn *net.UnixConn
	r    *bufio.Reader
	meta []byte
	hdr  [frameHeader]byte

	wsem chan struct{} // one writer at a time; waiting for it can be given up
	wbuf []byte
}

// NewFrameConn uses c, one end of a data channel.
func NewFrameConn(c *net.UnixConn) *FrameConn {
	return &FrameConn{conn: c, r: bufio.NewReaderSize(c, 256<<10), wsem: make(chan struct{}, 1)}
}

// Close closes the channel; a blocked read or write returns.
func (fc *FrameConn) Close() error { return fc.conn.Close() }

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
	// Small events go in the same buffer as the header (one write); large ones are written
	// from where they are (writev), without a copy.
	inline := len(events) <= 64<<10
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

// errGaveUp: the caller gave up before its frame was written; the channel is intact.
var errGaveUp = errors.New("plugin data channel: gave up waiting to send")

// IsGaveUp reports whether WriteFrame returned because ctx ended before it wrote
// anything (the channel is intact).
func IsGaveUp(err error) bool { return errors.Is(err, errGaveUp) }

// Socketpair returns the two ends of a new data channel: the host's, ready to use, and the
// plugin's, to pass down as an inherited file (both close on exec in this process).
func Socketpair() (host *net.UnixConn, plugin *os.File, err error) {
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
	hf := os.NewFile(uintptr(fds[0]), "flowpipe-data-host")
	defer hf.Close() // FileConn has its own copy
	c, err := net.FileConn(hf)
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("plugin data channel: %w", err)
	}
	return c.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "flowpipe-data-plugin"), nil
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
