package pluginproto

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

func framePair(t *testing.T) (*FrameConn, *net.UnixConn) {
	t.Helper()
	h, child, err := Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.FileConn(child)
	child.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(); c.Close() })
	return NewFrameConn(h), c.(*net.UnixConn)
}

func header(typ FrameType, metaLen, evLen uint32, id uint64) []byte {
	h := make([]byte, frameHeader)
	h[0], h[1], h[2], h[3] = 'f', 'P', FrameVersion, byte(typ)
	binary.BigEndian.PutUint32(h[4:], metaLen)
	binary.BigEndian.PutUint32(h[8:], evLen)
	binary.BigEndian.PutUint64(h[16:], id)
	return h
}

func TestFrameRoundTrip(t *testing.T) {
	r, w := framePair(t)
	wc := NewFrameConn(w)
	events := bytes.Repeat([]byte{7}, 300<<10) // written from where it is (writev)
	small := []byte{1, 2, 3}
	go func() {
		_ = wc.WriteFrame(context.Background(), FrameSourceMsg, 42, &SourceAck{Id: 9, Message: "m"}, events)
		_ = wc.WriteFrame(context.Background(), FrameWriteResp, 43, &WriteResponse{Error: "e"}, small)
		_ = wc.WriteFrame(context.Background(), FrameSourceEOF, 44, nil, nil)
	}()
	f, err := r.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	var a SourceAck
	if err := proto.Unmarshal(f.Meta, &a); err != nil || f.Type != FrameSourceMsg || f.ID != 42 || a.Id != 9 || a.Message != "m" || !bytes.Equal(f.Events, events) {
		t.Fatalf("frame 1: %v %d %v %v (events equal: %v)", f.Type, f.ID, &a, err, bytes.Equal(f.Events, events))
	}
	PutEvents(f.Events)
	f, err = r.ReadFrame()
	var wr WriteResponse
	if err != nil || proto.Unmarshal(f.Meta, &wr) != nil || f.ID != 43 || wr.Error != "e" || !bytes.Equal(f.Events, small) {
		t.Fatalf("frame 2: %+v %v", f, err)
	}
	f, err = r.ReadFrame()
	if err != nil || f.Type != FrameSourceEOF || f.ID != 44 || len(f.Meta) != 0 || f.Events != nil {
		t.Fatalf("frame 3: %+v %v", f, err)
	}
}

// Every header field is checked before anything is allocated or read for it.
func TestBadFrames(t *testing.T) {
	bad := func(mod func(h []byte)) []byte {
		h := header(FrameWriteResp, 0, 0, 1)
		mod(h)
		return h
	}
	for name, data := range map[string][]byte{
		"magic":           bad(func(h []byte) { h[0] = 'x' }),
		"version":         bad(func(h []byte) { h[2] = 9 }),
		"type":            bad(func(h []byte) { h[3] = 200 }),
		"reserved":        bad(func(h []byte) { h[13] = 1 }),
		"meta too large":  header(FrameWriteResp, MaxFrameMeta+1, 0, 1),
		"huge meta":       header(FrameWriteResp, 0xffffffff, 0, 1),
		"events too long": header(FrameSourceMsg, 0, MaxMessageSize+1, 1),
		"text":            []byte("this is not a frame, and it is longer than a header"),
	} {
		t.Run(name, func(t *testing.T) {
			r, w := framePair(t)
			if _, err := w.Write(data); err != nil {
				t.Fatal(err)
			}
			if _, err := r.ReadFrame(); !errors.Is(err, ErrBadFrame) {
				t.Fatalf("ReadFrame = %v, want ErrBadFrame", err)
			}
		})
	}
	t.Run("truncated", func(t *testing.T) {
		r, w := framePair(t)
		_, _ = w.Write(append(header(FrameSourceMsg, 0, 1000, 1), 1, 2, 3))
		w.Close()
		if _, err := r.ReadFrame(); !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("ReadFrame = %v, want io.ErrUnexpectedEOF", err)
		}
	})
}

// A write blocked because the peer does not read is given up when done closes, and the
// channel, holding a partial frame, is closed.
func TestWriteFrameGivesUp(t *testing.T) {
	_, w := framePair(t)
	wc := NewFrameConn(w)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- wc.WriteFrame(ctx, FrameWrite, 1, nil, make([]byte, 64<<20)) }()
	// Wait until the write has begun: the socket's send queue holds part of the frame.
	raw, err := w.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for queued := 0; queued == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the write did not start")
		}
		_ = raw.Control(func(fd uintptr) { queued, _ = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) })
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-errc; err == nil {
		t.Fatal("a write to a peer that never reads returned nil")
	}
	if err := wc.WriteFrame(context.Background(), FrameCancel, 2, nil, nil); err == nil {
		t.Fatal("the channel is still usable after a partial frame")
	}
}

func TestOpenDataFDRefusesFiles(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := OpenDataFD(int(f.Fd())); err == nil {
		t.Fatal("a regular file was taken as the data channel")
	}
}
