package ipfix

import (
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/netout"
)

// Config is the options of a `type: ipfix` sink.
type Config struct {
	// Address, transport (udp, the default, tcp or tls), TLS files and timeouts.
	netout.Options `yaml:",inline"`
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
}

func defaults() *Config {
	return &Config{Options: netout.DefaultOptions("udp"), MTU: 1500, TemplateRefresh: time.Minute, Events: "end,aggregate"}
}

// Validate checks the options.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	c.Options.Check(&errs, "udp", "tcp", "tls")
	if c.MTU < 576 || c.MTU > 65535 {
		errs.Add("mtu", "%d is out of range (576 to 65535)", c.MTU)
	}
	if c.TemplateRefresh <= 0 {
		errs.Add("template_refresh", "must be positive")
	}
	if _, err := parseEvents(c.Events); err != "" {
		errs.Add("events", "%s", err)
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
