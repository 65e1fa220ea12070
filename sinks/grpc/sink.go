// Package grpcsink is the `type: grpc` sink: it streams events to a collector and reports a
// batch written only when the collector has ACKed every one of its events. It speaks two
// protocols (the protocol option): flowpipe's batch stream (flowpipe.stream.v1.Collector/
// Stream, proto/stream: a run of events per message in the packed codec, an ACK per message)
// to a flowpipe collector, and NetBird's flow protocol (flow.FlowService/Events, proto/flow:
// an event per message, an ACK per event) to a NetBird receiver. With protocol: auto every
// stream is opened with flowpipe's, and with NetBird's when the collector answers
// UNIMPLEMENTED.
//
// One stream carries the events of every Write in flight. Each Write's events are cut into
// chunks (at most one message of flowpipe's stream each), and each chunk waits in a table of
// unacknowledged work until its events are ACKed: on flowpipe's stream with the one ACK of its
// message, on NetBird's with an ACK per event ID (an index of the events sent on that stream).
// The table is bounded by max_in_flight events, which is the sink's window. When the stream
// breaks, the sink reconnects with jittered exponential backoff and sends every
// unacknowledged event again; a chunk not ACKed within ack_timeout is sent again on the same
// stream. The collector de-duplicates by event ID, so resending is safe.
package grpcsink

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/backoff"
	"github.com/flowpipe/flowpipe/internal/codec"
	"github.com/flowpipe/flowpipe/internal/flowwire"
	"github.com/flowpipe/flowpipe/internal/streamwire"
	"github.com/flowpipe/flowpipe/internal/tlsfiles"
	pb "github.com/flowpipe/flowpipe/proto/flow"
	streampb "github.com/flowpipe/flowpipe/proto/stream"
)

// Factory builds `type: grpc` sinks.
func Factory() component.Factory {
	f := component.NewSinkFactory("grpc", "stream events to a flow collector (flowpipe's batch stream or NetBird's FlowService), ACKed end to end",
		defaultConfig, func(env component.Env, c *Config) (component.Sink, error) { return New(env, c) })
	// A write waits for the collector's ACK of every event: keep several batches on the
	// stream so that the round trip does not bound throughput.
	f.InFlight = 16
	return f
}

// Sink is the gRPC sink. Write may be called concurrently.
type Sink struct {
	cfg    *Config
	log    *slog.Logger
	env    component.Env
	conn   *grpc.ClientConn
	key    []byte
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	chunks  map[*chunk]struct{} // sent or waiting to be sent, not yet ACKed
	unacked int                 // events in chunks, not yet ACKed: the window
	queue   []*chunk            // to send on the current stream, in order
	wake    chan struct{}       // the sender has something to do (capacity 1)
	space   chan struct{}       // closed and replaced when the window gains room
	stream  uint64              // generation of the current stream, 0 while there is none
	lastErr error               // why the last stream failed
	groups  map[uint64]*chunk   // flowpipe's stream: the chunk each message carried
	index   map[uuid.UUID]*ref  // NetBird's stream: the events sent on it, by event ID

	// native is whether the last stream spoke flowpipe's protocol: Write encodes its events
	// for that one (the sender encodes the other form when a stream needs it).
	native   atomic.Bool
	fellBack sync.Once // the Info line of auto's first fallback to NetBird's protocol

	sent, resent, acked, unknownAcks prometheus.Counter
	inFlight                         prometheus.GaugeFunc
}

// chunk is a run of consecutive events of one Write, the unit of the table of unacknowledged
// work: on flowpipe's stream it is one message and is ACKed whole (one entry per message,
// whatever its number of events); on NetBird's each of its events is a message and is ACKed
// by event ID (through Sink.index and refs).
type chunk struct {
	w      *waiter
	events []flow.Event // in its Write's batch: only read under Sink.mu while the chunk waits
	packed []byte       // the events in the packed codec (flowpipe's protocol), or nil
	msgs   [][]byte     // each event's encoded FlowEvent (NetBird's protocol), or nil
	refs   []ref        // NetBird's protocol: per event, made when first sent on it
	left   int          // events not ACKed; 0 once ACKed or given up
	stream uint64       // generation of the stream it was last sent on; 0 = not sent there
	sentAt time.Time    // when it was last sent
	sends  int          // messages of flowpipe's stream that carried packed
	reuse  bool         // ACKed on the stream of its only message: packed is free again
}

// ref is an event of a chunk on NetBird's protocol. Events with the same ID (a duplicate in
// the input) are sent once: the later ones hang off the first (same) and are ACKed with it.
type ref struct {
	c     *chunk
	i     int
	acked bool
	same  *ref
}

// waiter is one Write waiting for the ACKs of its events.
type waiter struct {
	left int // events not yet ACKed, under Sink.mu
	done chan struct{}
}

// New builds a sink from validated options and starts connecting in the background.
func New(env component.Env, c *Config) (*Sink, error) {
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if env.Metrics == nil {
		env.Metrics = component.NopMetrics{}
	}
	addr, useTLS, dialOpts := c.dial()
	var tc credentials.TransportCredentials
	if useTLS {
		cfg, err := clientTLS(env, c)
		if err != nil {
			return nil, err
		}
		tc = credentials.NewTLS(cfg)
	} else {
		tc = insecure.NewCredentials()
	}
	tok, err := newTokenSource(c)
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(tc),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: c.KeepaliveTime, Timeout: c.KeepaliveTimeout, PermitWithoutStream: true}),
		grpc.WithConnectParams(grpc.ConnectParams{
			// The connection's own reconnects follow the same policy as the stream's (run).
			Backoff:           grpcbackoff.Config{BaseDelay: c.ReconnectMin, Multiplier: backoff.Multiplier, Jitter: backoff.Jitter, MaxDelay: c.ReconnectMax},
			MinConnectTimeout: 5 * time.Second,
		}),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(flowwire.Codec{}), grpc.MaxCallRecvMsgSize(int(c.MaxMessageSize))),
		// Larger HTTP/2 windows than the 64 KiB default keep a stream of small messages moving
		// while ACKs come back.
		grpc.WithInitialWindowSize(4 << 20),
		grpc.WithInitialConnWindowSize(8 << 20),
	}
	if tok != nil {
		opts = append(opts, grpc.WithPerRPCCredentials(tok))
	}
	conn, err := grpc.NewClient(addr, append(opts, dialOpts...)...)
	if err != nil {
		return nil, fmt.Errorf("grpc sink %s: %w", c.collectors(), err)
	}
	s := &Sink{
		cfg: c, log: env.Logger, env: env, conn: conn, key: c.publicKey(),
		chunks: map[*chunk]struct{}{},
		wake:   make(chan struct{}, 1),
		space:  make(chan struct{}),
		done:   make(chan struct{}),
	}
	s.native.Store(c.Protocol != "netbird")
	if err := s.metrics(env); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go s.run(ctx)
	return s, nil
}

func (s *Sink) metrics(env component.Env) error {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: "flowpipe_grpc_sink_" + name, Help: help})
	}
	s.sent = counter("events_sent_total", "Events sent for the first time on a stream.")
	s.resent = counter("events_resent_total", "Events sent again after a reconnect or an ACK timeout.")
	s.acked = counter("events_acked_total", "Events ACKed by the collector.")
	s.unknownAcks = counter("unknown_acks_total", "ACKs for events (on flowpipe's batch stream: for messages) not waiting (already ACKed, or given up).")
	s.inFlight = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "flowpipe_grpc_sink_unacked_events", Help: "Events waiting for their ACK."},
		func() float64 { s.mu.Lock(); defer s.mu.Unlock(); return float64(s.unacked) })
	return env.Register(s.sent, s.resent, s.acked, s.unknownAcks, s.inFlight)
}

func clientTLS(env component.Env, c *Config) (*tls.Config, error) {
	return tlsfiles.Client(env.Path(c.CAFile), env.Path(c.CertFile), env.Path(c.KeyFile), c.ServerName)
}

// packPool holds the buffers of Writes' packed events that gRPC is done with.
var packPool = sync.Pool{New: func() any { return new([]byte) }}

// runLimits are the bounds of one message of flowpipe's stream: at most a quarter of
// max_in_flight events (so that ACKs of earlier messages make room while later ones travel)
// and at most max_batch_message_size bytes of events.
func (s *Sink) runLimits() (maxEvents, maxBytes int) {
	return min(max(s.cfg.MaxInFlight/4, 1), 4096), int(s.cfg.MaxBatchMessageSize) - streamwire.BatchHeaderSize - 1
}

// Write sends the batch's events and returns nil once the collector has ACKed all of them.
// When ctx ends first, the events not yet ACKed are forgotten and ctx's error is returned; the
// runtime retries the batch, and the collector drops what it already has by event ID.
func (s *Sink) Write(ctx context.Context, b *flow.Batch) error {
	n := len(b.Events)
	if n == 0 {
		return nil
	}
	// One buffer per batch, each event encoded once, for the protocol of the last stream;
	// the batch cut into chunks of at most one message of flowpipe's stream.
	native := s.native.Load()
	maxEvents, maxBytes := s.runLimits()
	var buf []byte
	var ends []int
	var msgs [][]byte
	cs := make([]chunk, 0, n/maxEvents+1)
	// A batch that comes with its packed encoding (the plugin host passes it on from a source
	// plugin: flow.Batch.SetEncoded) and fits one message is copied, not encoded again.
	enc := b.Encoded()
	copied := native && len(enc) > 1 && enc[0] == codec.Version && n <= maxEvents && len(enc)-1 <= maxBytes
	if native {
		size := len(enc)
		if !copied {
			size = codec.Size(b.Events)
		}
		bp := packPool.Get().(*[]byte)
		if cap(*bp) < size {
			*bp = make([]byte, 0, size)
		}
		buf = (*bp)[:0]
		defer func() {
			// The buffer goes back to the pool only when gRPC is done with it for sure:
			// every chunk was sent once and ACKed on the stream it went out on.
			s.mu.Lock()
			reuse := true
			for i := range cs {
				reuse = reuse && cs[i].reuse
			}
			s.mu.Unlock()
			if reuse {
				*bp = buf[:0]
				packPool.Put(bp)
			}
		}()
	} else {
		buf = make([]byte, 0, n*160)
		ends = make([]int, n)
		msgs = make([][]byte, n)
	}
	w := &waiter{left: n, done: make(chan struct{})}
	if copied {
		buf = append(buf, enc[1:]...)
		cs = append(cs, chunk{w: w, events: b.Events, left: n, packed: buf})
	} else {
		cs = s.encode(b.Events, w, cs, &buf, ends, msgs, native, maxEvents, maxBytes)
	}

	next, queued := 0, 0
	for next < len(cs) {
		s.mu.Lock()
		added := false
		for ; next < len(cs) && s.cfg.MaxInFlight-s.unacked >= cs[next].left; next++ {
			c := &cs[next]
			s.chunks[c] = struct{}{}
			s.unacked += c.left
			s.queue = append(s.queue, c)
			queued += c.left
			added = true
		}
		space := s.space
		s.mu.Unlock()
		if added {
			s.poke()
		}
		if next < len(cs) {
			select {
			case <-space:
			case <-ctx.Done():
				s.forget(cs[:next])
				return fmt.Errorf("grpc sink: %d of %d events not sent: %w", n-queued, n, ctx.Err())
			case <-s.done:
				s.forget(cs[:next])
				return errors.New("grpc sink closed")
			}
		}
	}
	select {
	case <-w.done:
		return nil
	case <-ctx.Done():
	case <-s.done:
	}
	s.mu.Lock()
	left := w.left
	s.mu.Unlock()
	if left == 0 {
		return nil
	}
	s.forget(cs)
	if ctx.Err() != nil {
		return fmt.Errorf("grpc sink: %d of %d events not ACKed: %w", left, n, ctx.Err())
	}
	return fmt.Errorf("grpc sink closed with %d of %d events not ACKed", left, n)
}

// encode encodes events into *buf for one protocol (native: flowpipe's packed codec; else
// NetBird's FlowEvents, each sliced into msgs with ends as scratch) and cuts them into chunks
// of at most one message of flowpipe's stream, appended to cs.
func (s *Sink) encode(events []flow.Event, w *waiter, cs []chunk, buf *[]byte, ends []int, msgs [][]byte, native bool, maxEvents, maxBytes int) []chunk {
	cs = append(cs, chunk{w: w})
	first, from, size := 0, 0, 0 // the current chunk: first event, its offset in buf, packed size
	cut := func(i int) {
		c := &cs[len(cs)-1]
		c.events, c.left = events[first:i], i-first
		if native {
			c.packed = (*buf)[from:len(*buf):len(*buf)]
		}
	}
	for i := range events {
		e := &events[i]
		esize := codec.EventSize(e) // chunks fit a message of flowpipe's stream whichever the protocol
		if i > first && (i-first == maxEvents || size+esize > maxBytes) {
			cut(i)
			cs = append(cs, chunk{w: w})
			first, from, size = i, len(*buf), 0
		}
		size += esize
		if native {
			*buf = codec.AppendEvent(*buf, e)
		} else {
			*buf = flowwire.AppendEvent(*buf, e, s.key)
			ends[i] = len(*buf)
		}
	}
	cut(len(events))
	if !native {
		// Sliced once *buf is final (it may have moved while it grew).
		off := 0
		for i := range msgs {
			msgs[i] = (*buf)[off:ends[i]:ends[i]]
			off = ends[i]
		}
		off = 0
		for i := range cs {
			cs[i].msgs = msgs[off : off+len(cs[i].events)]
			off += len(cs[i].events)
		}
	}

	return cs
}

// forget removes a failed Write's chunks from the table.
func (s *Sink) forget(cs []chunk) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range cs {
		c := &cs[i]
		if c.left == 0 {
			continue
		}
		if s.index != nil && c.refs != nil {
			for j := range c.refs {
				if !c.refs[j].acked {
					s.unlink(&c.refs[j])
				}
			}
		}
		s.unacked -= c.left
		c.left = 0
		delete(s.chunks, c)
	}
	s.roomMade()
}

// unlink takes r out of NetBird's index of the current stream; the next event with its ID,
// if any, takes its place (its message went out with r's, so the ACK by ID still comes).
func (s *Sink) unlink(r *ref) {
	id := r.c.events[r.i].EventID
	head, ok := s.index[id]
	switch {
	case !ok:
	case head == r && r.same != nil:
		s.index[id] = r.same
	case head == r:
		delete(s.index, id)
	default:
		for q := head; q.same != nil; q = q.same {
			if q.same == r {
				q.same = r.same
				break
			}
		}
	}
	r.same = nil
}

func (s *Sink) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// roomMade wakes Writes waiting for the window; called with s.mu held.
func (s *Sink) roomMade() {
	close(s.space)
	s.space = make(chan struct{})
}

// release takes n ACKed events out of the window; called with s.mu held. Waiting Writes are
// woken when a quarter of the window is free (a chunk is at most a quarter), not for every
// ACK.
func (s *Sink) release(n int) {
	before := s.unacked
	s.unacked -= n
	mark := s.cfg.MaxInFlight - max(s.cfg.MaxInFlight/4, 1)
	if (before > mark && s.unacked <= mark) || s.unacked == 0 {
		s.roomMade()
	}
}

// settle records that n more events of c are ACKed; called with s.mu held.
func (s *Sink) settle(c *chunk, n int) {
	c.left -= n
	c.w.left -= n
	if c.w.left == 0 {
		close(c.w.done)
	}
	if c.left == 0 {
		delete(s.chunks, c)
	}
	s.release(n)
}

// ack completes the event id; called for every ACK received on NetBird's protocol.
func (s *Sink) ack(id uuid.UUID) {
	s.mu.Lock()
	r, ok := s.index[id]
	acked := 0
	if ok {
		delete(s.index, id)
		for q := r; q != nil; q = q.same {
			if !q.acked && q.c.left > 0 {
				q.acked = true
				s.settle(q.c, 1)
				acked++
			}
		}
	}
	s.mu.Unlock()
	if acked > 0 {
		s.acked.Add(float64(acked))
	} else {
		s.unknownAcks.Inc()
	}
}

// ackBatch completes the chunk sent as message seq of the current stream of flowpipe's
// protocol: the collector ACKs a message once every event in it is durable.
func (s *Sink) ackBatch(seq uint64) {
	s.mu.Lock()
	c := s.groups[seq]
	delete(s.groups, seq)
	n := 0
	if c != nil && c.left > 0 {
		n = c.left
		for j := range c.refs {
			c.refs[j].acked = true
		}
		c.reuse = c.sends == 1 && c.stream == s.stream
		s.settle(c, n)
	}
	s.mu.Unlock()
	if n == 0 {
		s.unknownAcks.Inc() // an ACK for a message this stream did not send, or sent again and ACKed already
		return
	}
	s.acked.Add(float64(n))
}

// run keeps a stream open and feeds it until the sink is closed.
func (s *Sink) run(ctx context.Context) {
	defer close(s.done)
	var gen uint64
	reconnect := backoff.Backoff{Policy: backoff.Policy{Initial: s.cfg.ReconnectMin, Max: s.cfg.ReconnectMax}}
	for ctx.Err() == nil {
		gen++
		start := time.Now()
		err := s.serve(ctx, gen)
		if ctx.Err() != nil {
			return
		}
		if time.Since(start) > s.cfg.ReconnectMax {
			reconnect.Reset() // the stream worked for a while: start the backoff over
		}
		if s.closedIdle(err) {
			// The receiver closes streams that carry nothing (its idle_timeout): not a
			// failure; open the next one at once.
			s.log.Debug("collector closed the idle stream; reopening", "url", s.cfg.collectors())
			continue
		}
		s.mu.Lock()
		s.lastErr = err
		waiting := s.unacked
		s.mu.Unlock()
		delay := reconnect.Next()
		s.env.Metrics.Errors("stream", 1)
		s.log.Warn("stream to collector failed; reconnecting", "url", s.cfg.collectors(), "err", err, "events_waiting", waiting, "retry_in", delay.Round(time.Millisecond))
		if !s.waitRetry(ctx, delay) {
			return
		}
	}
}

// closedIdle reports a stream the receiver ended for idleness while nothing was waiting.
func (s *Sink) closedIdle(err error) bool {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "idle_timeout") {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unacked == 0
}

// waitRetry waits delay before the next stream, or less: when the connection to the
// collector was down and comes back (gRPC redials by itself), the next stream opens at once,
// so recovery does not wait out the backoff. A connection that was up when the stream
// failed (the collector refused the stream) waits the whole delay. False when ctx ended.
func (s *Sink) waitRetry(ctx context.Context, delay time.Duration) bool {
	t := time.NewTimer(delay)
	defer t.Stop()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	back := make(chan struct{})
	if st := s.conn.GetState(); st != connectivity.Ready {
		go func() {
			for st != connectivity.Ready {
				if st == connectivity.Idle {
					s.conn.Connect()
				}
				if !s.conn.WaitForStateChange(wctx, st) {
					return
				}
				st = s.conn.GetState()
			}
			close(back)
		}()
	}
	select {
	case <-t.C:
	case <-back:
	case <-ctx.Done():
		return false
	}
	return true
}

// handshakeTimeout bounds the wait for the receiver's response headers.
const handshakeTimeout = 15 * time.Second

// serve opens stream number gen, sends everything pending on it, and returns when it fails.
func (s *Sink) serve(ctx context.Context, gen uint64) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	native := s.cfg.Protocol != "netbird"
	stream, err := s.open(sctx, cancel, native)
	if err != nil && native && s.cfg.Protocol == "auto" && status.Code(err) == codes.Unimplemented {
		// Not a flowpipe collector (a NetBird receiver, or a flowpipe from before the batch
		// stream): NetBird's protocol on the same connection. Tried again on every stream, so
		// that urls may list both kinds and an upgraded collector is used at once.
		s.fellBack.Do(func() {
			s.log.Info("collector does not serve flowpipe's batch stream; streaming with NetBird's flow protocol", "url", s.cfg.collectors(), "detail", status.Convert(err).Message())
		})
		native = false
		stream, err = s.open(sctx, cancel, false)
	}
	if err != nil {
		return err
	}
	s.native.Store(native)

	s.mu.Lock()
	s.stream = gen
	s.groups, s.index = nil, nil
	if native {
		s.groups = map[uint64]*chunk{}
	} else {
		s.index = map[uuid.UUID]*ref{}
	}
	// Everything unacknowledged goes out again on the new stream.
	s.queue = s.queue[:0]
	for c := range s.chunks {
		s.queue = append(s.queue, c)
	}
	s.mu.Unlock()
	s.poke()
	s.log.Info("stream to collector open", "url", s.cfg.collectors(), "protocol", protocolName(native))

	recvErr := make(chan error, 1)
	go func() {
		var m flowwire.AckMsg
		var b streamwire.Ack
		for {
			var err error
			if native {
				err = stream.RecvMsg(&b)
			} else {
				err = stream.RecvMsg(&m)
			}
			if err != nil {
				recvErr <- err
				cancel()
				return
			}
			switch {
			case native:
				s.ackBatch(b.Seq)
			case !m.Initiator:
				s.ack(m.ID)
			}
		}
	}()
	if native {
		err = s.sendBatches(sctx, stream, gen)
	} else {
		err = s.send(sctx, stream, gen)
	}
	cancel()
	s.mu.Lock()
	s.stream = 0
	s.groups, s.index = nil, nil
	s.mu.Unlock()
	// The receiving side knows why the stream ended (a status from the receiver); a failed
	// SendMsg only says io.EOF.
	if rerr := <-recvErr; err == nil || errors.Is(err, context.Canceled) || errors.Is(err, io.EOF) {
		err = rerr
	}
	return err
}

func protocolName(native bool) string {
	if native {
		return "flowpipe"
	}
	return "netbird"
}

// open opens a stream of flowpipe's protocol (native) or NetBird's and does its handshake:
// the client's opening message, then the receiver's response headers.
func (s *Sink) open(ctx context.Context, cancel context.CancelFunc, native bool) (grpc.ClientStream, error) {
	desc, method, opening := &pb.FlowService_ServiceDesc.Streams[0], pb.FlowService_Events_FullMethodName, flowwire.AppendInitiator(nil)
	if native {
		desc, method, opening = &streampb.Collector_ServiceDesc.Streams[0], streampb.Collector_Stream_FullMethodName, streamwire.AppendBatchHeader([]byte{}, 0, 0, 0)
	}
	// Not WaitForReady: a collector that is down must fail the stream (and show in the log,
	// the errors metric and /readyz) rather than hold it open in silence; run redials.
	stream, err := s.conn.NewStream(ctx, desc, method)
	if err != nil {
		return nil, fmt.Errorf("open stream: %w", err)
	}
	if err := stream.SendMsg(flowwire.Raw(opening)); err != nil {
		return nil, fmt.Errorf("send initiator: %w", closeErr(stream, err))
	}
	// A receiver answers with headers as soon as the stream opens; a stream without them is
	// not a flow receiver (or it refused us: then Header returns the status).
	handshake := time.AfterFunc(handshakeTimeout, cancel)
	md, err := stream.Header()
	handshake.Stop()
	if err != nil {
		return nil, fmt.Errorf("wait for headers: %w", err)
	}
	if len(md) == 0 {
		// A refused stream (a trailers-only response) has no headers: its status says why.
		return nil, closeErr(stream, errors.New("receiver sent no response headers"))
	}
	return stream, nil
}

// closeErr is the status behind a failed SendMsg, read with RecvMsg; only for use while no
// other goroutine receives on the stream.
func closeErr(stream grpc.ClientStream, err error) error {
	var m flowwire.AckMsg
	if rerr := stream.RecvMsg(&m); rerr != nil {
		if _, ok := status.FromError(rerr); ok {
			return rerr
		}
	}
	return err
}

// sendLoop is a stream's sending loop, for either protocol. Each time chunks are queued (or
// ack_timeout's tick queues the late ones again) it takes the ones due on this stream (not
// ACKed, not given up, not sent on it within ack_timeout) and hands each to add, then marks
// them sent, under s.mu; then, with s.mu released, flush sends what add gathered (false:
// there was nothing). It returns when ctx ends or a send fails.
func (s *Sink) sendLoop(ctx context.Context, gen uint64, add func(*chunk), flush func() (bool, error)) error {
	tick := time.NewTicker(max(s.cfg.AckTimeout/4, 10*time.Millisecond))
	defer tick.Stop()
	var batch []*chunk
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.wake:
		case <-tick.C:
			s.requeueLate(gen)
		}
		for {
			s.mu.Lock()
			batch, s.queue = s.queue, batch[:0]
			now := time.Now()
			first, again := 0, 0
			for _, c := range batch {
				if c.left == 0 || c.stream == gen && now.Sub(c.sentAt) < s.cfg.AckTimeout {
					continue // ACKed, given up, or already sent on this stream
				}
				if c.sentAt.IsZero() {
					first += c.left
				} else {
					again += c.left
				}
				add(c)
				c.stream, c.sentAt = gen, now
			}
			s.mu.Unlock()
			clear(batch)
			sent, err := flush()
			if err != nil {
				// The stream's status, if any, comes from the receiving goroutine.
				return fmt.Errorf("send: %w", err)
			}
			if !sent {
				break
			}
			s.sent.Add(float64(first))
			s.resent.Add(float64(again))
		}
	}
}

// send is sendLoop for NetBird's protocol: one message per event, ACKed by event ID; an ID
// that is already on this stream (a duplicate in the input) is not sent again.
func (s *Sink) send(ctx context.Context, stream grpc.ClientStream, gen uint64) error {
	var msgs [][]byte
	add := func(c *chunk) {
		if c.msgs == nil {
			// Encoded for flowpipe's protocol by its Write; its Write still waits (the chunk
			// is not ACKed), so its events are still there.
			buf := make([]byte, 0, len(c.events)*160)
			ends := make([]int, len(c.events))
			for i := range c.events {
				buf = flowwire.AppendEvent(buf, &c.events[i], s.key)
				ends[i] = len(buf)
			}
			c.msgs = make([][]byte, len(c.events))
			off := 0
			for i := range c.msgs {
				c.msgs[i] = buf[off:ends[i]:ends[i]]
				off = ends[i]
			}
		}
		if c.refs == nil {
			c.refs = make([]ref, len(c.events))
			for i := range c.refs {
				c.refs[i] = ref{c: c, i: i}
			}
		}
		again := c.stream == gen // sent on this stream before: its events are in the index
		for i := range c.refs {
			r := &c.refs[i]
			if r.acked {
				continue
			}
			id := c.events[i].EventID
			head, ok := s.index[id]
			switch {
			case again && head == r:
				msgs = append(msgs, c.msgs[i])
			case again:
				// Hangs off an earlier event with its ID, which is sent in its place.
			case ok:
				r.same, head.same = head.same, r
			default:
				r.same = nil
				s.index[id] = r
				msgs = append(msgs, c.msgs[i])
			}
		}
	}
	flush := func() (bool, error) {
		defer func() { msgs = msgs[:0] }()
		for _, m := range msgs {
			if err := stream.SendMsg(flowwire.Raw(m)); err != nil {
				return true, err
			}
		}
		return len(msgs) > 0, nil
	}
	return s.sendLoop(ctx, gen, add, flush)
}

// sendBatches is sendLoop for flowpipe's protocol: each chunk is one message, its events'
// packed bytes (made once, by its Write) sent as they are behind a header made for this send.
func (s *Sink) sendBatches(ctx context.Context, stream grpc.ClientStream, gen uint64) error {
	var msgs []*flowwire.Parts
	var seq uint64
	add := func(c *chunk) {
		if c.packed == nil {
			// Encoded for NetBird's protocol by its Write, which still waits.
			c.packed = make([]byte, 0, codec.Size(c.events))
			for i := range c.events {
				c.packed = codec.AppendEvent(c.packed, &c.events[i])
			}
		}
		body := c.packed
		if c.left < len(c.events) {
			// Some of its events were ACKed one by one on a NetBird stream: the others only.
			body = nil
			for i := range c.events {
				if !c.refs[i].acked {
					body = codec.AppendEvent(body, &c.events[i])
				}
			}
		}
		c.sends++
		seq++
		s.groups[seq] = c // known before it is sent: its ACK may come back at once
		head := make([]byte, 0, streamwire.BatchHeaderSize+1)
		head = streamwire.AppendBatchHeader(head, seq, c.left, 1+len(body))
		head = append(head, codec.Version)
		msgs = append(msgs, &flowwire.Parts{Head: head, Body: body})
	}
	flush := func() (bool, error) {
		defer func() { clear(msgs); msgs = msgs[:0] }()
		for _, m := range msgs {
			if err := stream.SendMsg(m); err != nil {
				return true, err
			}
		}
		return len(msgs) > 0, nil
	}
	return s.sendLoop(ctx, gen, add, flush)
}

// requeueLate queues again the chunks sent on this stream longer than ack_timeout ago.
func (s *Sink) requeueLate(gen uint64) {
	deadline := time.Now().Add(-s.cfg.AckTimeout)
	s.mu.Lock()
	n := 0
	for c := range s.chunks {
		if c.stream == gen && c.sentAt.Before(deadline) {
			s.queue = append(s.queue, c)
			n += c.left
		}
	}
	s.mu.Unlock()
	if n > 0 {
		s.log.Warn("events not ACKed in time; sending them again", "events", n, "ack_timeout", s.cfg.AckTimeout)
		s.poke()
	}
}

// Health reports the sink unhealthy while it has no stream to the collector after a failed
// one (for /readyz); events wait meanwhile.
func (s *Sink) Health() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stream == 0 && s.lastErr != nil {
		return fmt.Errorf("no stream to %s (%d events waiting): %w", s.cfg.collectors(), s.unacked, s.lastErr)
	}
	return nil
}

// Close stops the stream. The runtime calls it after the sink's queue is drained, so nothing
// is waiting; a Write still waiting fails.
func (s *Sink) Close(ctx context.Context) error {
	s.cancel()
	select {
	case <-s.done:
	case <-ctx.Done():
	}
	return s.conn.Close()
}
