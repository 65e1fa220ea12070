package grpcsource

import (
	"net"
	"strconv"
	"time"

	"github.com/flowpipe/flowpipe/core/config"
)

// Config is the options of a `type: grpc` source, the collector side of the flow protocols
// (NetBird's flow.FlowService/Events and flowpipe's batch stream, on one listener).
type Config struct {
	Listen string `yaml:"listen" required:"true"` // host:port

	CertFile     string `yaml:"cert_file"`      // serve TLS with this certificate
	KeyFile      string `yaml:"key_file"`       // and key
	ClientCAFile string `yaml:"client_ca_file"` // require client certificates signed by these (mTLS)

	// Auth is "hmac" (tokens signed with one of Secrets) or "none"; there is no default, so
	// that an open collector is a decision, not an accident.
	Auth    string   `yaml:"auth" required:"true"`
	Secrets []string `yaml:"secrets"`

	MaxStreams     int             `yaml:"max_streams"`      // concurrent client streams
	MaxMessageSize config.ByteSize `yaml:"max_message_size"` // one FlowEvent
	// MaxBatchMessageSize bounds one message of flowpipe's batch stream (a whole batch of
	// events in the packed codec); a larger one ends its stream with RESOURCE_EXHAUSTED.
	MaxBatchMessageSize config.ByteSize `yaml:"max_batch_message_size"`
	MaxUnackedPerStrm   int             `yaml:"max_unacked_per_stream"` // stop reading a stream beyond this
	// InitiatorTimeout closes a stream whose client has not sent its initiator message
	// within it, so that connections that say nothing do not hold max_streams slots.
	InitiatorTimeout time.Duration `yaml:"initiator_timeout"`
	// IdleTimeout closes a stream that received nothing and has nothing waiting for an ACK
	// for this long (0: never); a client with events reconnects.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// MaxTokenLifetime refuses tokens that expire further ahead than this (0: no limit).
	MaxTokenLifetime time.Duration `yaml:"max_token_lifetime"`

	BatchSize  int           `yaml:"batch_size"`  // events per emitted batch, at most
	BatchDelay time.Duration `yaml:"batch_delay"` // emit a partial batch after this

	Dedup DedupConfig `yaml:"dedup"`

	KeepaliveTime    time.Duration `yaml:"keepalive_time"`     // ping idle clients this often
	KeepaliveTimeout time.Duration `yaml:"keepalive_timeout"`  // and drop them after this
	KeepaliveMinTime time.Duration `yaml:"keepalive_min_time"` // refuse client pings more frequent
}

// DedupConfig is the event-ID de-duplication window.
type DedupConfig struct {
	Window    time.Duration `yaml:"window"`     // remember delivered IDs this long
	MaxEvents int           `yaml:"max_events"` // and at most this many
	// StateFile keeps delivered IDs across restarts, so a client's resend after a collector
	// crash is still recognised. Empty: in memory only.
	StateFile string `yaml:"state_file"`
}

func defaultConfig() *Config {
	return &Config{
		MaxStreams:          10000,
		MaxMessageSize:      64 << 10,
		MaxBatchMessageSize: 4 << 20,
		MaxUnackedPerStrm:   20000,
		InitiatorTimeout:    10 * time.Second,
		IdleTimeout:         15 * time.Minute,
		MaxTokenLifetime:    7 * 24 * time.Hour,
		BatchSize:           2000,
		BatchDelay:          5 * time.Millisecond,
		Dedup:               DedupConfig{Window: 10 * time.Minute, MaxEvents: 1_000_000},
		KeepaliveTime:       30 * time.Second,
		KeepaliveTimeout:    10 * time.Second,
		KeepaliveMinTime:    5 * time.Second,
	}
}

// Validate checks the options together.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs.Add("listen", "%q: want host:port (\":7000\" for every address): %v", c.Listen, err)
	}
	switch c.Auth {
	case "hmac":
		if len(c.Secrets) == 0 {
			errs.Add("secrets", "auth: hmac needs at least one secret")
		}
		for i, s := range c.Secrets {
			if len(s) < 16 {
				errs.Add(config.Join("secrets", "["+strconv.Itoa(i)+"]"), "secret is %d bytes; use at least 16", len(s))
			}
		}
	case "none":
		if len(c.Secrets) > 0 {
			errs.Add("secrets", "secrets are only used with auth: hmac")
		}
	default:
		errs.Add("auth", "%q: want hmac (tokens signed with secrets) or none (explicitly open)", c.Auth)
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		errs.Add("cert_file", "cert_file and key_file go together")
	}
	if c.ClientCAFile != "" && c.CertFile == "" {
		errs.Add("client_ca_file", "mTLS needs TLS: set cert_file and key_file too")
	}
	if c.MaxStreams < 1 {
		errs.Add("max_streams", "must be at least 1")
	}
	if c.MaxMessageSize < 256 {
		errs.Add("max_message_size", "must be at least 256 bytes")
	}
	if c.MaxBatchMessageSize < 1024 {
		errs.Add("max_batch_message_size", "must be at least 1KiB")
	}
	if c.MaxUnackedPerStrm < 1 {
		errs.Add("max_unacked_per_stream", "must be at least 1")
	}
	if c.InitiatorTimeout <= 0 {
		errs.Add("initiator_timeout", "must be positive")
	}
	if c.IdleTimeout < 0 {
		errs.Add("idle_timeout", "must not be negative (0 never closes an idle stream)")
	}
	if c.MaxTokenLifetime < 0 {
		errs.Add("max_token_lifetime", "must not be negative (0 accepts any expiry)")
	}
	if c.BatchSize < 1 {
		errs.Add("batch_size", "must be at least 1")
	}
	if c.BatchDelay <= 0 {
		errs.Add("batch_delay", "must be positive")
	}
	if c.Dedup.Window < 0 {
		errs.Add("dedup.window", "must not be negative (0 turns de-duplication off)")
	}
	if c.Dedup.MaxEvents < 0 {
		errs.Add("dedup.max_events", "must not be negative")
	}
	for path, d := range map[string]time.Duration{"keepalive_time": c.KeepaliveTime, "keepalive_timeout": c.KeepaliveTimeout, "keepalive_min_time": c.KeepaliveMinTime} {
		if d <= 0 {
			errs.Add(path, "must be positive")
		}
	}
	return errs.Err()
}

// Capabilities: listening on a port below 1024 needs CAP_NET_BIND_SERVICE.
func (c *Config) Capabilities() []string {
	if _, port, err := net.SplitHostPort(c.Listen); err == nil {
		if n, err := strconv.Atoi(port); err == nil && n > 0 && n < 1024 {
			return []string{"CAP_NET_BIND_SERVICE"}
		}
	}
	return nil
}
