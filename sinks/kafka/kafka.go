// Package kafka is the `type: kafka` sink: it produces flow events to a Kafka topic, one
// record per event, keyed by a chosen field (the flow ID by default, so that an event and its
// resend land in the same partition, where the kafka source de-duplicates them). The producer
// is idempotent with acks=all: a write succeeds only when every in-sync replica has every
// record of the batch. Records are compressed in batches (zstd, lz4, snappy, gzip).
package kafka

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/kafkaconn"
	"github.com/flowpipe/flowpipe/internal/logcodec"
)

// Config is the options of a `type: kafka` sink.
type Config struct {
	kafkaconn.Config `yaml:",inline"`

	Topic  string `yaml:"topic" required:"true"`
	Format string `yaml:"format"` // of each record's value: packed, json or protobuf
	// Key is the field each record is keyed (partitioned) by: flow_id, event_id,
	// src_resource_id, dst_resource_id, source or none (round robin).
	Key            string        `yaml:"key"`
	Compression    string        `yaml:"compression"`     // zstd, lz4, snappy, gzip or none
	ProduceTimeout time.Duration `yaml:"produce_timeout"` // a record not acknowledged within this fails the write (retried)
	Linger         time.Duration `yaml:"linger"`          // wait this long to fill a record batch
}

func defaultConfig() *Config {
	return &Config{Config: kafkaconn.Defaults(), Format: string(logcodec.Packed), Key: "flow_id", Compression: "zstd",
		ProduceTimeout: 30 * time.Second, Linger: 5 * time.Millisecond}
}

var keys = map[string]func(*flow.Event) []byte{
	"flow_id":         func(e *flow.Event) []byte { return e.FlowID[:] },
	"event_id":        func(e *flow.Event) []byte { return e.EventID[:] },
	"src_resource_id": func(e *flow.Event) []byte { return []byte(e.SrcResourceID) },
	"dst_resource_id": func(e *flow.Event) []byte { return []byte(e.DstResourceID) },
	"source":          func(e *flow.Event) []byte { return []byte(e.Source) },
	"none":            func(*flow.Event) []byte { return nil },
}

var codecs = map[string]kgo.CompressionCodec{
	"zstd": kgo.ZstdCompression(), "lz4": kgo.Lz4Compression(), "snappy": kgo.SnappyCompression(),
	"gzip": kgo.GzipCompression(), "none": kgo.NoCompression(),
}

// Validate checks the options together.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	c.Config.Validate(&errs)
	if c.Topic == "" {
		errs.Add("topic", "must not be empty")
	}
	if !logcodec.Format(c.Format).Valid() {
		errs.Add("format", "%q: want packed, json or protobuf", c.Format)
	}
	if _, ok := keys[c.Key]; !ok {
		errs.Add("key", "%q: want flow_id, event_id, src_resource_id, dst_resource_id, source or none", c.Key)
	}
	if _, ok := codecs[c.Compression]; !ok {
		errs.Add("compression", "%q: want zstd, lz4, snappy, gzip or none", c.Compression)
	}
	if c.ProduceTimeout < time.Second {
		errs.Add("produce_timeout", "must be at least 1s")
	}
	if c.Linger < 0 {
		errs.Add("linger", "must not be negative")
	}
	return errs.Err()
}

// Factory builds `type: kafka` sinks.
func Factory() component.Factory {
	f := component.NewSinkFactory("kafka", "produce events to a Kafka topic (idempotent, acks=all), keyed by flow ID",
		defaultConfig, func(env component.Env, c *Config) (component.Sink, error) { return New(env, c) })
	f.InFlight = 4
	return f
}

// Sink is the Kafka sink. Write may be called concurrently.
type Sink struct {
	cfg    *Config
	env    component.Env
	log    *slog.Logger
	format logcodec.Format
	key    func(*flow.Event) []byte

	mu       sync.Mutex
	cl       *kgo.Client
	startErr error
}

// New builds a sink; it connects in Start.
func New(env component.Env, c *Config) (*Sink, error) {
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	return &Sink{cfg: c, env: env, log: env.Logger, format: logcodec.Format(c.Format), key: keys[c.Key]}, nil
}

// Start connects and checks that the topic exists.
func (s *Sink) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cl != nil {
		return nil
	}
	opts, err := s.cfg.Opts(s.env)
	if err != nil {
		s.startErr = err
		return err
	}
	opts = append(opts,
		kgo.DefaultProduceTopic(s.cfg.Topic),
		kgo.RequiredAcks(kgo.AllISRAcks()), // with the idempotent producer, franz-go's default
		kgo.ProducerBatchCompression(codecs[s.cfg.Compression]),
		kgo.ProducerLinger(s.cfg.Linger),
		kgo.RecordDeliveryTimeout(s.cfg.ProduceTimeout),
		kgo.ProduceRequestTimeout(s.cfg.ProduceTimeout),
	)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		s.startErr = fmt.Errorf("kafka client: %w", err)
		return s.startErr
	}
	cctx, cancel := context.WithTimeout(ctx, 2*s.cfg.DialTimeout)
	defer cancel()
	if err := kafkaconn.CheckTopics(cctx, cl, s.cfg.Brokers, s.cfg.Topic); err != nil {
		cl.Close()
		s.startErr = err
		return err
	}
	s.cl = cl
	s.log.Info("producing to Kafka", "brokers", s.cfg.Brokers, "topic", s.cfg.Topic, "format", s.cfg.Format, "key", s.cfg.Key, "compression", s.cfg.Compression)
	return nil
}

// Write produces one record per event and returns nil once every one is acknowledged by all
// in-sync replicas. On an error the runtime writes the batch again; the idempotent producer
// drops its own retries, and a batch written again is de-duplicated by event ID by the kafka
// source (same key, same partition).
func (s *Sink) Write(ctx context.Context, b *flow.Batch) error {
	s.mu.Lock()
	cl := s.cl
	s.mu.Unlock()
	if cl == nil {
		return errors.New("kafka sink not started")
	}
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	ct := []kgo.RecordHeader{{Key: "content-type", Value: []byte(s.format.ContentType())}}
	for i := range b.Events {
		e := &b.Events[i]
		v, err := logcodec.Encode(s.format, b.Events[i:i+1])
		if err != nil {
			return flow.Permanent(err)
		}
		wg.Add(1)
		cl.Produce(ctx, &kgo.Record{Key: s.key(e), Value: v, Headers: ct}, func(_ *kgo.Record, err error) {
			if err != nil {
				once.Do(func() { first = fmt.Errorf("produce to %s: %w", s.cfg.Topic, err) })
			}
			wg.Done()
		})
	}
	wg.Wait()
	return first
}

// Health reports a failed start (component.HealthChecker, for /readyz); failed writes are
// reported by the runtime.
func (s *Sink) Health() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cl == nil {
		if s.startErr != nil {
			return s.startErr
		}
		return errors.New("not connected to Kafka")
	}
	return nil
}

// Close flushes what is buffered (within ctx) and closes the client.
func (s *Sink) Close(ctx context.Context) error {
	s.mu.Lock()
	cl := s.cl
	s.cl = nil
	s.mu.Unlock()
	if cl == nil {
		return nil
	}
	err := cl.Flush(ctx)
	cl.Close()
	return err
}
