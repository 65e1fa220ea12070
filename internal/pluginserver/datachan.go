package pluginserver

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// ServeData serves the component's batches on the data channel fc (pluginproto, frame.go)
// beside the gRPC services, which stay for everything else: Describe then tells the host
// to use it (split: on two socketpairs, DescribeResponse.data_channel_out). It reads frames
// until the host closes its end (the host may not use the channel at all, or the host is
// gone: the Watch stream deals with that) or sends one that breaks the layout; it never
// blocks the caller.
func (s *Server) ServeData(fc *pb.FrameConn, split bool) {
	ds := &dataServer{s: s, fc: fc, calls: map[uint64]context.CancelFunc{}, streams: map[uint64]*pluginStream{}}
	s.data.Store(true)
	s.dataOut.Store(split)
	go ds.read()
}

type dataServer struct {
	s  *Server
	fc *pb.FrameConn

	mu      sync.Mutex
	calls   map[uint64]context.CancelFunc
	streams map[uint64]*pluginStream
	done    bool
}

func (ds *dataServer) read() {
	err := ds.fc.ReadFrames(ds.dispatch)
	if errors.Is(err, pb.ErrHandedOff) {
		return
	}
	if !pb.Ended(err) {
		ds.s.log.Error("plugin data channel: reading from the host failed; closing it", "error", err)
	}
	_ = ds.fc.Close()
	ds.mu.Lock()
	ds.done = true
	calls, streams := ds.calls, ds.streams
	ds.calls, ds.streams = nil, nil
	ds.mu.Unlock()
	for _, cancel := range calls {
		cancel()
	}
	for _, st := range streams {
		st.hostGone()
	}
}

// inlineFor is how long a call served by the reader itself may run before another goroutine
// takes over the reading (so that a cancel, or another call, is read meanwhile).
const inlineFor = 500 * time.Microsecond

func (ds *dataServer) dispatch(f pb.Frame) error {
	if !f.Type.FromHost() {
		return badFrame("the host sent a %s frame, which only a plugin sends", f.Type)
	}
	switch f.Type {
	case pb.FrameWrite, pb.FrameEnrich:
		req := &pb.Batch{}
		if err := proto.Unmarshal(f.Meta, req); err != nil {
			return badFrame("%s %d: %v", f.Type, f.ID, err)
		}
		if len(req.Events) != 0 {
			return badFrame("%s %d has events in its message", f.Type, f.ID)
		}
		req.Events = f.Events
		ctx, cancel := context.WithCancel(context.Background())
		ds.mu.Lock()
		if _, dup := ds.calls[f.ID]; dup {
			ds.mu.Unlock()
			cancel()
			return badFrame("%s %d: the id is in use", f.Type, f.ID)
		}
		alone := len(ds.calls) == 0
		ds.calls[f.ID] = cancel
		ds.mu.Unlock()
		if !alone || ds.fc.Buffered() {
			go ds.serveCall(ctx, f.Type, f.ID, req)
			return nil
		}
		// The only call, and nothing else has come: served here, which saves waking another
		// goroutine (and a thread) per batch. Should it take long, a new reader takes over,
		// and this one ends once the call is served.
		var taken atomic.Bool
		t := time.AfterFunc(inlineFor, func() {
			if taken.CompareAndSwap(false, true) {
				go ds.read()
			}
		})
		ds.serveCall(ctx, f.Type, f.ID, req)
		t.Stop()
		if !taken.CompareAndSwap(false, true) {
			return pb.ErrHandedOff
		}
	case pb.FrameCancel:
		ds.mu.Lock()
		cancel := ds.calls[f.ID]
		st := ds.streams[f.ID]
		ds.mu.Unlock()
		if cancel != nil {
			cancel()
		}
		if st != nil {
			st.hostGone()
		}
	case pb.FrameRun:
		st := &pluginStream{ds: ds, id: f.ID, acks: make(chan *pb.SourceAck, 1024), gone: make(chan struct{}), closed: make(chan struct{})}
		ds.mu.Lock()
		if _, dup := ds.streams[f.ID]; dup {
			ds.mu.Unlock()
			return badFrame("run %d: the stream is running", f.ID)
		}
		ds.streams[f.ID] = st
		ds.mu.Unlock()
		go func() {
			_ = ds.s.run(st)
			ds.mu.Lock()
			delete(ds.streams, f.ID)
			ds.mu.Unlock()
			_ = ds.fc.WriteFrame(context.Background(), pb.FrameSourceEOF, f.ID, nil, nil)
		}()
	case pb.FrameSourceAck, pb.FrameSourceClose:
		ds.mu.Lock()
		st := ds.streams[f.ID]
		ds.mu.Unlock()
		if st == nil {
			return nil // the stream ended meanwhile
		}
		if f.Type == pb.FrameSourceClose {
			st.closeSend()
			return nil
		}
		a := &pb.SourceAck{}
		if err := proto.Unmarshal(f.Meta, a); err != nil {
			return badFrame("source ack on stream %d: %v", f.ID, err)
		}
		st.deliver(a)
	}
	return nil
}

var badFrame = pb.BadFrame

// serveCall runs one Write or Enrich, as the gRPC service would, and sends its answer.
func (ds *dataServer) serveCall(ctx context.Context, typ pb.FrameType, id uint64, req *pb.Batch) {
	var (
		answer   proto.Message
		events   []byte
		respType pb.FrameType
		err      error
	)
	if typ == pb.FrameWrite {
		respType = pb.FrameWriteResp
		answer, err = ds.s.Write(ctx, req)
	} else {
		respType = pb.FrameEnrichResp
		var r *pb.EnrichResponse
		if r, err = ds.s.Enrich(ctx, req); err == nil && r.Batch != nil {
			events, r.Batch.Events = r.Batch.Events, nil // from Buffers (EncodeBatch)
		}
		answer = r
	}
	pb.PutEvents(req.Events)
	ds.mu.Lock()
	cancel := ds.calls[id]
	delete(ds.calls, id)
	ds.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	if err != nil {
		respType, answer, events = pb.FrameCallError, &pb.Error{Message: status.Convert(err).Message()}, nil
	}
	if werr := ds.fc.WriteFrame(context.Background(), respType, id, answer, events); werr != nil && !errors.Is(werr, net.ErrClosed) {
		ds.s.log.Debug("plugin data channel: send an answer", "error", werr)
	}
	pb.PutEvents(events)
}

// pluginStream is a source's Run stream on the data channel.
type pluginStream struct {
	ds   *dataServer
	id   uint64
	acks chan *pb.SourceAck
	gone chan struct{} // the host cancelled the stream, or the channel ended
	once sync.Once
	// closed: the host sent FrameSourceClose; Recv returns io.EOF once acks are drained.
	closeOnce sync.Once
	closed    chan struct{}
}

func (st *pluginStream) hostGone()  { st.once.Do(func() { close(st.gone) }) }
func (st *pluginStream) closeSend() { st.closeOnce.Do(func() { close(st.closed) }) }

// deliver hands an acknowledgement to Recv. The reader waits while Recv is behind, which
// holds only this plugin's frames.
func (st *pluginStream) deliver(a *pb.SourceAck) {
	select {
	case st.acks <- a:
	case <-st.gone:
	}
}

var errStreamGone = errors.New("the host cancelled the source stream")

func (st *pluginStream) Send(m *pb.SourceMessage) error {
	select {
	case <-st.gone:
		return errStreamGone
	default:
	}
	var events []byte
	if b := m.GetBatch(); b != nil && b.Batch != nil {
		// The events go as they are, after the message.
		events = b.Batch.Events
		b.Batch.Events = nil
		defer func() { b.Batch.Events = events }()
	}
	// Not given up when the stream is cancelled meanwhile: the host reads every frame, and
	// a frame cut short would end the channel.
	return st.ds.fc.WriteFrame(context.Background(), pb.FrameSourceMsg, st.id, m, events)
}

func (st *pluginStream) Recv() (*pb.SourceAck, error) {
	select {
	case a := <-st.acks:
		return a, nil
	default:
	}
	select {
	case a := <-st.acks:
		return a, nil
	case <-st.closed:
		select {
		case a := <-st.acks:
			return a, nil
		default:
		}
		return nil, io.EOF
	case <-st.gone:
		return nil, context.Canceled
	}
}
