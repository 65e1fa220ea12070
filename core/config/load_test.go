package config

import (
	"errors"
	"strings"
	"testing"
)

func load(t *testing.T, yaml string, env ...string) (*Document, Problems) {
	t.Helper()
	d, err := Load("pipeline.yaml", []byte(yaml), env)
	if err == nil {
		return d, nil
	}
	var ps Problems
	if !errors.As(err, &ps) {
		t.Fatalf("want Problems, got %T: %v", err, err)
	}
	return d, ps
}

func wantProblem(t *testing.T, ps Problems, where, path, msgPart string) {
	t.Helper()
	for _, p := range ps {
		if p.Where == where && p.Path == path && strings.Contains(p.Msg, msgPart) {
			return
		}
	}
	t.Errorf("no problem %s: %s: ...%s...; got:\n%v", where, path, msgPart, ps)
}

const valid = `
admin:
  listen: 127.0.0.1:0
sources:
  gen:
    type: generate
    rate: 10
enrichers:
  - type: resources
  - type: aggregate
    name: agg1
    window: 1m
sinks:
  local:
    type: file
    path: /tmp/x.jsonl
    queue:
      when_full: drop_oldest
`

func TestLoadValid(t *testing.T) {
	d, ps := load(t, valid)
	if ps != nil {
		t.Fatal(ps)
	}
	if d.Admin.Listen != "127.0.0.1:0" || d.Runtime.ShutdownTimeout != DefaultShutdownTimeout {
		t.Errorf("admin/runtime = %+v %+v", d.Admin, d.Runtime)
	}
	if len(d.Sources) != 1 || d.Sources[0].Name != "gen" || d.Sources[0].Type != "generate" || d.Sources[0].Options["rate"] != 10 {
		t.Errorf("sources = %+v", d.Sources)
	}
	if len(d.Enrichers) != 2 || d.Enrichers[0].Name != "resources" || d.Enrichers[1].Name != "agg1" || d.Enrichers[1].Path != "enrichers[1]" {
		t.Errorf("enrichers = %+v", d.Enrichers)
	}
	if _, ok := d.Enrichers[1].Options["name"]; ok {
		t.Error("enricher name leaked into its options")
	}
	if got := d.Where("sinks.local.queue.when_full"); got != "pipeline.yaml:18" {
		t.Errorf("Where(when_full) = %q", got)
	}
	if got := d.Where("sinks.local.not_there"); got != "pipeline.yaml:14" {
		t.Errorf("Where(missing key) falls back to %q, want the sink's line", got)
	}
}

func TestLoadStructuralProblemsAllReported(t *testing.T) {
	_, ps := load(t, `
sourcez: {}
sources:
  "bad name":
    type: generate
  nontype:
    rate: 5
enrichers:
  type: resources
sinks:
  out:
    type: file
    isolation: sandbox
    sha256: abc
`)
	wantProblem(t, ps, "pipeline.yaml:2", "sourcez", "unknown top-level key")
	wantProblem(t, ps, "pipeline.yaml:4", `sources.bad name`, "invalid name")
	wantProblem(t, ps, "pipeline.yaml:6", "sources.nontype", "missing type")
	wantProblem(t, ps, "pipeline.yaml:8", "enrichers", "want a list")
	wantProblem(t, ps, "pipeline.yaml:13", "sinks.out.isolation", "unknown isolation")
	wantProblem(t, ps, "pipeline.yaml:14", "sinks.out.sha256", "set plugin")
	// Problems come sorted by line.
	for i := 1; i < len(ps); i++ {
		_, a := splitWhere(ps[i-1].Where)
		_, b := splitWhere(ps[i].Where)
		if a > b {
			t.Errorf("problems not in line order: %v", ps)
		}
	}
}

func TestLoadYAMLSyntaxErrorHasLine(t *testing.T) {
	_, ps := load(t, "sources:\n  a:\n    type: generate\n   bad: [\n")
	if len(ps) != 1 || !strings.HasPrefix(ps[0].Where, "pipeline.yaml:") || !strings.Contains(ps[0].Msg, "invalid YAML") {
		t.Fatalf("got %v", ps)
	}
}

func TestInterpolationAndEnvOverrides(t *testing.T) {
	doc := `
sources:
  gen:
    type: generate
    rate: ${RATE}
    count: ${COUNT:-7}
sinks:
  out:
    type: file
    path: "${DIR}/flows.jsonl"
    note: "cost $$5"
`
	d, ps := load(t, doc, "RATE=250", "DIR=/var/log/fp", "FLOWPIPE_SINKS__OUT__MAX_FILES=3", "FLOWPIPE_CONFIG=ignored.yaml")
	if ps != nil {
		t.Fatal(ps)
	}
	src := d.Sources[0].Options
	if src["rate"] != 250 || src["count"] != 7 {
		t.Errorf("interpolated options = %v (want typed 250 and default 7)", src)
	}
	sink := d.Sinks[0].Options
	if sink["path"] != "/var/log/fp/flows.jsonl" || sink["note"] != "cost $5" || sink["max_files"] != 3 {
		t.Errorf("sink options = %v", sink)
	}
	if w := d.Where("sinks.out.max_files"); w != "env FLOWPIPE_SINKS__OUT__MAX_FILES" {
		t.Errorf("Where(env override) = %q", w)
	}

	_, ps = load(t, doc, "DIR=/x")
	wantProblem(t, ps, "pipeline.yaml:5", "sources.gen.rate", "RATE is not set")
}

func FuzzLoad(f *testing.F) {
	f.Add([]byte(valid))
	f.Add([]byte("sources: [1, 2]\n"))
	f.Add([]byte("a: &x {b: *x}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := Load("f.yaml", data, nil)
		if err == nil && (len(d.Sources) == 0 || len(d.Sinks) == 0) {
			t.Fatal("a pipeline without sources or sinks was accepted")
		}
	})
}

func TestProcessSettingsAreNotComponentOptions(t *testing.T) {
	d, ps := load(t, `
sources: {g: {type: generate, process: {call_timeout: 5s}, rate: 1}}
sinks: {o: {type: discard}}
`)
	if ps != nil {
		t.Fatal(ps)
	}
	src := d.Sources[0]
	if _, leaked := src.Options["process"]; leaked || src.Process == nil || src.Options["rate"] != 1 {
		t.Fatalf("process: %v, options: %v", src.Process, src.Options)
	}
}

func TestDataDir(t *testing.T) {
	t.Setenv("STATE_DIRECTORY", "")
	d, ps := load(t, valid)
	if ps != nil {
		t.Fatal(ps)
	}
	if d.DataDir != "/var/lib/flowpipe" {
		t.Errorf("default data_dir = %q, want /var/lib/flowpipe", d.DataDir)
	}

	t.Setenv("STATE_DIRECTORY", "/run/state/flowpipe:/other")
	if d, _ = load(t, valid); d.DataDir != "/run/state/flowpipe" {
		t.Errorf("data_dir under systemd = %q, want the first of $STATE_DIRECTORY", d.DataDir)
	}

	d, err := Load("/etc/fp/pipeline.yaml", []byte("data_dir: state\n"+valid), nil)
	if err != nil {
		t.Fatal(err)
	}
	if d.DataDir != "/etc/fp/state" {
		t.Errorf("relative data_dir = %q, want it relative to pipeline.yaml (/etc/fp/state)", d.DataDir)
	}

	_, ps = load(t, "data_dir: [a]\n"+valid)
	wantProblem(t, ps, "pipeline.yaml:1", "data_dir", "want a directory path")
}

func TestRunAs(t *testing.T) {
	// root and nobody exist on every Debian machine.
	d, ps := load(t, "run_as: nobody\nsources:\n  a: {type: generate}\n  b: {type: generate, run_as: root}\nsinks:\n  s: {type: discard}\n")
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	if d.RunAs != "nobody" || d.Sources[0].RunAs != "nobody" || d.Sources[1].RunAs != "root" || d.Sinks[0].RunAs != "nobody" {
		t.Errorf("run_as: top %q, a %q, b %q, s %q", d.RunAs, d.Sources[0].RunAs, d.Sources[1].RunAs, d.Sinks[0].RunAs)
	}
	if _, ok := d.Sources[1].Options["run_as"]; ok {
		t.Error("run_as reached the component's options")
	}
	_, ps = load(t, "run_as: no-such-user-here\nsources:\n  a: {type: generate, isolation: inproc, run_as: root}\n  b: {type: generate, run_as: 7}\nsinks:\n  s: {type: discard}\n")
	wantProblem(t, ps, "pipeline.yaml:1", "run_as", `no user "no-such-user-here" on this machine: create it (useradd --system no-such-user-here`)
	wantProblem(t, ps, "pipeline.yaml:3", "sources.a.run_as", "run_as applies to a component in its own process")
	wantProblem(t, ps, "pipeline.yaml:4", "sources.b.run_as", "want a user name, got")
}

func TestEnabled(t *testing.T) {
	doc, ps := load(t, `
sources:
  a: {type: generate}
  b: {type: generate, enabled: false}
enrichers:
  - {type: resources, enabled: false}
sinks:
  out: {type: file, enabled: true}
`)
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	if !doc.Enabled || !doc.Sources[0].Enabled || doc.Sources[1].Enabled || doc.Enrichers[0].Enabled || !doc.Sinks[0].Enabled {
		t.Errorf("enabled: pipeline %v, sources %v %v, enricher %v, sink %v", doc.Enabled, doc.Sources[0].Enabled, doc.Sources[1].Enabled, doc.Enrichers[0].Enabled, doc.Sinks[0].Enabled)
	}
	if _, ok := doc.Sources[1].Options["enabled"]; ok {
		t.Error("enabled: reached the component's options")
	}
	if got := EnabledOnly(doc.Sources); len(got) != 1 || got[0].Name != "a" {
		t.Errorf("EnabledOnly = %v", got)
	}
	doc, ps = load(t, "enabled: false\nsources:\n  a: {type: generate}\nsinks:\n  out: {type: file}\n", "FLOWPIPE_SINKS__OUT__ENABLED=false")
	if len(ps) > 0 {
		t.Fatal(ps)
	}
	if doc.Enabled || doc.Sinks[0].Enabled {
		t.Errorf("enabled: false at the top and from the environment: %v, %v", doc.Enabled, doc.Sinks[0].Enabled)
	}
	_, ps = load(t, "enabled: maybe\nsources:\n  a: {type: generate, enabled: 1}\nsinks:\n  out: {type: file}\n")
	wantProblem(t, ps, "pipeline.yaml:1", "enabled", "want true or false")
	wantProblem(t, ps, "pipeline.yaml:3", "sources.a.enabled", "want true or false")
}
