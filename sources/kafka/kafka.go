// Package kafka is the `type: kafka` source: a consumer-group member that reads the records
// the kafka sink produced and emits them as batches. An offset is committed only when every
// record up to it has been acknowledged through the pipeline (every sink made it durable),
// so a consumer killed at any point loses nothing: the group's next owner of a partition
// starts after the last record that was delivered. On a rebalance, the partitions being
// revoked are released only after their records in flight are acknowledged and committed.
// Events are de-duplicated by ID over a window (optionally kept in a state file): the sink
// keys records by flow ID, so an event and its resend reach the same partition, and so the
// same consumer.
package kafka

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/dedup"
	"github.com/flowpipe/flowpipe/internal/kafkaconn"
	"github.com/flowpipe/flowpipe/internal/logcodec"
)

// Config is the options of a `type: kafka` source.
type Config struct {
	kafkaconn.Config `yaml:",inline"`

	Topics []string `yaml:"topics" required:"true"`
	Group  string   `yaml:"group" required:"true"` // consumer group; members split the partitions
	// Format of records without a content-type header; a header, when present, decides.
	Format         string        `yaml:"format"`
	BatchSize      int           `yaml:"batch_size"`      // records per emitted batch, at most
	RevokeTimeout  time.Duration `yaml:"revoke_timeout"`  // on a rebalance, wait this long for records in flight
	SessionTimeout time.Duration `yaml:"session_timeout"` // the group drops a member silent this long

	Dedup dedup.Config `yaml:"dedup"`
}

// DedupConfig is the event-ID de-duplication window.
type DedupConfig struct {
	Window    time.Duration `yaml:"window"`
	MaxEvents int           `yaml:"max_events"`
	StateFile string        `yaml:"state_file"`
}

func defaultConfig() *Config {
	return &Config{Config: kafkaconn.Defaults(), Format: string(logcodec.Packed), BatchSize: 2000,
		RevokeTimeout: 30 * time.Second, SessionTimeout: 45 * time.Second,
		Dedup: dedup.DefaultConfig()}
}

// Validate checks the options together.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	c.Config.Validate(&errs)
	if len(c.Topics) == 0 {
		errs.Add("topics", "list at least one topic")
	}
	if c.Group == "" {
		errs.Add("group", "must not be empty")
	}
	if !logcodec.Format(c.Format).Valid() {
		errs.Add("format", "%q: want packed, json or protobuf", c.Format)
	}
	if c.BatchSize < 1 {
		errs.Add("batch_size", "must be at least 1")
	}
	if c.RevokeTimeout <= 0 {
		errs.Add("revoke_timeout", "must be positive")
	}
	if c.SessionTimeout < 6*time.Second {
		errs.Add("session_timeout", "must be at least 6s (Kafka's group.min.session.timeout.ms)")
	}
	c.Dedup.Check(&errs, "dedup")
	return errs.Err()
}

// Factory builds `type: kafka` sources.
func Factory() component.Factory {
	return component.NewSourceFactory("kafka", "consume events from Kafka topics as a group member, committing only what was delivered",
		defaultConfig, func(env component.Env, c *Config) (component.Source, error) { return New(env, c) })
}

type tp struct {
	topic     string
	partition int32
}

// partition tracks the records of one partition that were polled and not yet committed.
type partition struct {
	epoch   int32
	offsets []int64        // polled, in order
	done    map[int64]bool // acknowledged
}

// Source is the Kafka source.
type Source struct {
	cfg    *Config
	env    component.Env
	log    *slog.Logger
	format logcodec.Format

	startOnce sync.Once
	startErr  error
	cl        *kgo.Client

	mu    sync.Mutex
	cond  *sync.Cond // signalled when records are acknowledged
	parts map[tp]*partition
	dedup *dedup.Gate
	wg    sync.WaitGroup

	toCommit map[string]map[int32]kgo.EpochOffset // acknowledged, not yet committed (under mu)
	commitMu sync.Mutex                           // one commit at a time, in order
	kick     chan struct{}                        // wakes the committer

	duplicates prometheus.Counter
	rejected   *prometheus.CounterVec
}

// New builds a source; it joins the group in Start.
func New(env component.Env, c *Config) (*Source, error) {
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if env.Metrics == nil {
		env.Metrics = component.NopMetrics{}
	}
	s := &Source{cfg: c, env: env, log: env.Logger, format: logcodec.Format(c.Format), parts: map[tp]*partition{},
		dedup: dedup.NewGate(c.Dedup)}
	s.cond = sync.NewCond(&s.mu)
	s.kick = make(chan struct{}, 1)
	s.duplicates = prometheus.NewCounter(prometheus.CounterOpts{Name: "flowpipe_kafka_source_duplicate_events_total",
		Help: "Events already delivered or in flight (a redelivery or a resend), not passed on."})
	s.rejected = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flowpipe_kafka_source_records_rejected_total",
		Help: "Records that are not flowpipe events, skipped and committed, by reason."}, []string{"reason"})
	if err := env.Register(s.duplicates, s.rejected); err != nil {
		return nil, err
	}
	return s, nil
}

// Start connects, checks the topics and joins the group.
func (s *Source) Start(ctx context.Context) error {
	s.startOnce.Do(func() { s.startErr = s.start(ctx) })
	return s.startErr
}

func (s *Source) start(ctx context.Context) error {
	if err := s.dedup.Load(s.cfg.Dedup.StateFile, s.env.Path, time.Now()); err != nil {
		return err
	}
	opts, err := s.cfg.Opts(s.env)
	if err != nil {
		return err
	}
	opts = append(opts,
		kgo.ConsumerGroup(s.cfg.Group),
		kgo.ConsumeTopics(s.cfg.Topics...),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.SessionTimeout(s.cfg.SessionTimeout),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.OnPartitionsRevoked(s.revoked),
		kgo.OnPartitionsLost(s.lost),
	)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return fmt.Errorf("kafka client: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, 2*s.cfg.DialTimeout)
	defer cancel()
	if err := kafkaconn.CheckTopics(cctx, cl, s.cfg.Brokers, s.cfg.Topics...); err != nil {
		cl.Close()
		return err
	}
	s.cl = cl
	s.log.Info("consuming from Kafka", "brokers", s.cfg.Brokers, "topics", s.cfg.Topics, "group", s.cfg.Group, "dedup_ids", s.dedup.Remembered())
	return nil
}

// Run polls records and emits them as batches until ctx ends.
func (s *Source) Run(ctx context.Context, out component.Emitter) error {
	if err := s.Start(ctx); err != nil {
		return err
	}
	cctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.committer(cctx)
	for {
		fs := s.cl.PollRecords(ctx, s.cfg.BatchSize)
		if fs.IsClientClosed() || ctx.Err() != nil {
			s.cl.AllowRebalance()
			return nil
		}
		fs.EachError(func(t string, p int32, err error) {
			if !errors.Is(err, context.Canceled) {
				s.env.Metrics.Errors("fetch", 1)
				s.log.Warn("Kafka fetch", "topic", t, "partition", p, "err", err)
			}
		})
		var recs []*kgo.Record
		fs.EachRecord(func(r *kgo.Record) { recs = append(recs, r) })
		if len(recs) > 0 {
			s.emit(ctx, out, recs)
		}
		s.cl.AllowRebalance()
	}
}

func (s *Source) emit(ctx context.Context, out component.Emitter, recs []*kgo.Record) {
	var events []flow.Event
	s.mu.Lock()
	for _, r := range recs {
		k := tp{r.Topic, r.Partition}
		p := s.parts[k]
		if p == nil {
			p = &partition{done: map[int64]bool{}}
			s.parts[k] = p
		}
		p.epoch = r.LeaderEpoch
		p.offsets = append(p.offsets, r.Offset)
	}
	s.mu.Unlock()
	var rejected []*kgo.Record
	for _, r := range recs {
		f := s.format
		for _, h := range r.Headers {
			if h.Key == "content-type" {
				var ok bool
				if f, ok = logcodec.FormatOf(string(h.Value)); !ok {
					f = ""
				}
			}
		}
		n := len(events)
		var err error
		if f == "" {
			err = errors.New("unknown content type")
		} else {
			events, err = logcodec.Decode(f, events, r.Value)
		}
		if err != nil {
			events = events[:n]
			s.rejected.WithLabelValues("malformed").Inc()
			s.env.Metrics.Dropped("malformed_message", 1)
			s.log.Error("record is not a flowpipe event; skipped", "topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "err", err)
			rejected = append(rejected, r)
		}
	}
	s.mu.Lock()
	keep := events[:0]
	for i := range events {
		id := events[i].EventID
		if !s.dedup.Admit(id) {
			s.duplicates.Inc()
			continue
		}
		keep = append(keep, events[i])
	}
	s.mu.Unlock()
	if len(keep) == 0 {
		s.finish(recs, nil, nil)
		return
	}
	s.wg.Add(1)
	b := flow.NewBatch(keep, func(err error) { defer s.wg.Done(); s.finish(recs, keep, err) })
	b.Source = s.env.Name
	_ = out.Emit(ctx, b)
}

// finish marks the records of an acknowledged batch and commits every partition up to its
// first record not yet acknowledged. Records of a failed batch stay uncommitted: they are
// read again by whoever owns the partition next (after a restart or a rebalance).
func (s *Source) finish(recs []*kgo.Record, events []flow.Event, err error) {
	ok := err == nil || flow.IsDrop(err)
	ids := make([]uuid.UUID, len(events))
	for i := range events {
		ids[i] = events[i].EventID
	}
	s.mu.Lock()
	jerr := s.dedup.Settle(ids, ok, time.Now())
	if ok {
		for _, r := range recs {
			if p := s.parts[tp{r.Topic, r.Partition}]; p != nil {
				p.done[r.Offset] = true
			}
		}
	}
	if s.toCommit == nil {
		s.toCommit = map[string]map[int32]kgo.EpochOffset{}
	}
	commit := s.toCommit
	for k, p := range s.parts {
		i := 0
		for i < len(p.offsets) && p.done[p.offsets[i]] {
			delete(p.done, p.offsets[i])
			i++
		}
		if i == 0 {
			continue
		}
		next := p.offsets[i-1] + 1
		p.offsets = p.offsets[i:]
		if commit[k.topic] == nil {
			commit[k.topic] = map[int32]kgo.EpochOffset{}
		}
		commit[k.topic][k.partition] = kgo.EpochOffset{Epoch: p.epoch, Offset: next}
	}
	s.cond.Broadcast()
	s.mu.Unlock()
	if jerr != nil {
		s.env.Metrics.Errors("dedup_state", 1)
		s.log.Error("dedup state not saved; a redelivery after a restart may be delivered twice", "err", jerr)
	}
	if !ok {
		s.log.Warn("batch not delivered; its records stay uncommitted and are read again after a restart or rebalance", "records", len(recs), "err", err)
	}
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// committer commits acknowledged offsets as they come, one commit at a time.
func (s *Source) committer(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
		}
		s.commit(ctx)
	}
}

// commit commits what has been acknowledged so far.
func (s *Source) commit(ctx context.Context) {
	s.commitMu.Lock()
	defer s.commitMu.Unlock()
	s.mu.Lock()
	c := s.toCommit
	s.toCommit = nil
	s.mu.Unlock()
	if len(c) == 0 {
		return
	}
	s.cl.CommitOffsetsSync(ctx, c, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, _ *kmsg.OffsetCommitResponse, err error) {
		if err != nil {
			s.env.Metrics.Errors("commit", 1)
			s.log.Warn("offset commit failed; the records after the last commit may be read again", "err", err)
		}
	})
}

// revoked runs before the group takes partitions away: wait (within revoke_timeout) for
// their records in flight, commit, and forget them.
func (s *Source) revoked(ctx context.Context, cl *kgo.Client, revoked map[string][]int32) {
	deadline := time.Now().Add(s.cfg.RevokeTimeout)
	timer := time.AfterFunc(s.cfg.RevokeTimeout, func() { s.mu.Lock(); s.cond.Broadcast(); s.mu.Unlock() })
	defer timer.Stop()
	s.mu.Lock()
	for {
		left := 0
		for t, ps := range revoked {
			for _, p := range ps {
				if st := s.parts[tp{t, p}]; st != nil {
					left += len(st.offsets)
				}
			}
		}
		if left == 0 || time.Now().After(deadline) {
			if left > 0 {
				s.log.Warn("partitions revoked with records in flight; their next owner reads them again", "records", left)
			}
			break
		}
		s.cond.Wait()
	}
	for t, ps := range revoked {
		for _, p := range ps {
			delete(s.parts, tp{t, p})
		}
	}
	s.mu.Unlock()
	s.commit(ctx)
	sorted := make([]string, 0, len(revoked))
	for t := range revoked {
		sorted = append(sorted, t)
	}
	sort.Strings(sorted)
	s.log.Info("partitions revoked", "topics", sorted)
}

// lost runs when the group dropped this member (session timeout): nothing can be committed.
func (s *Source) lost(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
	s.mu.Lock()
	for t, ps := range lost {
		for _, p := range ps {
			delete(s.parts, tp{t, p})
		}
	}
	s.mu.Unlock()
	s.log.Warn("partitions lost (session timed out); their records in flight are read again by their next owner")
}

// Health reports a failed start (component.HealthChecker, for /readyz).
func (s *Source) Health() error {
	if s.cl == nil {
		if s.startErr != nil {
			return s.startErr
		}
		return errors.New("not connected to Kafka")
	}
	return nil
}

// Close waits (within ctx) for the batches in flight, commits, and leaves the group.
func (s *Source) Close(ctx context.Context) error {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.log.Warn("closing with batches not yet acknowledged; their records are read again")
	}
	if s.cl != nil {
		s.commit(ctx)
		s.cl.Close() // leaves the group, after the revoke callback
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dedup.Close()
}
