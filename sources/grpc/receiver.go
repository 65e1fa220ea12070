// Package grpcsource is the `type: grpc` source: the collector side of NetBird's flow protocol
// (flow.FlowService/Events, proto/flow) and of flowpipe's batch stream
// (flowpipe.stream.v1.Collector/Stream, proto/stream; native.go), both on one listener.
// Agents — flowpipe's grpc sink or NetBird clients — stream events to it; it batches the
// events of all streams, hands the batches to the pipeline, and ACKs each event (on the batch
// stream: each batch) to its client only when the pipeline's sinks made it durable (or the
// user's drop policy dropped it, which is counted). Events are de-duplicated by ID over a
// window, so a client's resend after a lost ACK reaches the sinks once.
package grpcsource

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/internal/flowwire"
	"github.com/flowpipe/flowpipe/internal/privilege"
	"github.com/flowpipe/flowpipe/internal/tlsfiles"
	pb "github.com/flowpipe/flowpipe/proto/flow"
	streampb "github.com/flowpipe/flowpipe/proto/stream"
)

// Factory builds `type: grpc` sources.
func Factory() component.Factory {
	return component.NewSourceFactory("grpc", "receive events from agents (flowpipe's batch stream or NetBird's flow protocol), ACKed end to end",
		defaultConfig, func(env component.Env, c *Config) (component.Source, error) { return New(env, c) })
}

// Receiver is the gRPC source.
type Receiver struct {
	pb.UnimplementedFlowServiceServer

	live    atomic.Pointer[settings] // the options now; Reconfigure swaps them (reconfigure.go)
	env     component.Env
	log     *slog.Logger
	creds   credentials.TransportCredentials
	tlsConf atomic.Pointer[tls.Config] // what new TLS handshakes use
	maxRecv int                        // the server's message size limit, fixed at Start

	reconfMu sync.Mutex
	openMu   sync.Mutex
	tracked  map[*stream]struct{} // streams being served, for closing revoked ones

	startOnce sync.Once
	startErr  error
	lis       net.Listener
	srv       *grpc.Server
	served    chan struct{}
	coll      *collector

	streams  atomic.Int64
	unacked  atomic.Int64 // over every stream: received, ACK not yet sent (nor given up on)
	logLimit logLimiter
	stopping chan struct{} // closed when Run's ctx ends: no new events are taken
	closing  chan struct{} // closed by Close: streams end
	stopOnce sync.Once
	closed   sync.Once

	received, duplicates, ackedDropped, notAcked prometheus.Counter
	refused                                      *prometheus.CounterVec
	open                                         prometheus.GaugeFunc
}

// New builds a receiver; the listener opens in Start (or Run).
func New(env component.Env, c *Config) (*Receiver, error) {
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if env.Metrics == nil {
		env.Metrics = component.NopMetrics{}
	}
	r := &Receiver{env: env, log: env.Logger, stopping: make(chan struct{}), closing: make(chan struct{}), served: make(chan struct{}), tracked: map[*stream]struct{}{}}
	r.live.Store(newSettings(c))
	r.logLimit.interval = time.Second
	if c.CertFile != "" {
		tc, err := serverTLS(env, c)
		if err != nil {
			return nil, err
		}
		r.tlsConf.Store(tc)
		// Every handshake takes the configuration of the moment, so that a reload's new
		// certificate or client CAs serve the next connection.
		r.creds = credentials.NewTLS(&tls.Config{
			MinVersion:         tls.VersionTLS12,
			GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return r.tlsConf.Load(), nil },
		})
	}
	if err := r.metrics(env); err != nil {
		return nil, err
	}
	r.coll = newCollector(r)
	if c.Dedup.StateFile != "" && r.coll.dedupOn() {
		if err := r.coll.load(env.Path(c.Dedup.StateFile)); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func (r *Receiver) metrics(env component.Env) error {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: "flowpipe_grpc_source_" + name, Help: help})
	}
	r.received = counter("events_received_total", "Events received from clients, duplicates included.")
	r.duplicates = counter("duplicates_total", "Events received again within the de-duplication window (not passed on; ACKed).")
	r.ackedDropped = counter("acked_dropped_total", "Events ACKed to their client although a sink dropped them by policy.")
	r.notAcked = counter("not_acked_total", "Events not ACKed because the pipeline could not deliver them (the client resends).")
	r.refused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flowpipe_grpc_source_streams_refused_total",
		Help: "Streams refused or ended by the receiver, by reason."}, []string{"reason"})
	r.open = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "flowpipe_grpc_source_streams", Help: "Open client streams."},
		func() float64 { return float64(r.streams.Load()) })
	unacked := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "flowpipe_grpc_source_unacked_events",
		Help: "Events received whose ACK has not been sent yet, over every stream (at most max_unacked_per_stream per stream)."},
		func() float64 { return float64(r.unacked.Load()) })
	return env.Register(r.received, r.duplicates, r.ackedDropped, r.notAcked, r.refused, r.open, unacked)
}

// refuse counts a refused or failed stream and returns the status its client sees. The log
// line says who it was (the peer's address, and attrs such as the token's payload); it is
// rate-limited per reason, so that a flood of bad clients cannot flood the log.
func (r *Receiver) refuse(ctx context.Context, reason string, code codes.Code, format string, args ...any) error {
	return r.refuseWith(ctx, reason, code, nil, format, args...)
}

func (r *Receiver) refuseWith(ctx context.Context, reason string, code codes.Code, attrs []any, format string, args ...any) error {
	r.refused.WithLabelValues(reason).Inc()
	r.env.Metrics.Errors(reason, 1)
	msg := fmt.Sprintf(format, args...)
	if ok, suppressed := r.logLimit.allow(reason, time.Now()); ok {
		kv := []any{"reason", reason, "peer", peerAddr(ctx), "detail", msg}
		kv = append(kv, attrs...)
		if suppressed > 0 {
			kv = append(kv, "suppressed", suppressed)
		}
		r.log.Warn("stream refused", kv...)
	}
	return status.Error(code, msg)
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return "unknown"
}

// logLimiter lets one log line per reason through per interval and counts the others.
type logLimiter struct {
	interval time.Duration
	mu       sync.Mutex
	last     map[string]time.Time
	skipped  map[string]int
}

func (l *logLimiter) allow(reason string, now time.Time) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.last == nil {
		l.last, l.skipped = map[string]time.Time{}, map[string]int{}
	}
	if t, seen := l.last[reason]; seen && now.Sub(t) < l.interval {
		l.skipped[reason]++
		return false, 0
	}
	l.last[reason] = now
	suppressed = l.skipped[reason]
	l.skipped[reason] = 0
	return true, suppressed
}

func serverTLS(env component.Env, c *Config) (*tls.Config, error) {
	tc, err := tlsfiles.Server(env.Path(c.CertFile), env.Path(c.KeyFile), env.Path(c.ClientCAFile))
	if err != nil {
		return nil, err
	}
	// Served through GetConfigForClient, this configuration must offer HTTP/2 itself.
	tc.NextProtos = []string{"h2"}
	return tc, nil
}

// Start opens the listener, so that a port in use fails the pipeline's start.
func (r *Receiver) Start(context.Context) error {
	r.startOnce.Do(func() {
		lis, err := net.Listen("tcp", r.conf().Listen)
		if err != nil {
			r.startErr = fmt.Errorf("listen %s: %w", r.conf().Listen, privilege.Explain(err, r.conf().Capabilities()))
			return
		}
		r.lis = lis
		r.maxRecv = int(max(r.conf().MaxMessageSize, r.conf().MaxBatchMessageSize))
		opts := []grpc.ServerOption{
			grpc.ForceServerCodecV2(flowwire.Codec{}),
			grpc.MaxRecvMsgSize(r.maxRecv),
			grpc.KeepaliveParams(keepalive.ServerParameters{Time: r.conf().KeepaliveTime, Timeout: r.conf().KeepaliveTimeout}),
			grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: r.conf().KeepaliveMinTime, PermitWithoutStream: true}),
			grpc.InitialWindowSize(4 << 20),
			grpc.InitialConnWindowSize(8 << 20),
		}
		if r.creds != nil {
			opts = append(opts, grpc.Creds(r.creds))
		}
		r.srv = grpc.NewServer(opts...)
		pb.RegisterFlowServiceServer(r.srv, r)
		streampb.RegisterCollectorServer(r.srv, nativeServer{r: r})
		go func() {
			defer close(r.served)
			if err := r.srv.Serve(lis); err != nil {
				r.log.Error("grpc server stopped", "err", err)
			}
		}()
		r.log.Info("flow receiver listening", "addr", lis.Addr().String(), "tls", r.creds != nil, "auth", r.conf().Auth)
	})
	return r.startErr
}

// Addr is the listening address (useful with port 0).
func (r *Receiver) Addr() net.Addr { return r.lis.Addr() }

// Run emits batches until ctx ends. Streams stay open after it returns, so that the ACKs of
// batches still in the pipeline reach their clients; Close ends them.
func (r *Receiver) Run(ctx context.Context, out component.Emitter) error {
	if err := r.Start(ctx); err != nil {
		return err
	}
	r.coll.run(ctx, out)
	r.stopOnce.Do(func() { close(r.stopping) })
	return nil
}

// Close waits (within ctx) for the acknowledgement of every batch emitted, sends the last
// ACKs, and stops the server.
func (r *Receiver) Close(ctx context.Context) error {
	var err error
	r.closed.Do(func() { err = r.close(ctx) })
	return err
}

func (r *Receiver) close(ctx context.Context) error {
	r.stopOnce.Do(func() { close(r.stopping) })
	r.coll.stop()
	waited := make(chan struct{})
	go func() { r.coll.wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-ctx.Done():
		r.log.Warn("closing with batches not yet acknowledged; their clients will resend")
	}
	close(r.closing)
	if r.srv != nil {
		stopped := make(chan struct{})
		go func() { r.srv.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-ctx.Done():
			r.srv.Stop()
		}
		<-r.served
	}
	r.coll.mu.Lock()
	defer r.coll.mu.Unlock()
	return r.coll.win.Close()
}

// stream is one client stream: the ACKs waiting to be sent and the events not yet ACKed.
// A NetBird stream (flow.FlowService/Events) is ACKed per event ID, a native stream
// (flowpipe.stream.v1.Collector/Stream, native.go) per batch.
type stream struct {
	// unacked counts events received whose ACK has not been sent to the client (queued
	// ACKs included) and that were not given up on. The reader stops at
	// max_unacked_per_stream, so a client that does not read its ACKs is not read either.
	unacked  atomic.Int64
	total    *atomic.Int64 // the receiver's sum over streams
	wake     chan struct{} // for the handler: ACKs to send, or unacked changed
	room     chan struct{} // for the reader: unacked went down
	started  chan struct{} // closed when the initiator arrived
	kick     chan struct{} // closed when a reload revoked the stream's token
	kickOnce sync.Once
	token    string       // its authorization header
	admitted time.Time    // when it was admitted
	lastRecv atomic.Int64 // Unix nanoseconds of the last message received
	native   bool

	mu      sync.Mutex
	acks    []uuid.UUID            // NetBird: event IDs to ACK
	batches map[uint64]*batchState // native: batches received and not yet resolved
	seqAcks []seqAck               // native: batches to ACK
	dead    bool
}

// batchState is a batch of a native stream whose events are not all resolved yet.
type batchState struct {
	left, total int
	failed      bool // an event of it was not delivered: no ACK, the client resends it
}

type seqAck struct {
	seq    uint64
	events int
}

func newStream(total *atomic.Int64, native bool) *stream {
	st := &stream{total: total, native: native, wake: make(chan struct{}, 1), room: make(chan struct{}, 1), started: make(chan struct{}), kick: make(chan struct{})}
	if native {
		st.batches = map[uint64]*batchState{}
	}
	st.lastRecv.Store(time.Now().UnixNano())
	return st
}

func (st *stream) signal() {
	select {
	case st.wake <- struct{}{}:
	default:
	}
	select {
	case st.room <- struct{}{}:
	default:
	}
}

func (st *stream) took(n int64) {
	st.unacked.Add(n)
	st.total.Add(n)
}

func (st *stream) done(n int64) {
	if n == 0 {
		return
	}
	st.unacked.Add(-n)
	st.total.Add(-n)
	st.signal()
}

// resolve settles events of this stream: delivered (ok: their ACKs are queued, and stay
// counted until sent) or not (they are forgotten; the client resends them). On a stream that
// is gone nothing is queued (the client resends on its next stream).
func (st *stream) resolve(os []origin, ok bool) {
	if !st.native {
		if !ok {
			st.done(int64(len(os)))
			return
		}
		st.mu.Lock()
		if st.dead {
			st.mu.Unlock()
			st.done(int64(len(os)))
			return
		}
		for _, o := range os {
			st.acks = append(st.acks, o.id)
		}
		st.mu.Unlock()
		st.signal()
		return
	}
	var released int64
	queued := false
	st.mu.Lock()
	for i := 0; i < len(os); {
		j := i + 1
		for j < len(os) && os[j].seq == os[i].seq {
			j++
		}
		released += st.settle(os[i].seq, j-i, ok, &queued)
		i = j
	}
	st.mu.Unlock()
	st.done(released)
	if queued {
		st.signal()
	}
}

// settle resolves n events of batch seq of a native stream; called with st.mu held. It
// returns the events to release now (a batch that failed, or of a stream that is gone).
func (st *stream) settle(seq uint64, n int, ok bool, queued *bool) int64 {
	b := st.batches[seq]
	if b == nil {
		return 0
	}
	b.left -= n
	if !ok {
		b.failed = true
	}
	if b.left > 0 {
		return 0
	}
	delete(st.batches, seq)
	if b.failed || st.dead {
		return int64(b.total)
	}
	st.seqAcks = append(st.seqAcks, seqAck{seq, b.total})
	*queued = true
	return 0
}

// fail settles n events of batch seq (0 on a NetBird stream) that will not be delivered.
func (st *stream) fail(seq uint64, n int) {
	if n == 0 {
		return
	}
	if !st.native {
		st.done(int64(n))
		return
	}
	var queued bool
	st.mu.Lock()
	released := st.settle(seq, n, false, &queued)
	st.mu.Unlock()
	st.done(released)
}

// end marks the stream gone and releases what it held: queued ACKs nobody will send. The
// events still in the pipeline are released as they are resolved (above).
func (st *stream) end() {
	st.mu.Lock()
	st.dead = true
	n := len(st.acks)
	st.acks = nil
	for _, a := range st.seqAcks {
		n += a.events
	}
	st.seqAcks = nil
	st.mu.Unlock()
	st.done(int64(n))
}

// authorize checks the stream's token (auth: hmac), the same for both protocols.
func (r *Receiver) authorize(ctx context.Context) error {
	live := r.live.Load()
	if live.cfg.Auth != "hmac" {
		return nil
	}
	value := authorization(ctx)
	c := flowwire.VerifyAuthorizationLimits(value, live.secrets, time.Now(), live.cfg.MaxTokenLifetime)
	if c.Err == nil {
		return nil
	}
	reason := "token_invalid"
	switch {
	case errors.Is(c.Err, flowwire.ErrTokenMissing):
		reason = "token_missing"
	case errors.Is(c.Err, flowwire.ErrTokenExpired):
		reason = "token_expired"
	case errors.Is(c.Err, flowwire.ErrTokenTooLong):
		reason = "token_lifetime"
	}
	var attrs []any
	if c.Payload != "" {
		attrs = []any{"token_payload", c.Payload}
	}
	return r.refuseWith(ctx, reason, codes.Unauthenticated, attrs, "%v", c.Err)
}

// admit authorizes a new stream and takes one of max_streams slots; leave gives it back.
func (r *Receiver) admit(ctx context.Context) (leave func(), err error) {
	if err := r.authorize(ctx); err != nil {
		return nil, err
	}
	if limit := r.conf().MaxStreams; r.streams.Add(1) > int64(limit) {
		r.streams.Add(-1)
		return nil, r.refuse(ctx, "too_many_streams", codes.ResourceExhausted, "receiver has its maximum of %d streams", limit)
	}
	select {
	case <-r.stopping:
		r.streams.Add(-1)
		return nil, status.Error(codes.Unavailable, "collector is shutting down")
	default:
	}
	return func() { r.streams.Add(-1) }, nil
}

// Events serves one client stream.
func (r *Receiver) Events(ss pb.FlowService_EventsServer) error {
	leave, err := r.admit(ss.Context())
	if err != nil {
		return err
	}
	defer leave()
	// The handshake: headers at once (a client treats a stream without them as failed), then
	// the initiator ACK.
	if err := ss.SendHeader(metadata.Pairs("flowpipe-receiver", "1")); err != nil {
		return err
	}
	if err := ss.SendMsg(flowwire.Raw(flowwire.AppendInitiatorAck(nil))); err != nil {
		return err
	}
	st := newStream(&r.unacked, false)
	return r.serve(ss, st, func() error { return r.receive(ss, st) })
}

// serve runs a stream whose handshake is done: receive reads it in a goroutine, and this one
// sends the ACKs, until the stream ends.
func (r *Receiver) serve(ss grpc.ServerStream, st *stream, receive func() error) error {
	ctx := ss.Context()
	defer st.end()
	st.token, st.admitted = authorization(ctx), time.Now()
	r.track(st)
	defer r.untrack(st)
	if !r.accepts(r.live.Load(), st) {
		// A reload removed its secret between admit and track.
		return r.refuse(ctx, "token_revoked", codes.Unauthenticated, "%s", revokedMessage)
	}
	cfg := r.conf() // the stream's timeouts are those of its start
	recvDone := make(chan error, 1)
	go func() { recvDone <- receive() }()

	// A client must send its initiator in time, and a stream must not sit idle for ever:
	// either holds one of max_streams slots.
	initiator := time.NewTimer(cfg.InitiatorTimeout)
	defer initiator.Stop()
	var idle <-chan time.Time
	if cfg.IdleTimeout > 0 {
		t := time.NewTicker(max(cfg.IdleTimeout/4, 10*time.Millisecond))
		defer t.Stop()
		idle = t.C
	}

	var recvErr error
	received := false
	var acks []uuid.UUID
	var seqs []seqAck
	flush := func() error {
		if st.native {
			return r.flushBatches(ss, st, &seqs)
		}
		return r.flush(ss, st, &acks)
	}
	for {
		select {
		case <-st.wake:
		case <-initiator.C:
			select {
			case <-st.started:
			default:
				return r.refuse(ctx, "no_initiator", codes.DeadlineExceeded, "no initiator message within initiator_timeout (%s)", cfg.InitiatorTimeout)
			}
		case <-idle:
			if st.unacked.Load() == 0 && time.Since(time.Unix(0, st.lastRecv.Load())) >= cfg.IdleTimeout {
				return r.refuse(ctx, "idle", codes.Unavailable, "stream idle for idle_timeout (%s); reconnect to send more", cfg.IdleTimeout)
			}
		case <-st.kick:
			return r.refuse(ctx, "token_revoked", codes.Unauthenticated, "%s", revokedMessage)
		case err := <-recvDone:
			recvErr, received = err, true
			recvDone = nil
		case <-r.closing:
			flush()
			return status.Error(codes.Unavailable, "collector is shutting down")
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
		if err := flush(); err != nil {
			return err
		}
		if received {
			if recvErr != nil {
				return recvErr
			}
			// The client has sent everything: end the stream once all of it is ACKed (or
			// given up on, when the pipeline stops).
			if st.unacked.Load() == 0 {
				return nil
			}
		}
	}
}

// flush sends the queued ACKs.
// ackSize is the encoded size of a FlowEventAck with an event ID.
const ackSize = 18

func (r *Receiver) flush(ss grpc.ServerStream, st *stream, acks *[]uuid.UUID) error {
	st.mu.Lock()
	*acks, st.acks = st.acks, (*acks)[:0]
	st.mu.Unlock()
	if len(*acks) == 0 {
		return nil
	}
	// gRPC writes a message's bytes after SendMsg returns, so every ACK needs bytes of its
	// own: one allocation per flush, sliced.
	all := make([]byte, 0, len(*acks)*ackSize)
	counted := 0 // of *acks, how many st.done has been told about
	for i, id := range *acks {
		start := len(all)
		all = flowwire.AppendAck(all, id)
		if err := ss.SendMsg(flowwire.Raw(all[start:len(all):len(all)])); err != nil {
			st.done(int64(len(*acks) - counted)) // the stream is broken: the rest will not be sent
			return err
		}
		// Counted as done once gRPC has taken it: what it holds for a client that does not
		// read is bounded by HTTP/2 flow control, not by us.
		if i+1-counted == 256 {
			st.done(256)
			counted = i + 1
		}
	}
	st.done(int64(len(*acks) - counted))
	return nil
}

// receive reads the stream's events until it ends; the result is the stream's status.
func (r *Receiver) receive(ss pb.FlowService_EventsServer, st *stream) error {
	ctx := ss.Context()
	var m flowwire.Message
	if err := ss.RecvMsg(&m); err != nil {
		return r.recvError(ctx, err)
	}
	if m.Invalid != nil {
		return r.refuse(ctx, "malformed", codes.InvalidArgument, "%v", m.Invalid)
	}
	if !m.Initiator {
		return r.refuse(ctx, "missing_initiator", codes.InvalidArgument, "the first message must be FlowEvent{isInitiator: true}")
	}
	close(st.started)
	st.lastRecv.Store(time.Now().UnixNano())
	for {
		// Stop reading while the stream has its maximum of events waiting for ACKs: gRPC's
		// flow control then holds the client back.
		for st.unacked.Load() >= int64(r.conf().MaxUnackedPerStrm) {
			select {
			case <-st.room:
			case <-ss.Context().Done():
				return ss.Context().Err()
			}
		}
		if err := ss.RecvMsg(&m); err != nil {
			return r.recvError(ctx, err)
		}
		st.lastRecv.Store(time.Now().UnixNano())
		if m.Invalid != nil {
			return r.refuse(ctx, "malformed", codes.InvalidArgument, "%v", m.Invalid)
		}
		if m.Size > int(r.conf().MaxMessageSize) {
			// The server's limit is the larger of max_message_size and
			// max_batch_message_size (one listener serves both protocols).
			return r.refuse(ctx, "oversized", codes.ResourceExhausted, "FlowEvent of %d bytes is above max_message_size (%d)", m.Size, r.conf().MaxMessageSize)
		}
		if m.Initiator {
			continue
		}
		r.received.Inc()
		m.Event.Source = r.env.Name
		st.took(1)
		r.coll.add(st, 0, unsafe.Slice(&m.Event, 1))
	}
}

func (r *Receiver) recvError(ctx context.Context, err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	if s, ok := status.FromError(err); ok && s.Code() == codes.ResourceExhausted {
		return r.refuse(ctx, "oversized", codes.ResourceExhausted, "%s", s.Message())
	}
	return err
}
