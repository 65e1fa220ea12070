package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/flowpipe/flowpipe/core/component/componenttest"
)

// Every problem at once, whatever stage finds it: the document's own keys (admin, runtime)
// do not hide the components' options, a typo does not hide a bad value beside it, an
// overflowing size says so, in_flight has an upper bound. Default isolation (the options
// are checked by the plugin processes).
func TestValidateReportsEveryStageAtOnce(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), `admin:
  lisen: 127.0.0.1:9560
runtime:
  shutdown_timeout: forever
sources:
  gen:
    type: generate
    ratee: 10
    rate: -1
sinks:
  out:
    type: file
    path: x.jsonl
    max_size: 99999999999999999999GiB
    in_flight: 100000
    retry:
      max_attemps: 3
`)
	_, stderr, code := flowpipe(t, dir, "validate")
	if code != 1 {
		t.Fatalf("validate exited %d, want 1:\n%s", code, stderr)
	}
	for _, want := range []string{
		`pipeline.yaml:2: admin.lisen: unknown key (did you mean "listen"?)`,
		`pipeline.yaml:4: runtime.shutdown_timeout: want a duration`,
		`pipeline.yaml:8: sources.gen.ratee: unknown key (did you mean "rate"?)`,
		`pipeline.yaml:9: sources.gen.rate: must not be negative`,
		`pipeline.yaml:14: sinks.out.max_size: invalid size`,
		`too large`,
		`pipeline.yaml:15: sinks.out.in_flight: at most 1024, got 100000`,
		`pipeline.yaml:17: sinks.out.retry.max_attemps: unknown key (did you mean "max_attempts"?)`,
		`7 problem(s) found`,
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("validate output lacks %q:\n%s", want, stderr)
		}
	}
	if strings.Contains(stderr, "negative") && strings.Contains(stderr, "max_size") && !strings.Contains(stderr, "too large") {
		t.Errorf("an overflowing size is reported as negative:\n%s", stderr)
	}

	writeFile(t, filepath.Join(dir, "tab.yaml"), "sources:\n  gen:\n\ttype: generate\nsinks:\n  o: {type: file, path: x}\n")
	_, stderr, code = flowpipe(t, dir, "validate", "-c", "tab.yaml")
	if code != 1 || !strings.Contains(stderr, "tab.yaml:3: invalid YAML: a tab character indents this line") {
		t.Errorf("tab: exit %d:\n%s", code, stderr)
	}
}

// enabled: false is checked as if enabled, and validate and graph say what is off; a
// disabled pipeline runs nothing and stops cleanly. Default isolation.
func TestValidateAndGraphShowDisabled(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), `admin: {listen: ""}
data_dir: data
sources:
  gen: {type: generate, count: 100}
sinks:
  out: {type: file, path: out.jsonl}
  archive: {type: file, path: archive.jsonl, enabled: false}
`)
	stdout, stderr, code := flowpipe(t, dir, "validate")
	if code != 0 || !strings.Contains(stdout, "valid (1 sources, 0 enrichers, 2 sinks; disabled: sink archive)") {
		t.Errorf("validate: exit %d\n%s%s", code, stdout, stderr)
	}
	stdout, _, code = flowpipe(t, dir, "graph")
	if code != 0 || !strings.Contains(stdout, `archive\n(sink file, disabled)`) || strings.Contains(stdout, `out\n(sink file, disabled)`) {
		t.Errorf("graph: exit %d\n%s", code, stdout)
	}
	_, stderr, code = flowpipe(t, dir, "run")
	if code != 0 {
		t.Fatalf("run: exit %d\n%s", code, stderr)
	}
	if n := len(componenttest.ReadJSONLines(t, filepath.Join(dir, "out.jsonl"))); n != 100 {
		t.Errorf("out.jsonl has %d lines, want 100", n)
	}
	if _, err := os.Stat(filepath.Join(dir, "archive.jsonl")); !os.IsNotExist(err) {
		t.Errorf("the disabled sink wrote its file (%v)", err)
	}

	writeFile(t, filepath.Join(dir, "bad.yaml"), "sources:\n  gen: {type: generate, enabled: false, ratee: 1}\nsinks:\n  out: {type: file, path: out.jsonl, enabled: yes please}\n")
	_, stderr, code = flowpipe(t, dir, "validate", "-c", "bad.yaml")
	for _, want := range []string{`bad.yaml:2: sources.gen.ratee: unknown key`, `bad.yaml:4: sinks.out.enabled: want true or false`} {
		if code != 1 || !strings.Contains(stderr, want) {
			t.Errorf("validate bad.yaml: exit %d, want %q:\n%s", code, want, stderr)
		}
	}
}
