package ipfix

import (
	"net"
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Config is the options of a `type: ipfix` sink.
type Config struct {
	// Address of the collector, host:port.
	Address string `yaml:"address" required:"true"`
	// Transport is udp (default), tcp or tls.
	Transport string `yaml:"transport"`
	// MTU is the largest IP packet a UDP message may fill (IP and UDP headers included).
	MTU int `yaml:"mtu"`
	// ObservationDomainID is sent in every message header.
	ObservationDomainID uint32 `yaml:"observation_domain_id"`
	// TemplateRefresh re-sends the templates over UDP this often (RFC 7011 section 8.4).
	TemplateRefresh time.Duration `yaml:"template_refresh"`
	// Events lists the event types exported, comma-separated: start, end, aggregate.
	Events string `yaml:"events"`
	// EnterpriseNumber, when not 0, adds the rule and resource IDs as enterprise-specific
	// string elements 1, 2 and 3 under this private enterprise number.
	EnterpriseNumber uint32 `yaml:"enterprise_number"`

	CAFile     string `yaml:"ca_file"`
	CertFile   string `yaml:"cert_file"`
	KeyFile    string `yaml:"key_file"`
	ServerName string `yaml:"server_name"`

	DialTimeout  time.Duration `yaml:"dial_timeout"`
	WriteTimeout time.Duration `yaml:"write_timeout"`
}

func defaults() *Config {
	return &Config{Transport: "udp", MTU: 1500, TemplateRefresh: time.Minute, Events: "end,aggregate",
		DialTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second}
}

// Validate checks the options.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	if _, port, err := net.SplitHostPort(c.Address); err != nil || port == "" {
		errs.Add("address", "want host:port, got %q", c.Address)
	}
	switch c.Transport {
	case "udp", "tcp", "tls":
	default:
		errs.Add("transport", "unknown transport %q (want udp, tcp or tls)", c.Transport)
	}
	if c.Transport != "tls" && (c.CAFile != "" || c.CertFile != "" || c.ServerName != "") {
		errs.Add("transport", "ca_file, cert_file and server_name need transport: tls")
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		errs.Add("cert_file", "cert_file and key_file go together")
	}
	if c.MTU < 576 || c.MTU > 65535 {
		errs.Add("mtu", "%d is out of range (576 to 65535)", c.MTU)
	}
	if c.TemplateRefresh <= 0 {
		errs.Add("template_refresh", "must be positive")
	}
	if _, err := parseEvents(c.Events); err != "" {
		errs.Add("events", "%s", err)
	}
	if c.DialTimeout <= 0 {
		errs.Add("dial_timeout", "must be positive")
	}
	if c.WriteTimeout <= 0 {
		errs.Add("write_timeout", "must be positive")
	}
	return errs.Err()
}

// parseEvents reads the events option into a set of types.
func parseEvents(s string) (set [8]bool, problem string) {
	n := 0
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		t, ok := flow.ParseType(part)
		if !ok || (t != flow.TypeStart && t != flow.TypeEnd && t != flow.TypeAggregate) {
			return set, "unknown event type " + `"` + part + `"` + " (want a list of start, end and aggregate, e.g. start,end)"
		}
		set[t] = true
		n++
	}
	if n == 0 {
		return set, "must list at least one of start, end and aggregate"
	}
	return set, ""
}
