package pluginhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// dataConn is the host's end of a plugin's data channel (pluginproto, frame.go): it sends
// Write and Enrich calls and runs a source's stream as frames, and reads the answers in one
// goroutine. It serves the same messages as the gRPC clients it replaces, so the host's
// calls read the same either way. A frame that breaks the layout, or an answer to a call
// never made, ends the channel: onFail fails the plugin, which is restarted as after a
// crash, and every call in progress returns an error (the runtime redelivers its batch).
type dataConn struct {
	fc     *pb.FrameConn
	onFail func(error)    // set before the first call; called once, when the channel breaks
	heard  *atomic.Uint64 // counts every frame read, if set (proc.heard)

	mu      sync.Mutex
	next    uint64
	calls   map[uint64]chan dataAnswer
	streams map[uint64]*dataStream
	err     error           // why the channel ended
	closed  chan struct{}   // closed when it ended
	ctx     context.Context // ends when it ended
	cancel  context.CancelFunc
	byHost  bool // close: the host ended it, not the plugin
}

type dataAnswer struct {
	typ    pb.FrameType
	write  *pb.WriteResponse
	enrich *pb.EnrichResponse
	err    error
}

func newDataConn(fc *pb.FrameConn) *dataConn {
	d := &dataConn{fc: fc, calls: map[uint64]chan dataAnswer{}, streams: map[uint64]*dataStream{}, closed: make(chan struct{})}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d
}

// start begins reading answers; onFail is told when the channel breaks without close.
func (d *dataConn) start(onFail func(error)) {
	d.onFail = onFail
	go d.read()
}

// close ends the channel from the host's side (the process is being stopped).
func (d *dataConn) close() {
	d.mu.Lock()
	d.byHost = true
	d.mu.Unlock()
	d.broken(errors.New("plugin data channel closed"))
}

// broken ends the channel once, failing every call and stream in progress with err.
func (d *dataConn) broken(err error) {
	d.mu.Lock()
	if d.err != nil {
		d.mu.Unlock()
		return
	}
	d.err = err
	calls, streams := d.calls, d.streams
	d.calls, d.streams = map[uint64]chan dataAnswer{}, map[uint64]*dataStream{}
	byHost := d.byHost
	close(d.closed)
	d.cancel()
	d.mu.Unlock()
	_ = d.fc.Close()
	for _, ch := range calls {
		ch <- dataAnswer{err: err}
	}
	_ = streams // their Recv sees d.closed
	if !byHost && d.onFail != nil {
		d.onFail(err)
	}
}

func (d *dataConn) failure() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

func (d *dataConn) read() {
	err := d.fc.ReadFrames(d.dispatch)
	if pb.Ended(err) {
		err = fmt.Errorf("plugin data channel: the plugin closed it (it exited or crashed): %w", err)
	}
	d.broken(err)
}

var badFrame = pb.BadFrame

func (d *dataConn) dispatch(f pb.Frame) error {
	if d.heard != nil {
		d.heard.Add(1)
	}
	if !f.Type.FromPlugin() {
		return badFrame("the plugin sent a %s frame, which only the host sends", f.Type)
	}
	switch f.Type {
	case pb.FrameWriteResp, pb.FrameEnrichResp, pb.FrameCallError:
		a := dataAnswer{typ: f.Type}
		switch f.Type {
		case pb.FrameWriteResp:
			a.write = &pb.WriteResponse{}
			if err := proto.Unmarshal(f.Meta, a.write); err != nil {
				return badFrame("write response %d: %v", f.ID, err)
			}
			if f.Events != nil {
				return badFrame("write response %d carries events", f.ID)
			}
		case pb.FrameEnrichResp:
			a.enrich = &pb.EnrichResponse{}
			if err := proto.Unmarshal(f.Meta, a.enrich); err != nil {
				return badFrame("enrich response %d: %v", f.ID, err)
			}
			if a.enrich.Batch != nil {
				if len(a.enrich.Batch.Events) != 0 {
					return badFrame("enrich response %d has events in its message", f.ID)
				}
				a.enrich.Batch.Events = f.Events
			} else if f.Events != nil {
				return badFrame("enrich response %d has events but no batch", f.ID)
			}
		case pb.FrameCallError:
			e := &pb.Error{}
			if err := proto.Unmarshal(f.Meta, e); err != nil {
				return badFrame("call error %d: %v", f.ID, err)
			}
			a.err = fmt.Errorf("plugin: %s", e.Message)
		}
		d.mu.Lock()
		ch, ok := d.calls[f.ID]
		delete(d.calls, f.ID)
		ok = ok || f.ID <= d.next // an answer to a call given up on is dropped
		d.mu.Unlock()
		switch {
		case ch != nil:
			ch <- a
		case !ok:
			return badFrame("%s for call %d, which was never made", f.Type, f.ID)
		default:
			if a.enrich != nil && a.enrich.Batch != nil {
				pb.PutEvents(a.enrich.Batch.Events)
			}
		}
		return nil
	case pb.FrameSourceMsg, pb.FrameSourceEOF:
		d.mu.Lock()
		st := d.streams[f.ID]
		known := f.ID <= d.next
		d.mu.Unlock()
		if !known {
			return badFrame("%s for stream %d, which was never started", f.Type, f.ID)
		}
		if f.Type == pb.FrameSourceEOF {
			if st != nil {
				st.end()
			}
			return nil
		}
		m := &pb.SourceMessage{}
		if err := proto.Unmarshal(f.Meta, m); err != nil {
			return badFrame("source message on stream %d: %v", f.ID, err)
		}
		if b := m.GetBatch(); b != nil && b.Batch != nil {
			if len(b.Batch.Events) != 0 {
				return badFrame("source batch on stream %d has events in its message", f.ID)
			}
			b.Batch.Events = f.Events
		} else if f.Events != nil {
			return badFrame("source message on stream %d has events but no batch", f.ID)
		}
		if st == nil {
			releaseSourceMessage(m) // the stream was cancelled
			return nil
		}
		st.deliver(m, d.closed)
		return nil
	}
	return badFrame("unexpected %s", f.Type)
}

func (d *dataConn) register() (uint64, chan dataAnswer, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err != nil {
		return 0, nil, d.err
	}
	d.next++
	ch := make(chan dataAnswer, 1)
	d.calls[d.next] = ch
	return d.next, ch, nil
}

func (d *dataConn) forget(id uint64) {
	d.mu.Lock()
	delete(d.calls, id)
	d.mu.Unlock()
}

// call sends one Write or Enrich and waits for its answer or for ctx.
func (d *dataConn) call(ctx context.Context, typ pb.FrameType, msg *pb.Batch) (dataAnswer, error) {
	id, ch, err := d.send(ctx, typ, msg)
	if err != nil {
		return dataAnswer{}, err
	}
	return d.wait(ctx, id, ch)
}

// send sends one Write or Enrich; wait waits for its answer.
func (d *dataConn) send(ctx context.Context, typ pb.FrameType, msg *pb.Batch) (uint64, chan dataAnswer, error) {
	id, ch, err := d.register()
	if err != nil {
		return 0, nil, err
	}
	events := msg.Events
	meta := &pb.Batch{Count: msg.Count, Source: msg.Source}
	if err := d.fc.WriteFrame(ctx, typ, id, meta, events); err != nil {
		d.forget(id)
		if pb.IsGaveUp(err) {
			return 0, nil, ctx.Err()
		}
		d.broken(fmt.Errorf("plugin data channel: send %s: %w", typ, err))
		if ctx.Err() != nil {
			return 0, nil, ctx.Err()
		}
		return 0, nil, d.failure()
	}
	return id, ch, nil
}

// wait waits for the answer to call id (send), or for ctx, which cancels the call.
func (d *dataConn) wait(ctx context.Context, id uint64, ch chan dataAnswer) (dataAnswer, error) {
	select {
	case a := <-ch:
		if a.err != nil {
			return a, a.err
		}
		return a, nil
	case <-ctx.Done():
		d.forget(id)
		// The plugin's call is cancelled as a gRPC call's would be; its answer is dropped.
		go func() { _ = d.fc.WriteFrame(d.ctx, pb.FrameCancel, id, nil, nil) }()
		select {
		case a := <-ch: // answered meanwhile (or the channel broke)
			if a.enrich != nil && a.enrich.Batch != nil {
				pb.PutEvents(a.enrich.Batch.Events)
			}
		default:
		}
		return dataAnswer{}, ctx.Err()
	}
}

// sinkData and enricherData are the data channel behind pb.SinkClient and pb.EnricherClient.
type sinkData struct{ d *dataConn }

func (s sinkData) Write(ctx context.Context, in *pb.Batch, _ ...grpc.CallOption) (*pb.WriteResponse, error) {
	a, err := s.d.call(ctx, pb.FrameWrite, in)
	if err != nil {
		return nil, err
	}
	if a.write == nil {
		return nil, fmt.Errorf("plugin data channel: answered a write with a %s", a.typ)
	}
	return a.write, nil
}

type enricherData struct{ d *dataConn }

func (e enricherData) Enrich(ctx context.Context, in *pb.Batch, _ ...grpc.CallOption) (*pb.EnrichResponse, error) {
	a, err := e.d.call(ctx, pb.FrameEnrich, in)
	if err != nil {
		return nil, err
	}
	if a.enrich == nil {
		return nil, fmt.Errorf("plugin data channel: answered an enrich with a %s", a.typ)
	}
	return a.enrich, nil
}

// releaseSourceMessage gives a received source batch's events back to the pool.
func releaseSourceMessage(m *pb.SourceMessage) {
	if b := m.GetBatch(); b != nil && b.Batch != nil {
		pb.PutEvents(b.Batch.Events)
		b.Batch.Events = nil
	}
}

// dataStream is a source's Run stream on the data channel; it has the methods of the gRPC
// stream that remoteSource uses.
type dataStream struct {
	d      *dataConn
	id     uint64
	msgs   chan *pb.SourceMessage
	ended  chan struct{} // the plugin's Run returned (FrameSourceEOF)
	endOne sync.Once
	ctx    context.Context
}

// runSource starts the source's Run on the data channel; cancelling ctx cancels it.
func (d *dataConn) runSource(ctx context.Context) (*dataStream, error) {
	d.mu.Lock()
	if d.err != nil {
		d.mu.Unlock()
		return nil, d.err
	}
	d.next++
	st := &dataStream{d: d, id: d.next, msgs: make(chan *pb.SourceMessage, 16), ended: make(chan struct{}), ctx: ctx}
	d.streams[st.id] = st
	d.mu.Unlock()
	if err := d.fc.WriteFrame(context.Background(), pb.FrameRun, st.id, nil, nil); err != nil {
		d.broken(fmt.Errorf("plugin data channel: start the source: %w", err))
		return nil, d.failure()
	}
	context.AfterFunc(ctx, func() {
		d.mu.Lock()
		delete(d.streams, st.id)
		d.mu.Unlock()
		_ = d.fc.WriteFrame(d.ctx, pb.FrameCancel, st.id, nil, nil)
		// What was delivered and not received goes back to the pool.
		for {
			select {
			case m := <-st.msgs:
				releaseSourceMessage(m)
			default:
				return
			}
		}
	})
	return st, nil
}

func (st *dataStream) end() { st.endOne.Do(func() { close(st.ended) }) }

// deliver hands m to Recv, waiting while Recv does not take it (the pipeline is full: the
// plugin's writes then wait too, which is the back-pressure of the emit window).
func (st *dataStream) deliver(m *pb.SourceMessage, closed <-chan struct{}) {
	select {
	case st.msgs <- m:
	case <-st.ctx.Done():
		releaseSourceMessage(m)
	case <-closed:
		releaseSourceMessage(m)
	}
}

func (st *dataStream) Send(a *pb.SourceAck) error {
	return st.d.fc.WriteFrame(st.d.ctx, pb.FrameSourceAck, st.id, a, nil)
}

func (st *dataStream) CloseSend() error {
	return st.d.fc.WriteFrame(st.d.ctx, pb.FrameSourceClose, st.id, nil, nil)
}

// Recv returns the next message; io.EOF once the plugin's Run returned and every message
// before it was received.
func (st *dataStream) Recv() (*pb.SourceMessage, error) {
	select {
	case m := <-st.msgs:
		return m, nil
	default:
	}
	select {
	case m := <-st.msgs:
		return m, nil
	case <-st.ended:
		select {
		case m := <-st.msgs:
			return m, nil
		default:
		}
		return nil, io.EOF
	case <-st.ctx.Done():
		return nil, st.ctx.Err()
	case <-st.d.closed:
		select {
		case m := <-st.msgs:
			return m, nil
		default:
		}
		return nil, st.d.failure()
	}
}
