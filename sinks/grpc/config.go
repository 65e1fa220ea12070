package grpcsink

import (
	"encoding/base64"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/config"
)

// Config is the options of a `type: grpc` sink.
type Config struct {
	// URL of the collector: http://host:port (plain text) or https://host:port (TLS).
	URL string `yaml:"url"`
	// URLs lists several collectors instead (all http:// or all https://): the sink keeps
	// its stream on one of them, chosen at random, and moves to another when it fails.
	URLs       []string `yaml:"urls"`
	CAFile     string   `yaml:"ca_file"`     // PEM roots to trust instead of the system's
	CertFile   string   `yaml:"cert_file"`   // client certificate for mTLS
	KeyFile    string   `yaml:"key_file"`    // its key
	ServerName string   `yaml:"server_name"` // TLS name to verify, when not the URL's host

	// Protocol is the stream's protocol: "flowpipe" (a batch per message in the packed codec,
	// an ACK per batch: flowpipe.stream.v1.Collector/Stream), "netbird" (NetBird's
	// flow.FlowService/Events, an event per message and an ACK per event), or "auto" (the
	// default): flowpipe's, and NetBird's on a collector that answers UNIMPLEMENTED.
	Protocol string `yaml:"protocol"`
	// MaxBatchMessageSize bounds one message of flowpipe's stream: larger runs of events are
	// split. Keep it at most the collector's max_batch_message_size.
	MaxBatchMessageSize config.ByteSize `yaml:"max_batch_message_size"`

	// Token is a credential given by a management server, sent as is.
	Token *TokenConfig `yaml:"token"`
	// HMACSecret makes the sink mint its own tokens, valid for TokenTTL and renewed before
	// they expire; the collector must list the same secret.
	HMACSecret string        `yaml:"hmac_secret"`
	TokenTTL   time.Duration `yaml:"token_ttl"`

	// PublicKey identifies this peer in every event (the public_key field).
	PublicKey string `yaml:"public_key"`

	MaxInFlight      int             `yaml:"max_in_flight"`  // unacknowledged events at most
	AckTimeout       time.Duration   `yaml:"ack_timeout"`    // resend an event not ACKed within this
	KeepaliveTime    time.Duration   `yaml:"keepalive_time"` // ping an idle connection this often
	KeepaliveTimeout time.Duration   `yaml:"keepalive_timeout"`
	ReconnectMin     time.Duration   `yaml:"reconnect_min"`    // first reconnect delay, doubled per failure
	ReconnectMax     time.Duration   `yaml:"reconnect_max"`    // with jitter, up to this
	MaxMessageSize   config.ByteSize `yaml:"max_message_size"` // largest ACK accepted
}

// TokenConfig is a token as a NetBird management server hands it out.
type TokenConfig struct {
	Payload   string `yaml:"payload" required:"true"`
	Signature string `yaml:"signature" required:"true"`
}

func defaultConfig() *Config {
	return &Config{
		Protocol:            "auto",
		MaxBatchMessageSize: 1 << 20,
		TokenTTL:            time.Hour,
		MaxInFlight:         20000,
		AckTimeout:          30 * time.Second,
		KeepaliveTime:       30 * time.Second,
		KeepaliveTimeout:    10 * time.Second,
		ReconnectMin:        200 * time.Millisecond,
		ReconnectMax:        30 * time.Second,
		MaxMessageSize:      1 << 20,
	}
}

// Validate checks the options together; decoding has checked each alone.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	switch {
	case c.URL == "" && len(c.URLs) == 0:
		errs.Add("url", "set url (one collector) or urls (several)")
	case c.URL != "" && len(c.URLs) > 0:
		errs.Add("urls", "set url or urls, not both")
	}
	for i, u := range c.URLs {
		p, err := url.Parse(u)
		switch {
		case err != nil || p.Host == "" || (p.Scheme != "http" && p.Scheme != "https"):
			errs.Add(config.Join("urls", "["+strconv.Itoa(i)+"]"), "%q: want http://host:port or https://host:port", u)
		case i > 0 && !strings.HasPrefix(u, strings.SplitN(c.URLs[0], ":", 2)[0]+":"):
			errs.Add(config.Join("urls", "["+strconv.Itoa(i)+"]"), "%q: every URL must have the scheme of the first", u)
		}
	}
	if c.URL == "" {
		// urls, checked above
	} else if u, err := url.Parse(c.URL); err != nil {
		errs.Add("url", "not a URL: %v", err)
	} else if u.Scheme != "http" && u.Scheme != "https" {
		errs.Add("url", "scheme %q: want http:// (plain text) or https:// (TLS)", u.Scheme)
	} else if u.Host == "" {
		errs.Add("url", "no host in %q (want http://host:port or https://host:port)", c.URL)
	} else if u.Scheme == "http" && (c.CAFile != "" || c.CertFile != "" || c.ServerName != "") {
		errs.Add("url", "ca_file, cert_file and server_name need an https:// URL")
	}
	if len(c.URLs) > 0 && strings.HasPrefix(c.URLs[0], "http:") && (c.CAFile != "" || c.CertFile != "" || c.ServerName != "") {
		errs.Add("urls", "ca_file, cert_file and server_name need https:// URLs")
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		errs.Add("cert_file", "cert_file and key_file go together")
	}
	if c.Token != nil && c.HMACSecret != "" {
		errs.Add("token", "set either token or hmac_secret, not both")
	}
	if c.HMACSecret != "" && c.TokenTTL < 10*time.Second {
		errs.Add("token_ttl", "%s is too short to renew in time (at least 10s)", c.TokenTTL)
	}
	switch c.Protocol {
	case "auto", "flowpipe", "netbird":
	default:
		errs.Add("protocol", "%q: want auto (flowpipe's batch stream, NetBird's where the collector has no other), flowpipe or netbird", c.Protocol)
	}
	if c.MaxBatchMessageSize < 1024 {
		errs.Add("max_batch_message_size", "must be at least 1KiB")
	}
	if c.MaxInFlight < 1 {
		errs.Add("max_in_flight", "must be at least 1")
	}
	for path, d := range map[string]time.Duration{"ack_timeout": c.AckTimeout, "keepalive_time": c.KeepaliveTime,
		"keepalive_timeout": c.KeepaliveTimeout, "reconnect_min": c.ReconnectMin, "reconnect_max": c.ReconnectMax} {
		if d <= 0 {
			errs.Add(path, "must be positive")
		}
	}
	if c.ReconnectMax < c.ReconnectMin {
		errs.Add("reconnect_max", "%s is below reconnect_min %s", c.ReconnectMax, c.ReconnectMin)
	}
	if c.MaxMessageSize < 64 {
		errs.Add("max_message_size", "must be at least 64 bytes")
	}
	return errs.Err()
}

// target is the host:port to dial, with the default port of the scheme when none is given.
func (c *Config) target() (addr string, tls bool) {
	u, _ := url.Parse(c.URL)
	tls = u.Scheme == "https"
	port := u.Port()
	if port == "" {
		port = "80"
		if tls {
			port = "443"
		}
	}
	return net.JoinHostPort(u.Hostname(), port), tls
}

// publicKey is the public_key option as bytes: a WireGuard key is given in base64 and sent
// decoded; anything else is sent as its text.
func (c *Config) publicKey() []byte {
	if c.PublicKey == "" {
		return nil
	}
	if b, err := base64.StdEncoding.DecodeString(c.PublicKey); err == nil && len(b) == 32 {
		return b
	}
	return []byte(c.PublicKey)
}
