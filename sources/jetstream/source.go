// Package jetstream is the `type: jetstream` source: a durable pull consumer of a NATS
// JetStream stream written by the jetstream sink, the writer side of the collector tier
// (docs/scale-out.md). Each message becomes one batch; the message is acknowledged to
// JetStream only when the batch's acknowledgement arrives, that is when every sink has made
// its events durable, and negatively acknowledged with a growing delay when the pipeline
// could not deliver it. A message that is not a flowpipe batch is counted, logged with its
// subject and sequence, and terminated: never redelivered. Events are de-duplicated by ID
// over a window (optionally kept in a state file), so a redelivery or a collector's resend
// reaches the sinks once. Several writers can share one consumer.
package jetstream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/backoff"
	"github.com/flowpipe/flowpipe/internal/dedup"
	"github.com/flowpipe/flowpipe/internal/logcodec"
	"github.com/flowpipe/flowpipe/internal/natsconn"

	"github.com/google/uuid"
)

// Factory builds `type: jetstream` sources.
func Factory() component.Factory {
	return component.NewSourceFactory("jetstream", "consume batches from a NATS JetStream stream, acknowledged end to end",
		defaultConfig, func(env component.Env, c *Config) (component.Source, error) { return New(env, c) })
}

// Source is the JetStream source.
type Source struct {
	cfg    *Config
	env    component.Env
	log    *slog.Logger
	format logcodec.Format

	startOnce sync.Once
	startErr  error
	conn      *natsconn.Conn
	cons      js.Consumer

	mu       sync.Mutex
	dedup    *dedup.Gate
	inflight map[uint64]js.Msg // stream sequence → the delivery being processed
	runErr   error             // the consumer's last error, for /readyz
	wg       sync.WaitGroup    // batches not yet acknowledged

	received, acked, naked, duplicates, redelivered prometheus.Counter
	rejected                                        *prometheus.CounterVec
}

// New builds a source; it connects in Start.
func New(env component.Env, c *Config) (*Source, error) {
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if env.Metrics == nil {
		env.Metrics = component.NopMetrics{}
	}
	s := &Source{cfg: c, env: env, log: env.Logger, format: logcodec.Format(c.Format),
		dedup: dedup.NewGate(c.Dedup), inflight: map[uint64]js.Msg{}}
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: "flowpipe_jetstream_source_" + name, Help: help})
	}
	s.received = counter("messages_received_total", "Messages delivered by JetStream, redeliveries included.")
	s.acked = counter("messages_acked_total", "Messages acknowledged to JetStream after their batch was delivered.")
	s.naked = counter("messages_naked_total", "Messages negatively acknowledged (redelivered later) because their batch failed.")
	s.duplicates = counter("duplicate_events_total", "Events already delivered or in flight (a redelivery or a resend), not passed on.")
	s.redelivered = counter("redeliveries_ignored_total", "Redeliveries of a message this source is still processing (its first delivery decides).")
	s.rejected = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flowpipe_jetstream_source_messages_rejected_total",
		Help: "Messages that are not a flowpipe batch, terminated (never redelivered), by reason."}, []string{"reason"})
	if err := env.Register(s.received, s.acked, s.naked, s.duplicates, s.redelivered, s.rejected); err != nil {
		return nil, err
	}
	return s, nil
}

// Start connects, finds the stream and creates or updates the durable consumer. A server
// that cannot be reached, refused credentials or a missing stream is an error here.
func (s *Source) Start(ctx context.Context) error {
	s.startOnce.Do(func() { s.startErr = s.start(ctx) })
	return s.startErr
}

func (s *Source) start(ctx context.Context) error {
	if err := s.dedup.Load(s.cfg.Dedup.StateFile, s.env.Path, time.Now()); err != nil {
		return err
	}
	conn, err := natsconn.Connect(ctx, s.env, &s.cfg.Config)
	if err != nil {
		return err
	}
	cc := js.ConsumerConfig{
		Durable:       s.cfg.Durable,
		AckPolicy:     js.AckExplicitPolicy,
		AckWait:       s.cfg.AckWait,
		MaxAckPending: s.cfg.MaxAckPending,
		FilterSubject: s.cfg.FilterSubject,
		MaxDeliver:    -1,
		DeliverPolicy: js.DeliverAllPolicy,
	}
	// Look the consumer up first: a writer restarting while a node of the cluster is down
	// needs only the consumer's leader, where an update needs the whole replica set.
	// A cluster electing a new leader (a node just died) answers late or not at all for a
	// moment: try again for a while before giving up.
	var cons js.Consumer
	err = natsconn.Retry(ctx, s.log, "JetStream consumer look-up", s.cfg.RequestTimeout, 3*s.cfg.RequestTimeout, func(ctx context.Context) error {
		var err error
		cons, err = conn.JS.Consumer(ctx, s.cfg.Stream, s.cfg.Durable)
		if errors.Is(err, js.ErrConsumerNotFound) {
			cons, err = conn.JS.CreateOrUpdateConsumer(ctx, s.cfg.Stream, cc)
		}
		return err
	})
	if err != nil {
		conn.Close()
		if errors.Is(err, js.ErrStreamNotFound) {
			return fmt.Errorf("JetStream stream %q does not exist (the jetstream sink creates it with create_stream, or: nats stream add %s)", s.cfg.Stream, s.cfg.Stream)
		}
		return fmt.Errorf("JetStream consumer %q on stream %q: %w", s.cfg.Durable, s.cfg.Stream, err)
	}
	s.conn, s.cons = conn, cons
	s.log.Info("consuming from JetStream", "server", conn.NC.ConnectedUrlRedacted(), "stream", s.cfg.Stream, "durable", s.cfg.Durable,
		"dedup_ids", s.dedup.Remembered())
	return nil
}

// Run pulls messages and emits one batch per message until ctx ends.
func (s *Source) Run(ctx context.Context, out component.Emitter) error {
	if err := s.Start(ctx); err != nil {
		return err
	}
	it, err := s.cons.Messages(js.PullMaxMessages(s.cfg.Fetch))
	if err != nil {
		return fmt.Errorf("JetStream consumer %q: %w", s.cfg.Durable, err)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-ctx.Done():
		case <-stop:
		}
		it.Stop()
	}()
	go s.keepAlive(stop)
	var g gather
	for {
		var msg js.Msg
		var err error
		if len(g.msgs) == 0 {
			msg, err = it.Next()
		} else if wait := time.Until(g.deadline); wait > 0 {
			msg, err = it.Next(js.NextMaxWait(wait))
		} else {
			s.emit(ctx, out, &g)
			continue
		}
		if err != nil {
			if errors.Is(err, nats.ErrTimeout) {
				s.emit(ctx, out, &g)
				continue
			}
			s.emit(ctx, out, &g)
			if errors.Is(err, js.ErrMsgIteratorClosed) || ctx.Err() != nil {
				return nil
			}
			s.setRunErr(err)
			s.env.Metrics.Errors("consume", 1)
			s.log.Warn("JetStream consumer", "err", err)
			continue
		}
		s.setRunErr(nil)
		s.take(msg, &g)
		if len(g.events) >= s.cfg.BatchSize {
			s.emit(ctx, out, &g)
		}
	}
}

// gather is the batch being built from the messages taken since the last emit.
type gather struct {
	msgs     []delivery
	events   []flow.Event
	deadline time.Time
}

// delivery is one message in a batch, with the events it brought.
type delivery struct {
	msg js.Msg
	md  *js.MsgMetadata
	ids []uuid.UUID
}

// keepAlive tells JetStream, every third of ack_wait, that the messages in the pipeline are
// still being worked on, so that a slow sink does not make them go to another writer.
func (s *Source) keepAlive(stop chan struct{}) {
	t := time.NewTicker(s.cfg.AckWait / 3)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		msgs := make([]js.Msg, 0, len(s.inflight))
		for _, m := range s.inflight {
			msgs = append(msgs, m)
		}
		s.mu.Unlock()
		for _, m := range msgs {
			_ = m.InProgress()
		}
	}
}

func (s *Source) setRunErr(err error) {
	s.mu.Lock()
	s.runErr = err
	s.mu.Unlock()
}

// take decodes msg and adds its new events to g; a bad message is rejected, a message
// whose events are all known is acknowledged at once.
func (s *Source) take(msg js.Msg, g *gather) {
	s.received.Inc()
	md, err := msg.Metadata()
	if err != nil {
		s.reject(msg, nil, "not_jetstream", err)
		return
	}
	f := s.format
	if ct := msg.Headers().Get(logcodec.Header); ct != "" {
		var ok bool
		if f, ok = logcodec.FormatOf(ct); !ok {
			s.reject(msg, md, "content_type", fmt.Errorf("unknown content type %q", ct))
			return
		}
	}
	n := len(g.events)
	events, err := logcodec.Decode(f, g.events, msg.Data())
	if err != nil {
		s.reject(msg, md, "malformed", err)
		return
	}
	seq := md.Sequence.Stream
	s.mu.Lock()
	if _, busy := s.inflight[seq]; busy {
		s.mu.Unlock()
		g.events = events[:n]
		s.redelivered.Inc()
		return
	}
	keep := events[:n]
	dups := 0
	var ids []uuid.UUID
	for i := n; i < len(events); i++ {
		id := events[i].EventID
		if !s.dedup.Admit(id) {
			dups++
			continue
		}
		ids = append(ids, id)
		keep = append(keep, events[i])
	}
	if len(ids) > 0 {
		s.inflight[seq] = msg
	}
	s.mu.Unlock()
	g.events = keep
	if dups > 0 {
		s.duplicates.Add(float64(dups))
	}
	if len(ids) == 0 {
		// Every event was delivered already, or is in flight in another message that will
		// be acknowledged (or redelivered) on its own.
		s.ack(msg)
		return
	}
	if len(g.msgs) == 0 {
		g.deadline = time.Now().Add(s.cfg.BatchDelay)
	}
	g.msgs = append(g.msgs, delivery{msg: msg, md: md, ids: ids})
}

// emit hands the gathered batch to the pipeline.
func (s *Source) emit(ctx context.Context, out component.Emitter, g *gather) {
	if len(g.msgs) == 0 {
		return
	}
	msgs, events := g.msgs, g.events
	*g = gather{}
	s.wg.Add(1)
	b := flow.NewBatch(events, func(err error) { s.finish(msgs, err) })
	b.Source = s.env.Name
	// Emit acknowledges the batch in every case (ErrShutdown when it could not take it).
	_ = out.Emit(ctx, b)
}

// finish is a batch's acknowledgement: acknowledge its messages, or ask for them again.
func (s *Source) finish(msgs []delivery, err error) {
	defer s.wg.Done()
	ok := err == nil || flow.IsDrop(err)
	now := time.Now()
	s.mu.Lock()
	var jerr error
	for _, d := range msgs {
		// Remembered (and journaled) before the acknowledgement leaves: a writer killed
		// after this point knows these events when JetStream redelivers the message.
		if e := s.dedup.Settle(d.ids, ok, now); e != nil && jerr == nil {
			jerr = e
		}
		delete(s.inflight, d.md.Sequence.Stream)
	}
	s.mu.Unlock()
	if jerr != nil {
		s.env.Metrics.Errors("dedup_state", 1)
		s.log.Error("dedup state not saved; a redelivery after a restart may be delivered twice", "err", jerr)
	}
	for _, d := range msgs {
		if ok {
			s.ack(d.msg)
			continue
		}
		delay := backoff.Policy{Initial: s.cfg.NakDelay, Max: s.cfg.NakMaxDelay}.Delay(int(min(d.md.NumDelivered, 64)))
		if errors.Is(err, flow.ErrShutdown) {
			delay = 0 // another writer may take it at once
		}
		s.naked.Inc()
		if nerr := d.msg.NakWithDelay(delay); nerr != nil {
			s.log.Warn("negative acknowledgement not sent; JetStream redelivers after ack_wait", "subject", d.msg.Subject(), "stream_seq", d.md.Sequence.Stream, "err", nerr)
		}
	}
}

func (s *Source) ack(msg js.Msg) {
	if err := msg.Ack(); err != nil {
		s.env.Metrics.Errors("ack", 1)
		s.log.Warn("acknowledgement not sent; JetStream redelivers after ack_wait and the event IDs are recognised", "subject", msg.Subject(), "err", err)
		return
	}
	s.acked.Inc()
}

// reject terminates a message that is not a flowpipe batch, so it is never redelivered.
func (s *Source) reject(msg js.Msg, md *js.MsgMetadata, reason string, err error) {
	s.rejected.WithLabelValues(reason).Inc()
	s.env.Metrics.Dropped("malformed_message", 1)
	var seq, delivered uint64
	if md != nil {
		seq, delivered = md.Sequence.Stream, md.NumDelivered
	}
	s.log.Error("message is not a flowpipe batch; terminated, it will not be redelivered",
		"stream", s.cfg.Stream, "subject", msg.Subject(), "stream_seq", seq, "delivered", delivered, "bytes", len(msg.Data()), "reason", reason, "err", err)
	if terr := msg.Term(); terr != nil {
		s.log.Warn("terminate not sent", "subject", msg.Subject(), "stream_seq", seq, "err", terr)
	}
}

// Health reports a lost connection or a failing consumer (component.HealthChecker).
func (s *Source) Health() error {
	if s.conn == nil {
		if s.startErr != nil {
			return s.startErr
		}
		return errors.New("not connected to JetStream")
	}
	if err := s.conn.Health(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.runErr != nil {
		return fmt.Errorf("JetStream consumer %q: %w", s.cfg.Durable, s.runErr)
	}
	return nil
}

// Close waits (within ctx) for the acknowledgement of every batch emitted, so that their
// messages are acknowledged, then closes the connection.
func (s *Source) Close(ctx context.Context) error {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.log.Warn("closing with batches not yet acknowledged; JetStream redelivers them")
	}
	if s.conn != nil {
		// Flush the acknowledgements already queued before the connection goes.
		_ = s.conn.NC.FlushTimeout(2 * time.Second)
		s.conn.Close()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dedup.Close()
}
