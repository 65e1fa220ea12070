// Package kafkaconn is what the Kafka sink and source share: the options that say how to
// reach and authenticate to Kafka brokers (SASL PLAIN or SCRAM, TLS, mTLS), as franz-go
// client options. Nothing here is specific to one broker: the same options work against
// Apache Kafka, Redpanda and franz-go's kfake (which the tests use, no broker being
// installable on the test machines).
package kafkaconn

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/internal/tlsfiles"
)

// Config is how to reach the brokers. Inlined into the sink's and the source's options.
type Config struct {
	Brokers []string `yaml:"brokers" required:"true"` // host:port of one or more seed brokers

	SASL *SASLConfig `yaml:"sasl"`

	TLS        bool   `yaml:"tls"`         // connect with TLS (implied by ca_file or cert_file)
	CAFile     string `yaml:"ca_file"`     // PEM roots to trust
	CertFile   string `yaml:"cert_file"`   // client certificate for mTLS
	KeyFile    string `yaml:"key_file"`    // its key
	ServerName string `yaml:"server_name"` // TLS name to verify, when not the broker's host

	DialTimeout time.Duration `yaml:"dial_timeout"`
}

// SASLConfig is SASL authentication.
type SASLConfig struct {
	Mechanism string `yaml:"mechanism" required:"true"` // PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
	User      string `yaml:"user" required:"true"`
	Password  string `yaml:"password" required:"true"`
}

// Defaults fills the timeouts.
func Defaults() Config { return Config{DialTimeout: 5 * time.Second} }

// Validate adds the problems of c to errs.
func (c *Config) Validate(errs *config.FieldErrors) {
	if len(c.Brokers) == 0 {
		errs.Add("brokers", "list at least one broker, e.g. [kafka-1:9092]")
	}
	for i, b := range c.Brokers {
		if _, _, err := net.SplitHostPort(b); err != nil {
			errs.Add(fmt.Sprintf("brokers[%d]", i), "%q: want host:port", b)
		}
	}
	if s := c.SASL; s != nil {
		switch strings.ToUpper(s.Mechanism) {
		case "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512":
		default:
			errs.Add("sasl.mechanism", "%q: want PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", s.Mechanism)
		}
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		errs.Add("cert_file", "cert_file and key_file go together")
	}
	if c.DialTimeout <= 0 {
		errs.Add("dial_timeout", "must be positive")
	}
}

// Opts are the franz-go client options for c.
func (c *Config) Opts(env component.Env) ([]kgo.Opt, error) {
	opts := []kgo.Opt{kgo.SeedBrokers(c.Brokers...), kgo.DialTimeout(c.DialTimeout),
		kgo.ClientID("flowpipe-" + env.Name)}
	if s := c.SASL; s != nil {
		switch strings.ToUpper(s.Mechanism) {
		case "PLAIN":
			opts = append(opts, kgo.SASL(plain.Auth{User: s.User, Pass: s.Password}.AsMechanism()))
		case "SCRAM-SHA-256":
			opts = append(opts, kgo.SASL(scram.Auth{User: s.User, Pass: s.Password}.AsSha256Mechanism()))
		case "SCRAM-SHA-512":
			opts = append(opts, kgo.SASL(scram.Auth{User: s.User, Pass: s.Password}.AsSha512Mechanism()))
		}
	}
	if c.TLS || c.CAFile != "" || c.CertFile != "" {
		tc, err := tlsfiles.Client(env.Path(c.CAFile), env.Path(c.CertFile), env.Path(c.KeyFile), c.ServerName)
		if err != nil {
			return nil, err
		}
		opts = append(opts, kgo.DialTLSConfig(tc))
	}
	return opts, nil
}

// CheckTopics asks the brokers for the topics' metadata: an unreachable cluster, refused
// credentials or a missing topic is an error naming it.
func CheckTopics(ctx context.Context, cl *kgo.Client, brokers []string, topics ...string) error {
	req := kmsg.NewPtrMetadataRequest()
	for _, t := range topics {
		rt := kmsg.NewMetadataRequestTopic()
		rt.Topic = kmsg.StringPtr(t)
		req.Topics = append(req.Topics, rt)
	}
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		hint := " (are the brokers running and reachable from here?)"
		if errors.Is(err, context.DeadlineExceeded) {
			hint = " (no answer: are the brokers reachable, and do they accept the credentials and TLS settings?)"
		}
		if errors.Is(err, kerr.SaslAuthenticationFailed) || strings.Contains(strings.ToLower(err.Error()), "sasl") {
			hint = " (the brokers refused the credentials: check sasl.user, sasl.password and sasl.mechanism)"
		}
		return fmt.Errorf("Kafka brokers %s: %w%s", strings.Join(brokers, ","), err, hint)
	}
	for _, t := range resp.Topics {
		if err := kerr.ErrorForCode(t.ErrorCode); err != nil {
			name := ""
			if t.Topic != nil {
				name = *t.Topic
			}
			if errors.Is(err, kerr.UnknownTopicOrPartition) {
				return fmt.Errorf("Kafka topic %q does not exist: create it (kafka-topics.sh --create --topic %s --replication-factor 3)", name, name)
			}
			return fmt.Errorf("Kafka topic %q: %w", name, err)
		}
	}
	return nil
}
