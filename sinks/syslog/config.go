package syslog

import (
	"os"
	"strconv"
	"strings"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/schema"
	"github.com/flowpipe/flowpipe/internal/netout"
)

// Config is the options of a `type: syslog` sink.
type Config struct {
	// Address of the syslog server, transport (tcp, the default, with RFC 6587 octet
	// counting; tls, RFC 5425; or udp, RFC 5426), TLS files and timeouts.
	netout.Options `yaml:",inline"`
	// Facility is a name (kern, user, daemon, auth, local0 … local7, …) or a number 0-23.
	Facility string `yaml:"facility"`
	// Severity of every message: a name (emerg … debug) or a number 0-7.
	Severity string `yaml:"severity"`
	// AppName, Hostname: the APP-NAME and HOSTNAME header fields (Hostname defaults to the
	// host's name).
	AppName  string `yaml:"app_name"`
	Hostname string `yaml:"hostname"`
	// Body is structured_data (the event as one SD element, a short text as MSG) or json (no
	// SD; the event as a JSON object in the schema of format).
	Body string `yaml:"body"`
	// Format is the JSON schema of a json body: flowpipe, ecs or ocsf.
	Format string `yaml:"format"`
	// SDID is the SD-ID of the structured-data element: name@private-enterprise-number.
	SDID string `yaml:"sd_id"`
}

func defaults() *Config {
	host, _ := os.Hostname()
	return &Config{Options: netout.DefaultOptions("tcp"), Facility: "local0", Severity: "info", AppName: "flowpipe", Hostname: host,
		Body: "structured_data", Format: "flowpipe", SDID: "flow@32473"}
}

var facilities = []string{"kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp",
	"ntp", "security", "console", "solaris-cron", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7"}

var severities = []string{"emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"}

// code reads a name from names or a number below len(names).
func code(s string, names []string) (int, bool) {
	for i, n := range names {
		if n == s {
			return i, true
		}
	}
	n, err := strconv.Atoi(s)
	return n, err == nil && n >= 0 && n < len(names)
}

// Validate checks the options.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	c.Options.Check(&errs, "tcp", "tls", "udp")
	if _, ok := code(c.Facility, facilities); !ok {
		errs.Add("facility", "unknown facility %q (want a name such as daemon or local0, or 0-23)", c.Facility)
	}
	if _, ok := code(c.Severity, severities); !ok {
		errs.Add("severity", "unknown severity %q (want emerg, alert, crit, err, warning, notice, info, debug or 0-7)", c.Severity)
	}
	if !printableASCII(c.AppName, 48) {
		errs.Add("app_name", "want 1 to 48 printable ASCII characters without spaces (RFC 5424), got %q", c.AppName)
	}
	if c.Hostname != "" && !printableASCII(c.Hostname, 255) {
		errs.Add("hostname", "want up to 255 printable ASCII characters without spaces (RFC 5424), got %q", c.Hostname)
	}
	switch c.Body {
	case "structured_data", "json":
	default:
		errs.Add("body", "unknown body %q (want structured_data or json)", c.Body)
	}
	if _, ok := schema.Parse(c.Format); !ok {
		errs.Add("format", "unknown format %q (want %s)", c.Format, schema.Choices)
	} else if c.Body != "json" && c.Format != "flowpipe" && c.Format != "" {
		errs.Add("format", "format %s needs body: json (structured data carries flowpipe's fields)", c.Format)
	}
	if name, pen, ok := strings.Cut(c.SDID, "@"); !ok || !printableASCII(c.SDID, 32) || strings.ContainsAny(c.SDID, `="]`) || name == "" || !digits(pen) {
		errs.Add("sd_id", "want name@private-enterprise-number, at most 32 characters (RFC 5424), got %q", c.SDID)
	}
	return errs.Err()
}

// printableASCII is RFC 5424's PRINTUSASCII (33-126), 1 to max characters.
func printableASCII(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 33 || s[i] > 126 {
			return false
		}
	}
	return true
}

func digits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
