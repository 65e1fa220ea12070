package pipeline

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/pipeline/diskqueue"
	"github.com/flowpipe/flowpipe/internal/codec"
)

// seedQueue writes into the disk queue in dir two good records around one whose checksums
// match but whose payload does not decode (its last event cut short), and returns the good
// records' events.
func seedQueue(t *testing.T, dir string) []flow.Event {
	t.Helper()
	q, err := diskqueue.Open(diskqueue.Options{Dir: dir, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	var good []flow.Event
	ctx := context.Background()
	for i := range 3 {
		evs := make([]flow.Event, 10)
		for j := range evs {
			evs[j] = richEvent(i*10+j, "src")
		}
		if i == 1 {
			enc := codec.Append(nil, evs)
			durable := make(chan error, 1)
			if err := q.AppendEncodedAsync(ctx, enc[:len(enc)-1], len(evs), func(err error) { durable <- err }); err != nil {
				t.Fatal(err)
			}
			if err := <-durable; err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := q.Append(ctx, evs); err != nil {
			t.Fatal(err)
		}
		good = append(good, evs...)
	}
	q.Close()
	return good
}

// TestDiskQueueReadBackUndecoded: a sink's disk queue hands its records to an encoded
// writer (a sink plugin's stand-in) undecoded, with their encoding to send on, and to an
// in-process sink decoded, both the same events; a record that does not decode reaches
// neither, and is counted and logged as damaged (queue_corrupt) by both queues alike.
func TestDiskQueueReadBackUndecoded(t *testing.T) {
	plugin, inproc := &encodedSink{}, &eventSink{}
	reg := component.NewRegistry()
	reg.Register(component.NewSourceFactory("enc", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Source, error) { return &encodedSource{}, nil }))
	reg.Register(component.NewSinkFactory("rec", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Sink, error) { return inproc, nil }))
	reg.Register(component.NewSinkFactory("encoded", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Sink, error) { return plugin, nil }))
	pq, iq := filepath.Join(t.TempDir(), "q"), filepath.Join(t.TempDir(), "q")
	want := seedQueue(t, pq)
	seedQueue(t, iq)
	yaml := fmt.Sprintf("sources: {src: {type: enc}}\nsinks:\n  plugin: {type: encoded, queue: {type: disk, path: %q}}\n  inproc: {type: rec, queue: {type: disk, path: %q}}\n", pq, iq)
	doc, err := config.Load("pipeline.yaml", []byte(yaml), nil)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	p, err := New(context.Background(), doc, Options{Registry: reg, Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(plugin.got, want) || !reflect.DeepEqual(inproc.got, want) {
		t.Fatalf("the encoded writer got %d events, the in-process sink %d, want the %d of the good records", len(plugin.got), len(inproc.got), len(want))
	}
	if plugin.batches != 2 || plugin.undecoded != 2 || plugin.encoded != 2 {
		t.Errorf("the encoded writer got %d batches, %d undecoded, %d with their encoding, want 2 of each", plugin.batches, plugin.undecoded, plugin.encoded)
	}
	if inproc.batches != 2 || inproc.undecoded != 0 {
		t.Errorf("the in-process sink got %d batches, %d undecoded, want 2 decoded", inproc.batches, inproc.undecoded)
	}
	for _, name := range []string{"plugin", "inproc"} {
		m := p.Metrics().Component(name, "sink")
		if n := testutil.ToFloat64(m.DropCounter("queue_corrupt")); n != 10 {
			t.Errorf("sink %s: %v events counted as queue_corrupt, want the 10 of the damaged record", name, n)
		}
		if n := testutil.ToFloat64(m.DropCounter("rejected")); n != 0 {
			t.Errorf("sink %s: %v events rejected: the damaged record reached the sink", name, n)
		}
	}
	if n := strings.Count(logs.String(), "skipped a damaged disk queue record"); n != 2 {
		t.Errorf("the damaged record was logged %d times, want once per queue:\n%s", n, logs.String())
	}
	if n := strings.Count(logs.String(), "records read back go to the sink undecoded"); n != 1 {
		t.Errorf("%d queues said they hand records on undecoded, want the encoded writer's alone", n)
	}
}
