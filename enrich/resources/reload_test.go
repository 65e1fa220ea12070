package resources

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/prometheus/client_golang/prometheus"
)

const tablesV1 = `
overlay: [100.64.0.0/10]
resources:
  - {id: web, prefixes: [10.0.0.0/24]}
rules:
  - {id: r-v1, protocols: [tcp]}
`

const tablesV2 = `{"resources": [{"id": "web-v2", "prefixes": ["10.0.0.0/24"]}], "rules": [{"id": "r-v2"}]}`

// replaceFile writes data next to path and renames it over path, as editors and management
// agents do, so the watcher sees a new inode rather than an in-place write.
func replaceFile(t *testing.T, path, data string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func enrichOne(t *testing.T, e *Enricher) flow.Event {
	t.Helper()
	b := flow.NewBatch([]flow.Event{{Protocol: flow.ProtoTCP, SrcAddr: a("100.64.0.1"), DstAddr: a("10.0.0.5"), DstPort: 80}}, nil)
	if err := e.Enrich(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	return b.Events[0]
}

func newFileEnricher(t *testing.T, dir string, opts map[string]any, m component.Metrics, reg prometheus.Registerer) (*Enricher, error) {
	t.Helper()
	f := Factory()
	cfg := f.NewConfig()
	if errs := config.Decode(opts, cfg, ""); len(errs) > 0 {
		t.Fatalf("decode: %v", errs)
	}
	if err := cfg.(*Config).Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	c, err := f.New(component.Env{Name: "res", ConfigDir: dir, Metrics: m, Registerer: reg}, cfg)
	if err != nil {
		return nil, err
	}
	e := c.(*Enricher)
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	if err := e.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return e, nil
}

func TestReload(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tables.yaml")
	replaceFile(t, path, tablesV1)
	m := newCounting()
	reg := prometheus.NewRegistry()
	// A long interval: this test drives reloads with Reload; TestWatch covers the watcher.
	e, err := newFileEnricher(t, dir, map[string]any{"tables_file": "tables.yaml", "reload_interval": "1h"}, m, reg)
	if err != nil {
		t.Fatal(err)
	}
	if ev := enrichOne(t, e); ev.DstResourceID != "web" || ev.RuleID != "r-v1" {
		t.Fatalf("initial tables: got %q/%q", ev.DstResourceID, ev.RuleID)
	}

	replaceFile(t, path, tablesV2)
	if err := e.Reload(); err != nil {
		t.Fatal(err)
	}
	if ev := enrichOne(t, e); ev.DstResourceID != "web-v2" || ev.RuleID != "r-v2" {
		t.Fatalf("after reload: got %q/%q", ev.DstResourceID, ev.RuleID)
	}

	for _, bad := range []struct{ name, data, want string }{
		{"invalid rule", strings.Replace(tablesV1, "{id: r-v1, protocols: [tcp]}", "{id: r-v1, ports: [\"90-80\"]}", 1), path + ":6: rules[0].ports[0]: empty port range"},
		{"unknown key", "resourcez: []", `resourcez: unknown key (did you mean "resources"?)`},
		{"not YAML", "resources: [", path + ": line 1: did not find expected node content"},
		{"empty (a writer caught mid-write)", "", "is empty"},
		{"unknown resource", `{"rules": [{"id": "x", "dst": ["nope"]}]}`, `rules[0].dst[0]: unknown resource "nope"`},
	} {
		replaceFile(t, path, bad.data)
		err := e.Reload()
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%s: Reload() = %v, want an error containing %q", bad.name, err, bad.want)
		}
		if ev := enrichOne(t, e); ev.DstResourceID != "web-v2" || ev.RuleID != "r-v2" {
			t.Errorf("%s: the previous tables must stay in force, got %q/%q", bad.name, ev.DstResourceID, ev.RuleID)
		}
	}
	if got := m.get("errors", "tables_reload"); got != 5 {
		t.Errorf("errors{tables_reload} = %d, want 5", got)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := e.Reload(); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: Reload() = %v, want not exist", err)
	}
	replaceFile(t, path, tablesV1)
	if err := e.Reload(); err != nil {
		t.Fatal(err)
	}
	if ev := enrichOne(t, e); ev.DstResourceID != "web" {
		t.Errorf("after a good file came back: got %q", ev.DstResourceID)
	}
	got := map[string]float64{}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "flowpipe_resources_table_reloads_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			got[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
		}
	}
	if want := map[string]float64{"ok": 2, "error": 6}; got["ok"] != want["ok"] || got["error"] != want["error"] {
		t.Errorf("flowpipe_resources_table_reloads_total = %v, want %v", got, want)
	}
}

func TestBadFileAtStartIsAnError(t *testing.T) {
	dir := t.TempDir()
	replaceFile(t, filepath.Join(dir, "t.yaml"), "rules: [{id: a, src: [ghost]}]")
	_, err := newFileEnricher(t, dir, map[string]any{"tables_file": "t.yaml"}, component.NopMetrics{}, nil)
	if err == nil || !strings.Contains(err.Error(), `rules[0].src[0]: unknown resource "ghost"`) || !strings.Contains(err.Error(), "t.yaml") {
		t.Fatalf("New = %v, want the file name and the problem", err)
	}
	_, err = newFileEnricher(t, dir, map[string]any{"tables_file": "missing.yaml"}, component.NopMetrics{}, nil)
	var fe config.FieldErrors
	if !errors.As(err, &fe) || fe[0].Path != "tables_file" || !strings.Contains(fe[0].Msg, "no such file") {
		t.Fatalf("New with a missing file = %v", err)
	}
}

// TestWatch runs the real watcher: files replaced by rename, rewritten in place, and a bad
// file in between, which must leave the previous tables in force.
func TestWatch(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tables.yaml")
	replaceFile(t, path, tablesV1)
	m := newCounting()
	e, err := newFileEnricher(t, dir, map[string]any{"tables_file": path, "reload_interval": "5ms"}, m, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second) // a bound on a hung watcher, not a speed requirement
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("watcher never %s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	replaceFile(t, path, tablesV2)
	waitFor("picked up the renamed file", func() bool { return enrichOne(t, e).DstResourceID == "web-v2" })

	replaceFile(t, path, "rules: [{id: x, ports: [0]}]")
	waitFor("rejected the bad file", func() bool { return m.get("errors", "tables_reload") == 1 })
	if ev := enrichOne(t, e); ev.DstResourceID != "web-v2" {
		t.Fatalf("bad file replaced the tables: %q", ev.DstResourceID)
	}

	// In-place rewrite (same inode), as `cat > file` does.
	if err := os.WriteFile(path, []byte(tablesV1), 0o644); err != nil {
		t.Fatal(err)
	}
	// The watcher may catch the write half done (an empty file, rejected and counted); it
	// must still end up with the complete file.
	waitFor("picked up the rewritten file", func() bool { return enrichOne(t, e).DstResourceID == "web" })
}

// TestReloadUnderLoad enriches from several goroutines while the tables are swapped: every
// batch must see one table version throughout (never a mix), and no event may go missing.
func TestReloadUnderLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tables.yaml")
	v := func(id string) string {
		return `{"resources": [{"id": "` + id + `", "prefixes": ["10.0.0.0/24", "10.0.1.0/24"]}]}`
	}
	replaceFile(t, path, v("gen-0"))
	e, err := newFileEnricher(t, dir, map[string]any{"tables_file": path, "reload_interval": "1h"}, component.NopMetrics{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	var seen sync.Map
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				evs := make([]flow.Event, 64)
				for i := range evs {
					evs[i] = flow.Event{Protocol: flow.ProtoUDP, SrcAddr: a("10.0.0.1"), DstAddr: a("10.0.1.1")}
				}
				b := flow.NewBatch(evs, nil)
				if err := e.Enrich(context.Background(), b); err != nil {
					t.Error(err)
					return
				}
				if len(b.Events) != 64 {
					t.Errorf("lost events: %d", len(b.Events))
					return
				}
				first := b.Events[0].SrcResourceID
				for _, ev := range b.Events {
					if ev.SrcResourceID != first || ev.DstResourceID != first {
						t.Errorf("batch mixes table versions: %q and %q/%q", first, ev.SrcResourceID, ev.DstResourceID)
						return
					}
				}
				seen.Store(first, true)
			}
		}()
	}
	waitSeen := func(id string) {
		deadline := time.Now().Add(20 * time.Second)
		for {
			if _, ok := seen.Load(id); ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("no batch saw %s", id)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitSeen("gen-0")
	last := ""
	for i := 1; i <= 50; i++ {
		last = "gen-" + string(rune('a'+i%26)) + string(rune('0'+i/26))
		replaceFile(t, path, v(last))
		if err := e.Reload(); err != nil {
			t.Fatal(err)
		}
	}
	waitSeen(last)
	stop.Store(true)
	wg.Wait()
	n := 0
	seen.Range(func(any, any) bool { n++; return true })
	if n < 2 {
		t.Errorf("saw %d table versions, want the reloads to be visible", n)
	}
}

// TestWatchWaitsForTheFileToSettle: the watcher reads a changed file only once it has stayed
// the same for one check, so a file being rewritten in place is not loaded half-written,
// even when the half that exists parses (here: the resources without the rules).
func TestWatchWaitsForTheFileToSettle(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tables.yaml")
	replaceFile(t, path, tablesV1)
	f := &tableFile{path: path}
	if _, changed, err := f.load(true); err != nil || !changed {
		t.Fatalf("initial load: changed=%v err=%v", changed, err)
	}
	full := "resources: [{id: web-v3, prefixes: [10.0.0.0/24]}]\nrules: [{id: r-v3}]\n"
	half := full[:strings.Index(full, "rules")] // parses: resources only

	write := func(s string) {
		t.Helper()
		fh, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fh.WriteString(s); err != nil {
			t.Fatal(err)
		}
		fh.Close()
	}
	write(half)
	if _, changed, err := f.load(false); changed || err != nil {
		t.Fatalf("first check after a change read the file (changed=%v, err=%v)", changed, err)
	}
	write(full) // the writer finishes before the next check
	if _, changed, err := f.load(false); changed || err != nil {
		t.Fatalf("the file changed again since the last check, yet was read (changed=%v, err=%v)", changed, err)
	}
	tb, changed, err := f.load(false)
	if err != nil || !changed {
		t.Fatalf("settled file not read: changed=%v err=%v", changed, err)
	}
	if got := tb.ruleFor(&flow.Event{Protocol: flow.ProtoTCP}); got != "r-v3" {
		t.Errorf("loaded tables have rule %q, want the complete file's r-v3", got)
	}
	if _, changed, _ := f.load(false); changed {
		t.Error("an unchanged file was loaded again")
	}
}
