package pluginhost

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

func rawFrame(typ pb.FrameType, id uint64, meta proto.Message, events []byte) []byte {
	var m []byte
	if meta != nil {
		m, _ = proto.Marshal(meta)
	}
	h := make([]byte, 24, 24+len(m)+len(events))
	h[0], h[1], h[2], h[3] = 'f', 'P', pb.FrameVersion, byte(typ)
	binary.BigEndian.PutUint32(h[4:], uint32(len(m)))
	binary.BigEndian.PutUint32(h[8:], uint32(len(events)))
	binary.BigEndian.PutUint64(h[16:], id)
	return append(append(h, m...), events...)
}

// Whatever a plugin writes into its data channel, the host neither panics nor answers a call
// with it unless it is a well-formed answer to that call: a write that is not ends the
// channel and fails the plugin, and the call in progress returns an error.
func FuzzHostDataChannel(f *testing.F) {
	f.Add([]byte("this is not a frame, and it is longer than a header"))
	f.Add(rawFrame(pb.FrameWrite, 1, &pb.Batch{}, nil))                                 // a host frame
	f.Add(rawFrame(pb.FrameWriteResp, 7, &pb.WriteResponse{}, nil))                     // a call never made
	f.Add(rawFrame(pb.FrameWriteResp, 1, &pb.WriteResponse{}, []byte{1, 2}))            // events on a write
	f.Add(rawFrame(pb.FrameEnrichResp, 1, &pb.EnrichResponse{}, []byte{3}))             // events, no batch
	f.Add(rawFrame(pb.FrameSourceMsg, 9, &pb.SourceMessage{}, nil))                     // no such stream
	f.Add(rawFrame(pb.FrameCallError, 1, nil, nil))                                     // a well-formed error
	f.Add(append(rawFrame(pb.FrameWriteResp, 1, &pb.WriteResponse{}, nil), 0xff, 0xff)) // then garbage
	f.Fuzz(func(t *testing.T, data []byte) {
		h, child, err := pb.Socketpair()
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.FileConn(child)
		child.Close()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		d := newDataConn(pb.NewFrameConn(h))
		failed := make(chan error, 1)
		d.start(func(err error) { failed <- err })
		defer d.close()
		// The plugin side reads what the host sends and writes data back, then closes.
		go func() {
			buf := make([]byte, 64<<10)
			_, _ = c.Read(buf)
			_, _ = c.Write(data)
			c.(*net.UnixConn).CloseWrite()
			for {
				if _, err := c.Read(buf); err != nil {
					return
				}
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		evs := seqEvents(0, 3)
		buf, msg, _ := pb.EncodeBatch(evs, "")
		defer pb.Buffers.Put(buf)
		resp, err := sinkData{d}.Write(ctx, msg)
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatal("the call neither got an answer nor failed")
		}
		if err == nil && resp == nil {
			t.Fatal("no answer and no error")
		}
		select {
		case err := <-failed:
			if err == nil {
				t.Fatal("the channel failed without a reason")
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the channel did not end after the plugin closed it")
		}
	})
}
