package pluginserver

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

// A plugin's log line carries its attributes in order, each as slog's text handler would
// show it, under pb.LogAttrsKey; go-plugin reads the rest as hclog JSON.
func TestLogLineKeepsOrderAndTextForms(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(newHCLogHandler(&buf, slog.LevelDebug)).With("b", 1)
	at := time.Date(2026, 12, 1, 10, 0, 0, 123456789, time.UTC)
	log.WithGroup("g").Warn("hello", "z", 1500*time.Millisecond, "a", netip.MustParseAddr("192.0.2.1"), "t", at,
		"err", errors.New("boom"), slog.Group("sub", "x", true))
	var line map[string]any
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatalf("%v: %s", err, buf.Bytes())
	}
	if line["@level"] != "warn" || line["@message"] != "hello" || line["@timestamp"] == nil {
		t.Fatalf("not an hclog line: %s", buf.Bytes())
	}
	want := []any{"b", 1.0, "g.z", "1.5s", "g.a", "192.0.2.1", "g.t", "2026-12-01T10:00:00.123Z", "g.err", "boom", "g.sub.x", true}
	if got := line["@attrs"]; !reflect.DeepEqual(got, want) {
		t.Fatalf("attributes %#v\nwant %#v", got, want)
	}
}
