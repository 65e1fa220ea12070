package pluginhost

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
)

// enrichRule enriches one batch and returns the rule it was given and how many events were
// kept.
func enrichRule(t *testing.T, en component.Enricher) (string, int) {
	t.Helper()
	b := flow.NewBatch(seqEvents(0, 100), nil)
	if err := en.Enrich(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	return b.Events[0].RuleID, len(b.Events)
}

// TestReconfigurePlugin: a plugin process whose component implements Reconfigurer takes new
// options in place (same process); problems come back positioned as Configure's do and
// change nothing; a change the component refuses in place, and one from a component that
// cannot take options at all, wrap ErrRestartNeeded; a plugin restarted after a crash runs
// with the options it last took.
func TestReconfigurePlugin(t *testing.T) {
	f := newFixture(t, component.KindEnricher, "tag")
	c, err := f.instantiate(t, "tag", map[string]any{"rule": "r-1", "drop_every": 10})
	if err != nil {
		t.Fatal(err)
	}
	en := c.(*remoteEnricher)
	rc, ok := c.(component.Reconfigurer)
	if !ok {
		t.Fatal("a plugin component does not implement component.Reconfigurer")
	}
	if rule, n := enrichRule(t, en); rule != "r-1" || n != 90 {
		t.Fatalf("before: rule %q, %d kept", rule, n)
	}
	p0, _ := en.in.get(context.Background())

	if err := rc.Reconfigure(context.Background(), map[string]any{"rule": "r-2"}); err != nil {
		t.Fatalf("Reconfigure: %v", err)
	}
	if rule, n := enrichRule(t, en); rule != "r-2" || n != 100 {
		t.Fatalf("after: rule %q, %d kept; want r-2 and all 100", rule, n)
	}
	if p, _ := en.in.get(context.Background()); p != p0 || p.pid() != p0.pid() {
		t.Fatalf("the process changed (pid %d → %d): Reconfigure must keep it", p0.pid(), p.pid())
	}

	err = rc.Reconfigure(context.Background(), map[string]any{"rule": "r-3", "drop_every": -1, "dorp": 1})
	fe, ok := options.FieldErrorsOf(err)
	if !ok {
		t.Fatalf("bad options: got %v, want options.FieldErrors", err)
	}
	paths := map[string]bool{}
	for _, e := range fe {
		paths[e.Path] = true
	}
	if len(fe) != 2 || !paths["dorp"] || !paths["drop_every"] {
		t.Fatalf("problems %v, want one at dorp and one at drop_every", fe)
	}
	if errors.Is(err, component.ErrRestartNeeded) {
		t.Fatalf("bad options must not ask for a restart: %v", err)
	}
	if rule, _ := enrichRule(t, en); rule != "r-2" {
		t.Fatalf("refused options changed the rule to %q", rule)
	}

	err = rc.Reconfigure(context.Background(), map[string]any{"rule": "restart"})
	if !errors.Is(err, component.ErrRestartNeeded) {
		t.Fatalf("a change the component cannot apply in place: got %v, want ErrRestartNeeded", err)
	}
	if rule, _ := enrichRule(t, en); rule != "r-2" {
		t.Fatalf("a refused change changed the rule to %q", rule)
	}

	// Killed: the restarted process is configured with r-2, not with r-1.
	if err := syscall.Kill(p0.pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		p, err := en.in.get(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if p != p0 {
			break
		}
		if i > 600 {
			t.Fatal("the killed plugin was not replaced")
		}
		b := flow.NewBatch(seqEvents(0, 1), nil)
		_ = en.Enrich(context.Background(), b) // waits for the restart once the kill is seen
	}
	if rule, n := enrichRule(t, en); rule != "r-2" || n != 100 {
		t.Fatalf("restarted plugin: rule %q, %d kept; want the reconfigured r-2, all 100", rule, n)
	}
}

// TestReconfigureOldPlugin: a plugin built before the Reconfigure call (gRPC Unimplemented)
// and a component that does not implement Reconfigurer both ask for a new instance.
func TestReconfigureOldPlugin(t *testing.T) {
	old := filepath.Join(pluginDir, "flowpipe-enricher-old")
	if err := os.Link(filepath.Join(pluginDir, "testplugin"), old); err != nil && !errors.Is(err, os.ErrExist) {
		t.Fatal(err)
	}
	f := newFixture(t, component.KindEnricher, "old")
	c, err := f.instantiate(t, "old", map[string]any{"rule": "r-1"})
	if err != nil {
		t.Fatal(err)
	}
	err = c.(component.Reconfigurer).Reconfigure(context.Background(), map[string]any{"rule": "r-2"})
	if !errors.Is(err, component.ErrRestartNeeded) || !strings.Contains(err.Error(), "built before") {
		t.Fatalf("old plugin: got %v, want ErrRestartNeeded because it was built before Reconfigure", err)
	}
	if rule, _ := enrichRule(t, c.(component.Enricher)); rule != "r-1" {
		t.Fatalf("old plugin's rule is %q after a refused Reconfigure", rule)
	}

	fs := newFixture(t, component.KindSource, "seq")
	src, err := fs.instantiate(t, "seq", map[string]any{"count": 1})
	if err != nil {
		t.Fatal(err)
	}
	err = src.(component.Reconfigurer).Reconfigure(context.Background(), map[string]any{"count": 2})
	if !errors.Is(err, component.ErrRestartNeeded) || !strings.Contains(err.Error(), "cannot take new options") {
		t.Fatalf("component without Reconfigure: got %v, want ErrRestartNeeded because it cannot take options", err)
	}
}

// TestCheckOptions: the host asks a running plugin to check options without changing
// anything (component.OptionsChecker); a plugin built before the Check call is not asked
// (nil: its options are checked when applied).
func TestCheckOptions(t *testing.T) {
	f := newFixture(t, component.KindEnricher, "tag")
	c, err := f.instantiate(t, "tag", map[string]any{"rule": "r-1"})
	if err != nil {
		t.Fatal(err)
	}
	oc := c.(component.OptionsChecker)
	if err := oc.CheckOptions(context.Background(), map[string]any{"rule": "r-2"}); err != nil {
		t.Fatalf("good options: %v", err)
	}
	err = oc.CheckOptions(context.Background(), map[string]any{"rule": "r-2", "drop_evry": 3})
	if fe, ok := options.FieldErrorsOf(err); !ok || len(fe) != 1 || fe[0].Path != "drop_evry" {
		t.Fatalf("got %v, want one problem at drop_evry", err)
	}
	if rule, _ := enrichRule(t, c.(component.Enricher)); rule != "r-1" {
		t.Fatalf("rule is %q after checks, want r-1: a check changes nothing", rule)
	}

	old := filepath.Join(pluginDir, "flowpipe-enricher-old")
	if err := os.Link(filepath.Join(pluginDir, "testplugin"), old); err != nil && !errors.Is(err, os.ErrExist) {
		t.Fatal(err)
	}
	fo := newFixture(t, component.KindEnricher, "old")
	co, err := fo.instantiate(t, "old", map[string]any{"rule": "r-1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := co.(component.OptionsChecker).CheckOptions(context.Background(), map[string]any{"drop_evry": 3}); err != nil {
		t.Fatalf("a plugin built before Check: got %v, want nil (not asked)", err)
	}
}
