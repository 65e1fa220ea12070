package jetstream

import (
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/logcodec"
	"github.com/flowpipe/flowpipe/internal/natsconn"
)

// Config is the options of a `type: jetstream` sink.
type Config struct {
	natsconn.Config `yaml:",inline"`

	Stream string `yaml:"stream" required:"true"` // the stream the subject belongs to
	// Subject to publish to: fixed ("flows.collected"), or with placeholders filled from each
	// event ("flows.{src_resource_id}"): {source}, {src_resource_id}, {dst_resource_id},
	// {rule_id}, {type}. An empty field becomes "none"; characters a subject token cannot
	// hold ('.', '*', '>', spaces) become '_'.
	Subject string `yaml:"subject"`
	Format  string `yaml:"format"` // packed, json or protobuf

	MaxMessageSize config.ByteSize `yaml:"max_message_size"` // per message; at most the server's max_payload
	// MaxPending is the asynchronous publishing window: messages sent and not yet
	// acknowledged by JetStream, over every write in flight.
	MaxPending int           `yaml:"max_pending"`
	AckTimeout time.Duration `yaml:"ack_timeout"` // a publish not acknowledged within this fails the write (retried)

	// CreateStream, when set, creates the stream at start if it does not exist.
	CreateStream *StreamConfig `yaml:"create_stream"`
}

// StreamConfig is the stream created when it does not exist.
type StreamConfig struct {
	Subjects        []string        `yaml:"subjects"`  // default: the subject, placeholders as *
	Replicas        int             `yaml:"replicas"`  // 1, 3 or 5 in a cluster
	Retention       string          `yaml:"retention"` // limits, interest or workqueue
	MaxAge          time.Duration   `yaml:"max_age"`   // 0: keep by size only
	MaxBytes        config.ByteSize `yaml:"max_bytes"` // 0: unlimited
	Storage         string          `yaml:"storage"`   // file or memory
	DuplicateWindow time.Duration   `yaml:"duplicate_window"`
}

func defaultConfig() *Config {
	return &Config{
		Config:         natsconn.Defaults(),
		Subject:        "flows",
		Format:         string(logcodec.Packed),
		MaxMessageSize: 1 << 20,
		MaxPending:     256,
		AckTimeout:     10 * time.Second,
	}
}

var placeholder = regexp.MustCompile(`\{([a-z_]*)\}`)

// fields are the event fields a subject can be derived from.
var fields = map[string]func(*flow.Event) string{
	"source":          func(e *flow.Event) string { return e.Source },
	"src_resource_id": func(e *flow.Event) string { return e.SrcResourceID },
	"dst_resource_id": func(e *flow.Event) string { return e.DstResourceID },
	"rule_id":         func(e *flow.Event) string { return e.RuleID },
	"type":            func(e *flow.Event) string { return e.Type.String() },
}

// Validate checks the options together.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	c.Config.Validate(&errs)
	if strings.TrimSpace(c.Stream) == "" || strings.ContainsAny(c.Stream, ". *>") {
		errs.Add("stream", "%q: a stream name, without spaces, '.', '*' or '>'", c.Stream)
	}
	if c.Subject == "" || strings.ContainsAny(c.Subject, " \t*>") || strings.HasPrefix(c.Subject, ".") || strings.HasSuffix(c.Subject, ".") || strings.Contains(c.Subject, "..") {
		errs.Add("subject", "%q: a subject such as flows.collected, without wildcards", c.Subject)
	}
	for _, m := range placeholder.FindAllStringSubmatch(c.Subject, -1) {
		if _, ok := fields[m[1]]; !ok {
			errs.Add("subject", "unknown placeholder {%s}: use {source}, {src_resource_id}, {dst_resource_id}, {rule_id} or {type}", m[1])
		}
	}
	if !logcodec.Format(c.Format).Valid() {
		errs.Add("format", "%q: want packed, json or protobuf", c.Format)
	}
	if c.MaxMessageSize < 4<<10 {
		errs.Add("max_message_size", "must be at least 4KiB")
	}
	if c.MaxPending < 1 {
		errs.Add("max_pending", "must be at least 1")
	}
	if c.AckTimeout <= 0 {
		errs.Add("ack_timeout", "must be positive")
	}
	if s := c.CreateStream; s != nil {
		if s.Replicas == 0 {
			s.Replicas = 1
		}
		if s.Replicas < 1 || s.Replicas > 5 {
			errs.Add("create_stream.replicas", "%d: want 1 to 5 (3 survives the loss of a node)", s.Replicas)
		}
		switch s.Retention {
		case "":
			s.Retention = "limits"
		case "limits", "interest", "workqueue":
		default:
			errs.Add("create_stream.retention", "%q: want limits, interest or workqueue", s.Retention)
		}
		switch s.Storage {
		case "":
			s.Storage = "file"
		case "file", "memory":
		default:
			errs.Add("create_stream.storage", "%q: want file or memory", s.Storage)
		}
		if s.MaxAge < 0 || s.DuplicateWindow < 0 || s.MaxBytes < 0 {
			errs.Add("create_stream", "max_age, max_bytes and duplicate_window must not be negative")
		}
		if s.DuplicateWindow == 0 {
			s.DuplicateWindow = 2 * time.Minute
		}
		if s.MaxAge > 0 && s.DuplicateWindow > s.MaxAge {
			errs.Add("create_stream.duplicate_window", "%s is longer than max_age %s", s.DuplicateWindow, s.MaxAge)
		}
		if len(s.Subjects) == 0 {
			s.Subjects = []string{placeholder.ReplaceAllString(c.Subject, "*")}
		}
	}
	return errs.Err()
}

// subjectToken makes v usable as one token of a subject.
func subjectToken(v string) string {
	if v == "" {
		return "none"
	}
	return strings.Map(func(r rune) rune {
		switch r {
		case '.', '*', '>', ' ', '\t', '\r', '\n':
			return '_'
		}
		return r
	}, v)
}

// subjectMatches reports whether subject is matched by the pattern (NATS wildcards * and >).
func subjectMatches(pattern, subject string) bool {
	p, s := strings.Split(pattern, "."), strings.Split(subject, ".")
	for i, tok := range p {
		if tok == ">" {
			return len(s) > i
		}
		if i >= len(s) || (tok != "*" && tok != s[i]) {
			return false
		}
	}
	return len(p) == len(s)
}

func (c *Config) String() string { return fmt.Sprintf("stream %s subject %s", c.Stream, c.Subject) }
