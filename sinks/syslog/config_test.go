package syslog

import (
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	c := defaults()
	c.Address, c.Transport, c.Facility, c.Severity, c.AppName, c.Body, c.Format, c.SDID = "host", "quic", "local9", "loud", "flow pipe", "xml", "ecs", "flow"
	err := c.Validate()
	for _, want := range []string{`address: want host:port, got "host"`, `transport: unknown transport "quic"`, `facility: unknown facility "local9"`,
		`severity: unknown severity "loud"`, `app_name: want 1 to 48 printable ASCII`, `body: unknown body "xml"`, `sd_id: want name@private-enterprise-number`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not say %q", err, want)
		}
	}
	c = defaults()
	c.Address, c.Format = "h:514", "ocsf"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "format ocsf needs body: json") {
		t.Errorf("format without body: json: %v", err)
	}
	c.Body = "json"
	if err := c.Validate(); err != nil {
		t.Errorf("valid config: %v", err)
	}
	for _, f := range []string{"daemon", "3", "local7", "23"} {
		if _, ok := code(f, facilities); !ok {
			t.Errorf("facility %s rejected", f)
		}
	}
}
