package pluginhost

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// tagged is what the test plugin's tag enricher makes of events: rule_id set, every event
// whose source port is a multiple of dropEvery dropped.
func tagged(events []flow.Event, rule string, dropEvery int) []flow.Event {
	var out []flow.Event
	for _, e := range events {
		if dropEvery > 0 && int(e.SrcPort)%dropEvery == 0 {
			continue
		}
		e.RuleID = rule
		out = append(out, e)
	}
	return out
}

// An enricher answers with what it changed when both sides can: the host asks for it, a
// plugin from before (tagwhole) answers whole batches, and FLOWPIPE_PLUGIN_ENRICH_CHANGES=off
// turns it off; the events are the same every way, on the data channel and over gRPC, as
// Enrich and as StartEnrich.
func TestEnrichChangesNegotiated(t *testing.T) {
	for _, c := range []struct {
		name, plugin string
		hostOff      bool
		changes      bool
	}{
		{"changes", "tag", false, true},
		{"changes over grpc", "tagv1", false, true},
		{"plugin from before", "tagwhole", false, false},
		{"plugin from before over grpc", "tagwholev1", false, false},
		{"turned off", "tag", true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.hostOff {
				t.Setenv(pb.EnrichChangesEnv, "off")
			}
			f := newFixture(t, component.KindEnricher, "tag")
			en, err := f.instantiate(t, c.plugin, map[string]any{"rule": "r-2", "drop_every": 4})
			if err != nil {
				t.Fatal(err)
			}
			defer en.(component.Closer).Close(context.Background())
			if p := currentProc(t, en); p.changes == c.hostOff {
				t.Fatalf("host asked for changes: %v, want %v", p.changes, !c.hostOff)
			}
			before := appliedChanges.Load()
			for i := range 3 {
				in := seqEvents(i*1000, 1000)
				want := tagged(in, "r-2", 4)
				b := flow.NewBatch(in, nil)
				if i == 2 {
					err = en.(component.Pipeliner).StartEnrich(context.Background(), b)()
				} else {
					err = en.(component.Enricher).Enrich(context.Background(), b)
				}
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(b.Events, want) {
					t.Fatalf("batch %d: %d events enriched, not the %d expected", i, len(b.Events), len(want))
				}
			}
			if got := appliedChanges.Load() - before; (got == 3) != c.changes || (got != 0 && got != 3) {
				t.Fatalf("%d of 3 answers applied as changes, want changes: %v", got, c.changes)
			}
			if n := f.m.get("filtered/port_multiple"); n != 750 {
				t.Errorf("filtered count %d, want 750", n)
			}
		})
	}
}

// An enricher that drops every event, keeps every event, or changes nothing.
func TestEnrichChangesEdges(t *testing.T) {
	f := newFixture(t, component.KindEnricher, "tag")
	en, err := f.instantiate(t, "tag", map[string]any{"rule": "", "drop_every": 1})
	if err != nil {
		t.Fatal(err)
	}
	defer en.(component.Closer).Close(context.Background())
	b := flow.NewBatch(seqEvents(0, 100), nil)
	if err := en.(component.Enricher).Enrich(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	if len(b.Events) != 0 {
		t.Fatalf("%d events kept, want none", len(b.Events))
	}
	for _, opts := range []map[string]any{{"rule": ""}, {"rule": "r"}} {
		if err := en.(component.Reconfigurer).Reconfigure(context.Background(), opts); err != nil {
			t.Fatal(err)
		}
		in := seqEvents(0, 100)
		for i := range in {
			in[i].RuleID = "was set" // cleared by rule ""
		}
		want := tagged(in, opts["rule"].(string), 0)
		b := flow.NewBatch(in, nil)
		if err := en.(component.Enricher).Enrich(context.Background(), b); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(b.Events, want) {
			t.Fatalf("rule %q: events not as enriched", opts["rule"])
		}
	}
	b = flow.NewBatch(nil, nil)
	if err := en.(component.Enricher).Enrich(context.Background(), b); err != nil || len(b.Events) != 0 {
		t.Fatalf("empty batch: %v, %d events", err, len(b.Events))
	}
}

// A malformed answer as changes fails the plugin that sent it, as a garbage frame does: it
// is restarted, the batch, left as it was, is enriched again in the new process, and its
// events are counted as redelivered.
func TestEnrichBadChanges(t *testing.T) {
	f := newFixture(t, component.KindEnricher, "tag")
	marker := filepath.Join(t.TempDir(), "corrupted")
	en, err := f.instantiate(t, "corrupt", map[string]any{"rule": "r-3", "drop_every": 5, "corrupt_once": marker})
	if err != nil {
		t.Fatal(err)
	}
	defer en.(component.Closer).Close(context.Background())
	pid := currentProc(t, en).pid()
	in := seqEvents(0, 500)
	want := tagged(in, "r-3", 5)
	b := flow.NewBatch(in, nil)
	if err := en.(component.Enricher).Enrich(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	badAnswerRecovered(t, f, en, pid, marker, b, want)
}

// The same on the data channel, for a pipelined enrich (StartEnrich): a well-formed frame
// whose changes are cut short fails the plugin, and the batch, left as it was, is enriched
// again in the new process.
func TestPipelinedEnrichBadChanges(t *testing.T) {
	if pb.DataChannelOff() {
		t.Skip(pb.DataChannelEnv + "=off: the host offers no data channel")
	}
	f := newFixture(t, component.KindEnricher, "tag")
	marker := filepath.Join(t.TempDir(), "bad-frame-written")
	en, err := f.instantiate(t, "tag", map[string]any{"rule": "r-4", "drop_every": 3, "bad_changes_frame_once": marker})
	if err != nil {
		t.Fatal(err)
	}
	defer en.(component.Closer).Close(context.Background())
	p := currentProc(t, en)
	if p.data == nil {
		t.Fatal("the plugin does not use the data channel")
	}
	pid := p.pid()
	in := seqEvents(0, 500)
	want := tagged(in, "r-4", 3)
	b := flow.NewBatch(in, nil)
	if err := en.(component.Pipeliner).StartEnrich(context.Background(), b)(); err != nil {
		t.Fatal(err)
	}
	badAnswerRecovered(t, f, en, pid, marker, b, want)
}

// badAnswerRecovered checks what follows a plugin's bad answer as changes (sent once, as
// marker shows): the batch b of 500 events was enriched again, whole, to want, in a new
// process, counted as a restart and as redelivered, and the host's log says what was wrong.
func badAnswerRecovered(t *testing.T, f *fixture, en any, pid int, marker string, b *flow.Batch, want []flow.Event) {
	t.Helper()
	if _, err := os.Stat(marker); err != nil {
		t.Fatal("the plugin did not send its bad answer")
	}
	if !reflect.DeepEqual(b.Events, want) {
		t.Fatalf("%d events enriched, not the %d expected", len(b.Events), len(want))
	}
	if p := currentProc(t, en).pid(); p == pid {
		t.Fatalf("the plugin that sent a bad answer (pid %d) was not replaced", pid)
	}
	if r := f.metric(t, "flowpipe_plugin_restarts_total"); r != 1 {
		t.Errorf("restarts_total = %v, want 1", r)
	}
	if r := f.metric(t, "flowpipe_plugin_redelivered_events_total"); r != 500 {
		t.Errorf("redelivered_events_total = %v, want 500", r)
	}
	if !strings.Contains(f.logs.String(), "bad answer: codec: changes") {
		t.Errorf("the host's log does not say what was wrong with the answer:\n%s", f.logs.String())
	}
}
