package pluginhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// applyCounts adds what the plugin counted to the host's metrics for the component.
func applyCounts(m component.Metrics, counts []*pb.Count) {
	for _, c := range counts {
		n := int(c.N)
		switch c.Kind {
		case pb.Count_KIND_FILTERED:
			m.Filtered(c.Reason, n)
		case pb.Count_KIND_DROPPED:
			m.Dropped(c.Reason, n)
		case pb.Count_KIND_ERRORS:
			m.Errors(c.Reason, n)
		}
	}
}

// redelivery remembers batches whose delivery to a failed plugin had an unknown outcome, so
// that the events sent again are counted.
type redelivery struct {
	mu  sync.Mutex
	set map[*flow.Batch]struct{}
}

func (r *redelivery) mark(b *flow.Batch) {
	r.mu.Lock()
	if r.set == nil || len(r.set) > 100_000 {
		r.set = map[*flow.Batch]struct{}{}
	}
	r.set[b] = struct{}{}
	r.mu.Unlock()
}

func (r *redelivery) again(b *flow.Batch) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.set[b]
	delete(r.set, b)
	return ok
}

// remoteSink is a sink in a plugin process. A Write that fails because the process died or
// hung returns an error; the runtime retries the batch, and the retry waits for the
// restarted process.
type remoteSink struct {
	in       *instance
	retry    redelivery
	passOnce sync.Once
	madeOnce sync.Once
}

// WritesEncoded: a batch from a source plugin, or read back from the sink's disk queue, comes
// undecoded (component.EncodedWriter), and is sent in the encoding it came in.
func (s *remoteSink) WritesEncoded() {}

// EncodeBatch encodes b as Write sends it, in one message (component.BatchEncoder): the
// runtime does it once for every sink plugin of a batch, before they share it.
func (s *remoteSink) EncodeBatch(b *flow.Batch) ([]byte, func()) {
	buf, _, n := pb.EncodeBatch(b.Events, b.Source)
	if n < len(b.Events) || len(*buf) == 0 {
		pb.Buffers.Put(buf) // more than one message: Write cuts it into parts
		return nil, nil
	}
	key := firstByte(*buf)
	madeForSinks.Store(key, struct{}{})
	return *buf, func() {
		madeForSinks.Delete(key)
		pb.Buffers.Put(buf)
	}
}

// madeForSinks holds the first byte of every encoding EncodeBatch made and that is still in
// use, so that Write tells them from encodings that passed through (a source plugin's, a
// disk queue's) in what it counts and says.
var madeForSinks sync.Map

func firstByte(b []byte) *byte {
	if len(b) == 0 {
		return nil
	}
	return &b[0]
}

func (s *remoteSink) Write(ctx context.Context, b *flow.Batch) error {
	if s.retry.again(b) {
		s.in.redelivered.Add(float64(b.Len()))
		s.in.env.Logger.Warn("plugin redelivery: writing again a batch the failed plugin had not acknowledged; the output may hold it twice", "events", b.Len())
	}
	source := b.Source
	if enc := b.Encoded(); enc != nil && len(enc) <= pb.SplitSize {
		// The batch came from a source plugin or the disk queue and nothing changed it, or
		// the runtime had it encoded for every sink plugin (EncodeBatch): its encoding is
		// sent as it is, neither decoded nor encoded again.
		if err := s.write(ctx, b, &pb.Batch{Count: uint32(b.Len()), Events: enc, Source: source}, nil); err != nil {
			return err
		}
		s.in.succeeded()
		return nil
	}
	if err := b.Decode(); err != nil {
		return flow.Permanent(err) // never written, in part or whole
	}
	for rest, first := b.Events, true; len(rest) > 0 || first; first = false {
		buf, msg, n := pb.EncodeBatch(rest, source)
		if err := s.write(ctx, b, msg, buf); err != nil {
			return err
		}
		rest = rest[n:]
	}
	s.in.succeeded()
	return nil
}

// passedThrough counts the batches written to sink plugins in the encoding they arrived in,
// encodedOnce those written in the encoding made for every sink plugin (EncodeBatch).
var passedThrough, encodedOnce atomic.Int64

// write sends one part of b; buf, when not nil, goes back to the pool once it is sent.
func (s *remoteSink) write(ctx context.Context, b *flow.Batch, msg *pb.Batch, buf *[]byte) error {
	if buf != nil {
		defer pb.Buffers.Put(buf)
	}
	p, err := s.in.get(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", s.in.launcher.describe, err)
	}
	cctx, done := s.in.guard(ctx, p, "Write")
	resp, err := p.sink.Write(cctx, msg)
	done()
	if err == nil {
		p.heard.Add(1)
	}
	if err != nil {
		s.retry.mark(b)
		return s.in.callErr(ctx, cctx, p, "Write", err)
	}
	if buf == nil {
		if _, made := madeForSinks.Load(firstByte(msg.Events)); made {
			encodedOnce.Add(1)
			s.madeOnce.Do(func() {
				s.in.env.Logger.Debug("plugin sink: batches go out in the encoding made once for every sink plugin", "plugin", s.in.launcher.describe)
			})
		} else {
			passedThrough.Add(1)
			s.passOnce.Do(func() {
				s.in.env.Logger.Debug("plugin sink: batches pass through in the encoding they arrived in (from a source plugin or a disk queue)", "plugin", s.in.launcher.describe)
			})
		}
	}
	applyCounts(s.in.env.Metrics, resp.Counts)
	return pb.ErrorFromProto(resp.Failure, resp.Error)
}

func (s *remoteSink) Start(ctx context.Context) error { return s.in.Start(ctx) }
func (s *remoteSink) Close(ctx context.Context) error { return s.in.Close(ctx) }
func (s *remoteSink) Health() error                   { return s.in.Health() }

// remoteEnricher is an enricher in a plugin process. When the process fails mid-call, the
// batch waits for the restart and is enriched again, so it is not lost.
type remoteEnricher struct {
	in          *instance
	changesOnce sync.Once
}

func (e *remoteEnricher) Enrich(ctx context.Context, b *flow.Batch) error {
	var out []flow.Event
	for rest, first := b.Events, true; len(rest) > 0 || first; first = false {
		for attempt := 0; ; attempt++ {
			resp, p, n, err := e.call(ctx, rest, b.Source, attempt > 0)
			if err != nil {
				return err
			}
			dst := out
			if first && n == len(b.Events) {
				dst = b.Events[:0] // one part: the answer is applied where the events are
			}
			got, err := e.answer(dst, rest[:n], resp, p)
			if errors.Is(err, errBadChanges) {
				// Nothing was applied: the plugin is failed as for a garbage frame, and the
				// part is enriched again in the next process.
				if err := e.in.callErr(ctx, ctx, p, "Enrich", err); ctx.Err() != nil {
					return err
				}
				continue
			}
			if err != nil {
				return err
			}
			out = got
			rest = rest[n:]
			break
		}
	}
	b.Events = out
	e.in.succeeded()
	return nil
}

// call enriches the first part of events (n of them: all, unless the batch is too large for
// one message) in the current process, again in the next one if it fails; again says that
// the part was sent before (its events are counted as redelivered). p is the process that
// answered.
func (e *remoteEnricher) call(ctx context.Context, events []flow.Event, source string, again bool) (resp *pb.EnrichResponse, p *proc, n int, err error) {
	for attempt := 0; ; attempt++ {
		p, err := e.in.get(ctx)
		if err != nil {
			return nil, nil, 0, fmt.Errorf("%s: %w", e.in.launcher.describe, err)
		}
		buf, msg, n := pb.EncodeBatch(events, source)
		if attempt > 0 || again {
			e.in.redelivered.Add(float64(n))
		}
		cctx, done := e.in.guard(ctx, p, "Enrich")
		resp, err := p.enr.Enrich(cctx, msg)
		done()
		pb.Buffers.Put(buf)
		if err == nil {
			p.heard.Add(1)
		}
		if err != nil {
			if err := e.in.callErr(ctx, cctx, p, "Enrich", err); ctx.Err() != nil {
				return nil, nil, 0, err
			}
			continue
		}
		applyCounts(e.in.env.Metrics, resp.Counts)
		if err := pb.ErrorFromProto(resp.Failure, resp.Error); err != nil {
			if resp.Batch != nil && p.data != nil {
				pb.PutEvents(resp.Batch.Events)
			}
			return nil, nil, 0, err
		}
		return resp, p, n, nil
	}
}

// StartEnrich sends b to the plugin on the data channel and returns; finish waits for the
// answer (component.Pipeliner), so that the source makes its next batch, and the host
// encodes it, while the plugin enriches this one. Whatever goes wrong (no data channel, a
// batch too large for one message, the plugin failing meanwhile) finishes as Enrich: again,
// in the next process if need be.
func (e *remoteEnricher) StartEnrich(ctx context.Context, b *flow.Batch) (finish func() error) {
	later := func() error { return e.Enrich(ctx, b) }
	p, err := e.in.get(ctx)
	if err != nil || p.data == nil {
		return later
	}
	buf, msg, n := pb.EncodeBatch(b.Events, b.Source)
	if n < len(b.Events) {
		pb.Buffers.Put(buf)
		return later
	}
	cctx, done := e.in.guard(ctx, p, "Enrich")
	id, ch, err := p.data.send(cctx, pb.FrameEnrich, msg)
	pb.Buffers.Put(buf)
	if err != nil {
		done()
		e.in.callErr(ctx, cctx, p, "Enrich", err)
		return later
	}
	return func() error {
		a, err := p.data.wait(cctx, id, ch)
		done()
		if err != nil {
			if err := e.in.callErr(ctx, cctx, p, "Enrich", err); ctx.Err() != nil {
				return err
			}
			e.in.redelivered.Add(float64(len(b.Events)))
			return e.Enrich(ctx, b)
		}
		if a.enrich == nil {
			return fmt.Errorf("%s: plugin data channel: answered an enrich with a %s", e.in.launcher.describe, a.typ)
		}
		resp := a.enrich
		applyCounts(e.in.env.Metrics, resp.Counts)
		if err := pb.ErrorFromProto(resp.Failure, resp.Error); err != nil {
			if resp.Batch != nil {
				pb.PutEvents(resp.Batch.Events)
			}
			return err
		}
		out, err := e.answer(b.Events[:0], b.Events, resp, p)
		if errors.Is(err, errBadChanges) {
			if err := e.in.callErr(ctx, ctx, p, "Enrich", err); ctx.Err() != nil {
				return err
			}
			e.in.redelivered.Add(float64(len(b.Events)))
			return e.Enrich(ctx, b)
		}
		if err != nil {
			return err
		}
		b.Events = out
		e.in.succeeded()
		return nil
	}
}

// appliedChanges counts the enrich answers applied as changes.
var appliedChanges atomic.Int64

// errBadChanges marks an answer as changes that cannot be applied: nothing was applied, and
// the plugin that sent it is failed.
var errBadChanges = errors.New("bad answer")

// answer appends to dst the events of p's answer to sent: the answer's events, or sent with
// the answer's changes applied (EnrichResponse.changes). dst may be sent[:0]. The answer's
// bytes, when they are a buffer from pb.Buffers (the data channel's), go back once read.
func (e *remoteEnricher) answer(dst, sent []flow.Event, resp *pb.EnrichResponse, p *proc) ([]flow.Event, error) {
	data, count := resp.Batch.GetEvents(), int(resp.Batch.GetCount())
	var (
		out []flow.Event
		err error
	)
	switch {
	case resp.Changes && !p.changes:
		out, err = dst, fmt.Errorf("%w: the plugin answered with changes, which the host did not ask for", errBadChanges)
	case resp.Changes:
		// Checked whole before anything is applied: a bad answer leaves the batch as it was.
		if out, err = codec.ApplyChanges(dst, sent, data, count); err != nil {
			err = fmt.Errorf("%w: %w", errBadChanges, err)
		} else {
			appliedChanges.Add(1)
			e.changesOnce.Do(func() {
				e.in.env.Logger.Debug("plugin enricher: answers come as the changes to the batch the host holds", "plugin", e.in.launcher.describe)
			})
		}
	default:
		if out, err = codec.Decode(dst, data, count); err != nil {
			err = fmt.Errorf("bad answer: %w", err)
		}
	}
	if resp.Batch != nil && p.data != nil {
		pb.PutEvents(resp.Batch.Events) // what is kept was copied
	}
	if err != nil {
		return out, fmt.Errorf("%s: %w", e.in.launcher.describe, err)
	}
	return out, nil
}

func (e *remoteEnricher) Start(ctx context.Context) error { return e.in.Start(ctx) }
func (e *remoteEnricher) Close(ctx context.Context) error { return e.in.Close(ctx) }
func (e *remoteEnricher) Health() error                   { return e.in.Health() }

// remoteSource is a source in a plugin process. Its batches are acknowledged back to the
// plugin by ID. When the process fails, the batches already in the pipeline are still
// delivered (their acknowledgements have nowhere to go), and the restarted source runs
// again: redelivering what its upstream never saw acknowledged is the source's job.
type remoteSource struct {
	in       *instance
	lazyOnce sync.Once

	mu     sync.Mutex
	stream *sourceStream
}

// sourceRPC is a source's Run stream: gRPC's, or one on the data channel.
type sourceRPC interface {
	Send(*pb.SourceAck) error
	Recv() (*pb.SourceMessage, error)
	CloseSend() error
}

type sourceStream struct {
	stream sourceRPC
	cancel context.CancelFunc
	mu     sync.Mutex
	broken bool
	ended  chan struct{} // closed when the plugin finished the stream
}

func (ss *sourceStream) send(a *pb.SourceAck) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.broken {
		return
	}
	if err := ss.stream.Send(a); err != nil {
		ss.broken = true
	}
}

func (s *remoteSource) Run(ctx context.Context, out component.Emitter) error {
	for {
		p, err := s.in.get(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		done, err := s.runOnce(ctx, p, out)
		if done {
			return err
		}
	}
}

// runOnce runs the source in one process; done is false when the process failed and the
// source must run again in the next one.
func (s *remoteSource) runOnce(ctx context.Context, p *proc, out component.Emitter) (done bool, err error) {
	sctx, cancel := context.WithCancel(context.Background())
	var stream sourceRPC
	if p.data != nil {
		stream, err = p.data.runSource(sctx)
	} else {
		stream, err = p.src.Run(sctx)
	}
	if err != nil {
		cancel()
		s.in.callErr(context.Background(), context.Background(), p, "Run", err)
		return false, nil
	}
	ss := &sourceStream{stream: stream, cancel: cancel, ended: make(chan struct{})}
	s.mu.Lock()
	s.stream = ss
	s.mu.Unlock()
	stopped := make(chan struct{})
	defer close(stopped)
	go func() {
		select {
		case <-ctx.Done():
			ss.send(&pb.SourceAck{Stop: true})
		case <-stopped:
		}
	}()
	var (
		events      []flow.Event
		partial     bool
		refused     error // what the pipeline's Emit returned when it refused a batch
		flowControl = p.desc.GetEmitFlowControl()
	)
	_, lazy := out.(component.EncodedEmitter) // the pipeline decodes where it must
	if lazy {
		s.lazyOnce.Do(func() {
			s.in.env.Logger.Debug("plugin source: batches go on undecoded; the pipeline decodes them only where their events are needed", "plugin", s.in.launcher.describe)
		})
	}
	for {
		msg, err := stream.Recv()
		if err != nil {
			close(ss.ended)
			if err == io.EOF {
				return true, nil
			}
			if ctx.Err() != nil {
				return true, nil // stopping; Close deals with the process
			}
			s.in.callErr(context.Background(), context.Background(), p, "Run", err)
			return false, nil
		}
		p.heard.Add(1)
		applyCounts(s.in.env.Metrics, msg.Counts)
		switch m := msg.Msg.(type) {
		case *pb.SourceMessage_End:
			// The source returned; the stream stays open for acknowledgements until Close.
			go func() {
				for {
					if _, err := stream.Recv(); err != nil {
						close(ss.ended)
						return
					}
				}
			}()
			return true, pb.ErrorFromProto(m.End.Failure, m.End.Error)
		case *pb.SourceMessage_Batch:
			if !partial {
				events = nil
			}
			encoded := m.Batch.Batch.GetEvents()
			count := int(m.Batch.Batch.GetCount())
			undecoded, sourced := lazy && !partial && !m.Batch.More, false
			if undecoded {
				// A batch that came whole goes on undecoded: only what needs its events
				// decodes it (flow.NewEncodedBatch). It is checked now, so that a malformed
				// one is refused to its source as one that fails to decode is.
				sourced, err = codec.Validate(encoded, count)
			} else {
				events, err = codec.Decode(events, encoded, count)
			}
			if err != nil || partial || m.Batch.More {
				// Only a batch that came whole keeps its encoding.
				if p.data != nil {
					pb.PutEvents(encoded) // decoding copied what it keeps
				}
				encoded = nil
			}
			if err != nil {
				ss.send(&pb.SourceAck{Id: m.Batch.Id, Status: pb.SourceAck_STATUS_FAILED, Message: "host could not decode the batch: " + err.Error()})
				s.in.env.Metrics.Dropped("plugin_bad_batch", int(m.Batch.Batch.GetCount()))
				partial = false
				continue
			}
			if partial = m.Batch.More; partial {
				continue
			}
			id := m.Batch.Id
			ack := func(err error) { ss.send(pb.AckToProto(id, err)) }
			if p.data != nil && encoded != nil {
				// The kept encoding is the data channel's pooled buffer: it goes back once
				// every holder of the batch is done with it.
				kept := encoded
				ack = func(err error) { ss.send(pb.AckToProto(id, err)); pb.PutEvents(kept) }
			}
			var b *flow.Batch
			if undecoded {
				b = flow.NewEncodedBatch(encoded, count, sourced, codec.Decode, ack)
			} else {
				b = flow.NewBatch(events, ack)
				if encoded != nil {
					// A batch that came whole keeps its encoding: a sink plugin gets it as it
					// is, unless something changes the events first (flow.Batch.SetEncoded).
					b.SetEncoded(encoded)
				}
			}
			b.Source = m.Batch.Batch.GetSource()
			s.in.succeeded()
			// Once the pipeline refused a batch (it is stopping), every later batch of the
			// stream is refused too, even if a queue has room again: a later batch must never
			// be delivered without an earlier one. A refused batch is acknowledged as
			// not delivered (flow.ErrShutdown), which the plugin learns.
			var emitErr error
			if refused != nil {
				emitErr = refused
				s.in.env.Metrics.Dropped("shutdown", b.Len())
				b.Release(flow.ErrShutdown)
			} else if emitErr = out.Emit(ctx, b); emitErr != nil {
				refused = emitErr
			}
			if flowControl {
				a := &pb.SourceAck{Id: id, Emitted: true}
				if emitErr != nil {
					a.EmitError = emitErr.Error()
				}
				ss.send(a)
			}
		}
	}
}

func (s *remoteSource) Start(ctx context.Context) error { return s.in.Start(ctx) }
func (s *remoteSource) Health() error                   { return s.in.Health() }

// Close lets the plugin see the end of the acknowledgements, then closes it.
func (s *remoteSource) Close(ctx context.Context) error {
	s.mu.Lock()
	ss := s.stream
	s.mu.Unlock()
	if ss != nil {
		ss.mu.Lock()
		_ = ss.stream.CloseSend()
		ss.broken = true
		ss.mu.Unlock()
		select {
		case <-ss.ended:
		case <-ctx.Done():
		}
		ss.cancel()
	}
	return s.in.Close(ctx)
}
