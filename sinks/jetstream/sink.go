// Package jetstream is the `type: jetstream` sink: it publishes batches of flow events to a
// NATS JetStream stream, the log between a collector tier and a writer tier
// (docs/scale-out.md). A write succeeds only when JetStream has acknowledged every message
// of the batch, which it does once the message is stored on a quorum of the stream's
// replicas. Messages are published asynchronously within a bounded window; each carries a
// Nats-Msg-Id derived from its events' IDs, so a batch written again after a failure or a
// timeout is recognised by JetStream (within the stream's duplicate window) and stored once.
package jetstream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	js "github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/logcodec"
	"github.com/flowpipe/flowpipe/internal/natsconn"
)

// Factory builds `type: jetstream` sinks.
func Factory() component.Factory {
	f := component.NewSinkFactory("jetstream", "publish batches to a NATS JetStream stream, acknowledged once stored and replicated",
		defaultConfig, func(env component.Env, c *Config) (component.Sink, error) { return New(env, c) })
	// A write waits for JetStream's acknowledgements: keep several batches on the wire.
	f.InFlight = 4
	return f
}

// Sink is the JetStream sink. Write may be called concurrently.
type Sink struct {
	cfg    *Config
	env    component.Env
	log    *slog.Logger
	format logcodec.Format
	ct     string

	mu       sync.Mutex
	conn     *natsconn.Conn
	maxSize  int
	startErr error

	published, duplicates, bytes prometheus.Counter
}

// New builds a sink; it connects in Start.
func New(env component.Env, c *Config) (*Sink, error) {
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Sink{cfg: c, env: env, log: env.Logger, format: logcodec.Format(c.Format)}
	s.ct = s.format.ContentType()
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: "flowpipe_jetstream_sink_" + name, Help: help})
	}
	s.published = counter("messages_published_total", "Messages acknowledged by JetStream.")
	s.duplicates = counter("messages_duplicate_total", "Messages JetStream already had (a resend recognised by Nats-Msg-Id).")
	s.bytes = counter("bytes_published_total", "Payload bytes acknowledged by JetStream.")
	if err := env.Register(s.published, s.duplicates, s.bytes); err != nil {
		return nil, err
	}
	return s, nil
}

// Start connects and makes sure the stream exists (creating it when create_stream is set)
// and takes the subject; any problem is an error that stops the pipeline before it runs.
func (s *Sink) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		return nil
	}
	conn, err := natsconn.Connect(ctx, s.env, &s.cfg.Config,
		js.WithPublishAsyncMaxPending(s.cfg.MaxPending), js.WithPublishAsyncTimeout(s.cfg.AckTimeout))
	if err != nil {
		s.startErr = err
		return err
	}
	if err := s.stream(ctx, conn); err != nil {
		conn.Close()
		s.startErr = err
		return err
	}
	// Headers (content type, message ID) take a few hundred bytes of max_payload.
	s.maxSize = min(int(s.cfg.MaxMessageSize), int(conn.NC.MaxPayload())-512)
	s.conn = conn
	s.log.Info("publishing to JetStream", "server", conn.NC.ConnectedUrlRedacted(), "stream", s.cfg.Stream,
		"subject", s.cfg.Subject, "format", s.cfg.Format, "max_message_size", s.maxSize)
	return nil
}

func (s *Sink) stream(ctx context.Context, conn *natsconn.Conn) error {
	var st js.Stream
	err := natsconn.Retry(ctx, s.log, "JetStream stream look-up", s.cfg.RequestTimeout, 3*s.cfg.RequestTimeout, func(ctx context.Context) error {
		var err error
		st, err = conn.JS.Stream(ctx, s.cfg.Stream)
		if errors.Is(err, js.ErrStreamNotFound) && s.cfg.CreateStream != nil {
			st, err = conn.JS.CreateStream(ctx, s.streamConfig())
			if errors.Is(err, js.ErrStreamNameAlreadyInUse) {
				st, err = conn.JS.Stream(ctx, s.cfg.Stream)
			} else if err == nil {
				s.log.Info("created stream", "stream", s.cfg.Stream, "replicas", s.cfg.CreateStream.Replicas)
			}
		}
		return err
	})
	switch {
	case errors.Is(err, js.ErrStreamNotFound):
		return fmt.Errorf("JetStream stream %q does not exist: create it (nats stream add %s --subjects '%s' --replicas 3) or set create_stream",
			s.cfg.Stream, s.cfg.Stream, placeholder.ReplaceAllString(s.cfg.Subject, "*"))
	case err != nil:
		return fmt.Errorf("JetStream stream %q: %w", s.cfg.Stream, err)
	}
	probe := placeholder.ReplaceAllString(s.cfg.Subject, "x")
	for _, p := range st.CachedInfo().Config.Subjects {
		if subjectMatches(p, probe) {
			return nil
		}
	}
	return fmt.Errorf("subject %q is not one of stream %q's subjects %v", s.cfg.Subject, s.cfg.Stream, st.CachedInfo().Config.Subjects)
}

func (s *Sink) streamConfig() js.StreamConfig {
	c := s.cfg.CreateStream
	sc := js.StreamConfig{
		Name: s.cfg.Stream, Subjects: c.Subjects, Replicas: c.Replicas,
		MaxAge: c.MaxAge, MaxBytes: int64(c.MaxBytes), Duplicates: c.DuplicateWindow,
		Storage: js.FileStorage,
	}
	if c.MaxBytes == 0 {
		sc.MaxBytes = -1
	}
	if c.Storage == "memory" {
		sc.Storage = js.MemoryStorage
	}
	switch c.Retention {
	case "interest":
		sc.Retention = js.InterestPolicy
	case "workqueue":
		sc.Retention = js.WorkQueuePolicy
	}
	return sc
}

// Write publishes the batch and returns nil once JetStream acknowledged all of it. On an
// error the runtime writes the batch again: the messages already stored are recognised by
// their Nats-Msg-Id and not stored twice.
func (s *Sink) Write(ctx context.Context, b *flow.Batch) error {
	if len(b.Events) == 0 {
		return nil
	}
	s.mu.Lock()
	conn, max := s.conn, s.maxSize
	s.mu.Unlock()
	if conn == nil {
		return errors.New("jetstream sink not started")
	}
	var futures []js.PubAckFuture
	for _, g := range s.groups(b.Events) {
		chunks, err := logcodec.Split(s.format, g.events, max)
		if err != nil {
			// An event that cannot fit in a message never will: retrying is pointless.
			return flow.Permanent(err)
		}
		for _, c := range chunks {
			m := &nats.Msg{Subject: g.subject, Data: c.Payload, Header: nats.Header{}}
			m.Header.Set(logcodec.Header, s.ct)
			m.Header.Set(nats.MsgIdHdr, logcodec.MsgID(c.Events))
			f, err := s.publish(ctx, conn, m)
			if err != nil {
				return err
			}
			futures = append(futures, f)
		}
	}
	var first error
	for _, f := range futures {
		select {
		case ack := <-f.Ok():
			s.published.Inc()
			s.bytes.Add(float64(len(f.Msg().Data)))
			if ack.Duplicate {
				s.duplicates.Inc()
			}
		case err := <-f.Err():
			if first == nil {
				first = fmt.Errorf("publish to %s: %w", f.Msg().Subject, err)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return first
}

// publish sends m asynchronously, waiting while the window is full.
func (s *Sink) publish(ctx context.Context, conn *natsconn.Conn, m *nats.Msg) (js.PubAckFuture, error) {
	for {
		f, err := conn.JS.PublishMsgAsync(m)
		if !errors.Is(err, js.ErrTooManyStalledMsgs) {
			if err != nil {
				return nil, fmt.Errorf("publish to %s: %w", m.Subject, err)
			}
			return f, nil
		}
		select {
		case <-conn.JS.PublishAsyncComplete():
		case <-time.After(10 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

type group struct {
	subject string
	events  []flow.Event
}

// groups splits events by subject, in a fixed order, keeping their order within a subject.
func (s *Sink) groups(events []flow.Event) []group {
	if !placeholder.MatchString(s.cfg.Subject) {
		return []group{{s.cfg.Subject, events}}
	}
	by := map[string][]flow.Event{}
	for i := range events {
		e := &events[i]
		subj := placeholder.ReplaceAllStringFunc(s.cfg.Subject, func(p string) string {
			return subjectToken(fields[p[1:len(p)-1]](e))
		})
		by[subj] = append(by[subj], *e)
	}
	out := make([]group, 0, len(by))
	for subj, evs := range by {
		out = append(out, group{subj, evs})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].subject < out[j].subject })
	return out
}

// Health reports a lost connection (component.HealthChecker, for /readyz).
func (s *Sink) Health() error {
	s.mu.Lock()
	conn, startErr := s.conn, s.startErr
	s.mu.Unlock()
	if conn == nil {
		if startErr != nil {
			return startErr
		}
		return errors.New("not connected to JetStream")
	}
	return conn.Health()
}

// Close waits (within ctx) for outstanding acknowledgements and closes the connection.
func (s *Sink) Close(ctx context.Context) error {
	s.mu.Lock()
	conn := s.conn
	s.conn = nil
	s.mu.Unlock()
	if conn == nil {
		return nil
	}
	select {
	case <-conn.JS.PublishAsyncComplete():
	case <-ctx.Done():
	}
	conn.Close()
	return nil
}
