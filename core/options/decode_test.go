package options

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

type sub struct {
	Size    ByteSize `yaml:"size"`
	Enabled bool     `yaml:"enabled"`
}

type opts struct {
	Path     string         `yaml:"path" required:"true"`
	Count    int            `yaml:"count"`
	Port     uint16         `yaml:"port"`
	Timeout  time.Duration  `yaml:"timeout"`
	Prefixes []netip.Prefix `yaml:"prefixes"`
	Sub      sub            `yaml:"sub"`
	Labels   map[string]int `yaml:"labels"`
	Ratio    float64        `yaml:"ratio"`
}

func TestDecodeCollectsEveryProblem(t *testing.T) {
	raw := map[string]any{
		"count":    "many",
		"port":     70000,
		"timeout":  "soon",
		"prefixes": []any{"10.0.0.0/8", "10.0.0.0/33", "fd00::/8"},
		"sub":      map[string]any{"size": "-5MiB", "enabled": "yes", "colour": 1},
		"labels":   map[string]any{"a": 1, "b": "two"},
		"pathh":    "/tmp",
	}
	o := &opts{Count: 3}
	errs := Decode(raw, o, "")
	want := map[string]string{
		"count":       "want an integer, got string \"many\"",
		"port":        "out of range",
		"timeout":     "want a duration",
		"prefixes[1]": "invalid prefix",
		"sub.size":    "must not be negative",
		"sub.enabled": "want true or false",
		"sub.colour":  "unknown key",
		"labels.b":    "want an integer",
		"pathh":       `did you mean "path"`,
		"path":        "required",
	}
	got := map[string]string{}
	for _, e := range errs {
		got[e.Path] = e.Msg
	}
	for path, part := range want {
		if !strings.Contains(got[path], part) {
			t.Errorf("%s: got %q, want it to contain %q", path, got[path], part)
		}
	}
	if len(errs) != len(want) {
		t.Errorf("got %d problems, want %d: %v", len(errs), len(want), errs)
	}
}

func TestDecodeValuesAndDefaults(t *testing.T) {
	o := &opts{Count: 3, Ratio: 0.5}
	errs := Decode(map[string]any{
		"path": "/x", "port": 443, "timeout": "1m30s", "prefixes": []any{"fd00::/8"},
		"sub": map[string]any{"size": "64MiB", "enabled": true}, "labels": map[string]any{"a": 1},
	}, o, "")
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	if o.Count != 3 || o.Ratio != 0.5 || o.Port != 443 || o.Timeout != 90*time.Second ||
		o.Prefixes[0] != netip.MustParsePrefix("fd00::/8") || o.Sub.Size != 64<<20 || !o.Sub.Enabled || o.Labels["a"] != 1 {
		t.Errorf("decoded %+v", o)
	}
}
