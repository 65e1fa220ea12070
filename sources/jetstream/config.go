package jetstream

import (
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/internal/dedup"
	"github.com/flowpipe/flowpipe/internal/logcodec"
	"github.com/flowpipe/flowpipe/internal/natsconn"
)

// Config is the options of a `type: jetstream` source.
type Config struct {
	natsconn.Config `yaml:",inline"`

	Stream string `yaml:"stream" required:"true"`
	// Durable names the pull consumer. Writers that name the same consumer share its
	// messages (each message goes to one of them).
	Durable       string `yaml:"durable" required:"true"`
	FilterSubject string `yaml:"filter_subject"` // only messages of this subject (wildcards allowed)
	// Format of messages that carry no Content-Type header; a header, when present, decides.
	Format string `yaml:"format"`

	BatchSize  int           `yaml:"batch_size"`  // events per emitted batch, at least (whole messages)
	BatchDelay time.Duration `yaml:"batch_delay"` // emit a partial batch after this

	AckWait       time.Duration `yaml:"ack_wait"`        // JetStream redelivers a message not acknowledged within this
	MaxAckPending int           `yaml:"max_ack_pending"` // messages delivered and not acknowledged, per consumer
	Fetch         int           `yaml:"fetch"`           // messages pulled ahead per request
	NakDelay      time.Duration `yaml:"nak_delay"`       // redelivery delay after a failed batch, doubled per attempt
	NakMaxDelay   time.Duration `yaml:"nak_max_delay"`

	Dedup dedup.Config `yaml:"dedup"`
}

func defaultConfig() *Config {
	return &Config{
		Config:        natsconn.Defaults(),
		Format:        string(logcodec.Packed),
		BatchSize:     4000,
		BatchDelay:    5 * time.Millisecond,
		AckWait:       30 * time.Second,
		MaxAckPending: 1000,
		Fetch:         64,
		NakDelay:      time.Second,
		NakMaxDelay:   30 * time.Second,
		Dedup:         dedup.DefaultConfig(),
	}
}

// Validate checks the options together.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	c.Config.Validate(&errs)
	if strings.TrimSpace(c.Stream) == "" || strings.ContainsAny(c.Stream, ". *>") {
		errs.Add("stream", "%q: a stream name, without spaces, '.', '*' or '>'", c.Stream)
	}
	if strings.TrimSpace(c.Durable) == "" || strings.ContainsAny(c.Durable, ". *>") {
		errs.Add("durable", "%q: a consumer name, without spaces, '.', '*' or '>'", c.Durable)
	}
	if !logcodec.Format(c.Format).Valid() {
		errs.Add("format", "%q: want packed, json or protobuf", c.Format)
	}
	if c.BatchSize < 1 {
		errs.Add("batch_size", "must be at least 1")
	}
	if c.BatchDelay <= 0 {
		errs.Add("batch_delay", "must be positive")
	}
	if c.AckWait < time.Second {
		errs.Add("ack_wait", "must be at least 1s")
	}
	if c.MaxAckPending < 1 {
		errs.Add("max_ack_pending", "must be at least 1")
	}
	if c.Fetch < 1 {
		errs.Add("fetch", "must be at least 1")
	}
	if c.NakDelay <= 0 || c.NakMaxDelay < c.NakDelay {
		errs.Add("nak_delay", "nak_delay must be positive and at most nak_max_delay")
	}
	c.Dedup.Check(&errs, "dedup")
	return errs.Err()
}
