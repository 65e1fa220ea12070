package pipeline

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/tap"
	"github.com/flowpipe/flowpipe/internal/codec"
)

// A source plugin's batches reach the runtime undecoded (flow.NewEncodedBatch, through the
// plugin host); these tests emit such batches from an in-process source to exercise the
// runtime itself, and compare with the same events emitted decoded.

// richEvent is the i-th event of encodedSource; source names it or not.
func richEvent(i int, source string) flow.Event {
	e := flow.Event{
		Type: flow.Type(1 + i%3), Direction: flow.Direction(i % 3), Protocol: flow.ProtoTCP,
		Timestamp: flow.Time(1_700_000_000_000_000_000 + int64(i)), Start: flow.Time(1_700_000_000_000_000_000),
		SrcAddr: netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), DstAddr: netip.MustParseAddr("fd00::1"),
		SrcPort: uint16(i), DstPort: 443, RxPackets: uint64(i), RxBytes: uint64(i) * 1500, TxPackets: uint64(i),
		Source: source,
	}
	e.EventID[8], e.EventID[9], e.EventID[10] = 1, byte(i>>8), byte(i)
	e.FlowID = e.EventID
	if i%5 == 0 {
		e.RuleID = "rule-allow-web"
	}
	return e
}

// encodedSource emits batches of rich events, encoded (as the plugin host hands a source
// plugin's batches on) when encoded is set and the runtime takes them so.
type encodedSource struct {
	batches, size int
	encoded       bool
	source        string       // what the events name as their source ("": none)
	tookEncoded   bool         // the runtime is a component.EncodedEmitter
	decodes       atomic.Int64 // of the batches' own encodings (not of a tap ring's copies)
	mu            sync.Mutex
	sent          map[*byte]bool // the batches' own encodings
	acks          []error
}

func (s *encodedSource) Run(ctx context.Context, out component.Emitter) error {
	_, s.tookEncoded = out.(component.EncodedEmitter)
	for i := range s.batches {
		evs := make([]flow.Event, s.size)
		for j := range evs {
			evs[j] = richEvent(i*s.size+j, s.source)
		}
		ack := func(err error) {
			s.mu.Lock()
			s.acks = append(s.acks, err)
			s.mu.Unlock()
		}
		var b *flow.Batch
		if s.encoded && s.tookEncoded {
			enc := codec.Append(nil, evs)
			s.mu.Lock()
			if s.sent == nil {
				s.sent = map[*byte]bool{}
			}
			s.sent[&enc[0]] = true
			s.mu.Unlock()
			b = flow.NewEncodedBatch(enc, len(evs), s.source != "", s.decode, ack)
		} else {
			b = flow.NewBatch(evs, ack)
		}
		if err := out.Emit(ctx, b); err != nil {
			return nil
		}
	}
	return nil
}

func (s *encodedSource) decode(dst []flow.Event, data []byte, n int) ([]flow.Event, error) {
	s.mu.Lock()
	if s.sent[&data[0]] {
		s.decodes.Add(1)
	}
	s.mu.Unlock()
	return codec.Decode(dst, data, n)
}

// eventSink records every event it wrote; as an encoded writer (component.EncodedWriter, a
// stand-in for a sink plugin, which sends the encoding on) it takes batches undecoded and
// decodes their encoding itself, leaving the batch undecoded.
type eventSink struct {
	mu        sync.Mutex
	got       []flow.Event
	undecoded int // batches that came undecoded
	batches   int
}

func (s *eventSink) Write(_ context.Context, b *flow.Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.batches++
	if b.Undecoded() {
		s.undecoded++
	}
	s.got = append(s.got, b.Events...)
	return nil
}

type encodedSink struct {
	eventSink
	encoded int // batches that came with an encoding to pass on
}

func (s *encodedSink) WritesEncoded() {}

// Write uses the encoding when there is one, as a sink plugin sends it; it reads Events
// only once it knows the batch decoded (another sink may be decoding it meanwhile).
func (s *encodedSink) Write(_ context.Context, b *flow.Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.batches++
	if b.Undecoded() {
		s.undecoded++
	}
	if enc := b.Encoded(); enc != nil {
		s.encoded++
		evs, err := codec.Decode(nil, enc, b.Len())
		if err != nil {
			return flow.Permanent(err)
		}
		s.got = append(s.got, evs...)
		return nil
	}
	if err := b.Decode(); err != nil {
		return flow.Permanent(err)
	}
	s.got = append(s.got, b.Events...)
	return nil
}

type undecodedRun struct {
	src     *encodedSource
	sinks   map[string]*eventSink
	plugin  *encodedSink
	tapped  []flow.Event // a subscriber of the fan-out tap point
	ring    []flow.Event // the fan-out ring after the run
	srcRing []flow.Event // the source's ring after the run
	decodes int64        // batches decoded while the pipeline ran
}

// runUndecoded runs encodedSource into an encoded writer, an in-process sink with a disk
// queue and inproc in-process sinks, all writing at the same time; with subscribe, a
// subscriber taps the fan-out point. With enrich, an enricher runs before the sinks.
func runUndecoded(t *testing.T, encoded bool, source string, inproc int, enrich, subscribe bool) *undecodedRun {
	t.Helper()
	r := &undecodedRun{
		src:    &encodedSource{batches: 40, size: 100, encoded: encoded, source: source},
		sinks:  map[string]*eventSink{},
		plugin: &encodedSink{},
	}
	reg := component.NewRegistry()
	reg.Register(component.NewSourceFactory("enc", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Source, error) { return r.src, nil }))
	reg.Register(component.NewSinkFactory("rec", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Sink, error) { return r.sinks[env.Name], nil }))
	reg.Register(component.NewSinkFactory("encoded", "", func() *empty { return &empty{} },
		func(component.Env, *empty) (component.Sink, error) { return r.plugin, nil }))
	reg.Register(component.NewEnricherFactory("odd", "", func() *empty { return &empty{} },
		func(env component.Env, _ *empty) (component.Enricher, error) { return &oddFilter{env: env}, nil }))
	yaml := fmt.Sprintf("sources: {src: {type: enc}}\nsinks:\n  plugin: {type: encoded}\n  disk: {type: rec, queue: {type: disk, path: %q}}\n",
		filepath.Join(t.TempDir(), "q"))
	r.sinks["disk"] = &eventSink{}
	for i := range inproc {
		name := fmt.Sprintf("inproc%d", i)
		r.sinks[name] = &eventSink{}
		yaml += fmt.Sprintf("  %s: {type: rec}\n", name)
	}
	if enrich {
		yaml += "enrichers: [{type: odd}]\n"
	}
	doc, err := config.Load("pipeline.yaml", []byte(yaml), nil)
	if err != nil {
		t.Fatal(err)
	}
	taps := tap.NewRegistry(256)
	p, err := New(context.Background(), doc, Options{Registry: reg, Taps: taps})
	if err != nil {
		t.Fatal(err)
	}
	fan, _ := taps.Lookup(tap.Fanout)
	var sub *tap.Sub
	if subscribe {
		sub, _ = fan.Subscribe(nil, 1<<20, false, 0, 0)
	}
	if err := p.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.decodes = r.src.decodes.Load() // the rings decode what they kept only when read, below
	for sub != nil && len(r.tapped) < 4000 {
		recs, skipped, err := sub.Next(context.Background())
		if err != nil || skipped != 0 {
			t.Fatalf("tap: %v, %d skipped", err, skipped)
		}
		for _, rec := range recs {
			r.tapped = append(r.tapped, rec.Event)
		}
		if enrich && len(r.tapped) == 2000 {
			break
		}
	}
	if sub != nil {
		sub.Close()
	}
	for _, rec := range fan.Last(nil, 0, 0) {
		r.ring = append(r.ring, rec.Event)
	}
	srcHub, _ := taps.Lookup("src")
	for _, rec := range srcHub.Last(nil, 0, 0) {
		r.srcRing = append(r.srcRing, rec.Event)
	}
	return r
}

// The same events, emitted undecoded and decoded, reach every kind of sink (in process, in
// process behind a disk queue, an encoded writer beside them), a tap subscriber and the tap
// rings identically. With no subscriber the encoded writer gets every batch undecoded (the
// others decoded); a subscriber has them decoded, once, for every sink.
func TestUndecodedBatchesSameAsDecoded(t *testing.T) {
	for _, source := range []string{"src", ""} {
		t.Run("events name source "+fmt.Sprint(source != ""), func(t *testing.T) {
			want := runUndecoded(t, false, source, 1, false, true)
			got := runUndecoded(t, true, source, 1, false, false)
			tapped := runUndecoded(t, true, source, 1, false, true)
			alone := runUndecoded(t, true, source, 0, false, false) // no sink needs the events
			if !got.src.tookEncoded {
				t.Fatal("the runtime's Emitter is not a component.EncodedEmitter")
			}
			if len(want.plugin.got) != 4000 {
				t.Fatalf("decoded run: %d events, want 4000", len(want.plugin.got))
			}
			for name, s := range want.sinks {
				g := got.sinks[name]
				if !reflect.DeepEqual(g.got, s.got) {
					t.Errorf("sink %s: %d events undecoded, %d decoded, or they differ", name, len(g.got), len(s.got))
				}
				if g.undecoded != 0 {
					t.Errorf("sink %s: %d batches came undecoded to an in-process sink", name, g.undecoded)
				}
			}
			if !reflect.DeepEqual(got.plugin.got, want.plugin.got) || !reflect.DeepEqual(got.plugin.got, got.sinks["inproc0"].got) {
				t.Errorf("the encoded writer: %d events, differ from the decoded run's or from the in-process sink's", len(got.plugin.got))
			}
			if !reflect.DeepEqual(alone.plugin.got, want.plugin.got) || !reflect.DeepEqual(alone.sinks["disk"].got, want.plugin.got) {
				t.Errorf("with no in-process sink beside the disk queue: %d events to the encoded writer, %d through the disk queue, or other events",
					len(alone.plugin.got), len(alone.sinks["disk"].got))
			}
			if source != "" && (got.plugin.encoded != 40 || alone.plugin.undecoded != 40 || alone.plugin.encoded != 40) {
				t.Errorf("the encoded writer got %d of 40 batches with their encoding beside an in-process sink; alone, %d undecoded and %d with their encoding",
					got.plugin.encoded, alone.plugin.undecoded, alone.plugin.encoded)
			}
			if source != "" && alone.decodes != 0 {
				t.Errorf("%d batches decoded although no sink and no tap subscriber needed their events", alone.decodes)
			}
			if source == "" && alone.decodes != 40 {
				t.Errorf("%d of 40 batches whose events name no source decoded to stamp them", alone.decodes)
			}
			if source == "" && (got.plugin.encoded != 0 || alone.plugin.undecoded != 0) {
				t.Errorf("%d batches whose events name no source went on in their old encoding past StampSource (%d undecoded)", got.plugin.encoded, alone.plugin.undecoded)
			}
			if source == "" && got.plugin.got[0].Source != "src" {
				t.Errorf("the runtime did not stamp the source's name: %q", got.plugin.got[0].Source)
			}
			if !reflect.DeepEqual(tapped.tapped, want.tapped) || len(tapped.tapped) != 4000 {
				t.Errorf("the tap subscriber saw %d events undecoded, %d decoded, or they differ", len(tapped.tapped), len(want.tapped))
			}
			if tapped.plugin.undecoded != 0 || !reflect.DeepEqual(tapped.plugin.got, want.plugin.got) {
				t.Errorf("with a tap subscriber, the encoded writer got %d batches undecoded (want 0, the tap decoded them), or other events", tapped.plugin.undecoded)
			}
			for _, r := range []*undecodedRun{want, got, tapped, alone} {
				if !reflect.DeepEqual(r.ring, r.plugin.got[4000-256:]) || !reflect.DeepEqual(r.srcRing, r.ring) {
					t.Errorf("the tap rings hold %d and %d events, want the last 256 written", len(r.ring), len(r.srcRing))
				}
			}
			if ok := countNil(got.src.acks); ok != 40 || len(got.src.acks) != 40 {
				t.Errorf("%d of %d batches acknowledged as delivered, want 40", ok, len(got.src.acks))
			}
		})
	}
}

// Several sinks write one undecoded batch at once, each forcing its decoding: one decoding,
// the same events for all (run with -race). An enricher makes the batches decoded before the
// sinks, and the encoded writer then gets them decoded with the enricher's changes.
func TestUndecodedBatchDecodedOnceForConcurrentSinks(t *testing.T) {
	got := runUndecoded(t, true, "src", 4, false, false)
	if got.decodes != 40 {
		t.Errorf("40 batches decoded %d times for 4 in-process sinks, want once each", got.decodes)
	}
	for name, s := range got.sinks {
		if !reflect.DeepEqual(s.got, got.plugin.got) || len(s.got) != 4000 {
			t.Errorf("sink %s: %d events, or not the encoded writer's", name, len(s.got))
		}
	}
	en := runUndecoded(t, true, "src", 2, true, false)
	if en.plugin.undecoded != 0 || len(en.plugin.got) != 2000 {
		t.Fatalf("after an enricher the encoded writer got %d batches undecoded and %d events, want 0 and 2000",
			en.plugin.undecoded, len(en.plugin.got))
	}
	for _, e := range en.plugin.got {
		if e.TxPackets%2 != 0 {
			t.Fatalf("an event the enricher filtered out reached the encoded writer: %+v", e)
		}
	}
}

func countNil(errs []error) (n int) {
	for _, e := range errs {
		if e == nil {
			n++
		}
	}
	return n
}

// encoderSink stands in for a sink plugin (component.BatchEncoder): it encodes batches for
// every such sink when the runtime asks, and writes what the encoding holds.
type encoderSink struct {
	encodedSink
	encodes  *atomic.Int64 // EncodeBatch calls, of all encoderSinks
	releases *atomic.Int64
	without  int // batches written without an encoding
}

func (s *encoderSink) EncodeBatch(b *flow.Batch) ([]byte, func()) {
	s.encodes.Add(1)
	return codec.Append(nil, b.Events), func() { s.releases.Add(1) }
}

func (s *encoderSink) Write(ctx context.Context, b *flow.Batch) error {
	if b.Encoded() == nil {
		s.mu.Lock()
		s.without++
		s.mu.Unlock()
	}
	return s.encodedSink.Write(ctx, b)
}

// A batch without an encoding (from an in-process source, or changed by an enricher) is
// encoded once for every sink plugin (component.BatchEncoder) before the sinks share it: each
// plugin gets it with that encoding, a disk queue stores it, an in-process sink gets the
// events; the encoding's memory is given back once the batch is acknowledged. A batch that
// came encoded, unchanged, keeps its own.
func TestBatchEncodedOnceForEverySinkPlugin(t *testing.T) {
	for _, c := range []struct {
		name             string
		encoded, enrich  bool
		encodes, batches int64
	}{
		{"in-process source", false, false, 40, 40},
		{"enriched", true, true, 40, 40},
		{"came encoded", true, false, 0, 40},
	} {
		t.Run(c.name, func(t *testing.T) {
			var encodes, releases atomic.Int64
			src := &encodedSource{batches: 40, size: 100, encoded: c.encoded, source: "src"}
			plugins := []*encoderSink{{encodes: &encodes, releases: &releases}, {encodes: &encodes, releases: &releases}}
			inproc, disk := &eventSink{}, &eventSink{}
			reg := component.NewRegistry()
			reg.Register(component.NewSourceFactory("enc", "", func() *empty { return &empty{} },
				func(component.Env, *empty) (component.Source, error) { return src, nil }))
			reg.Register(component.NewSinkFactory("plugin", "", func() *empty { return &empty{} },
				func(env component.Env, _ *empty) (component.Sink, error) {
					return plugins[env.Name[len(env.Name)-1]-'0'], nil
				}))
			reg.Register(component.NewSinkFactory("rec", "", func() *empty { return &empty{} },
				func(env component.Env, _ *empty) (component.Sink, error) {
					if env.Name == "disk" {
						return disk, nil
					}
					return inproc, nil
				}))
			reg.Register(component.NewEnricherFactory("odd", "", func() *empty { return &empty{} },
				func(env component.Env, _ *empty) (component.Enricher, error) { return &oddFilter{env: env}, nil }))
			yaml := fmt.Sprintf(`sources: {src: {type: enc}}
sinks:
  p0: {type: plugin}
  p1: {type: plugin}
  inproc: {type: rec}
  disk: {type: rec, queue: {type: disk, path: %q}}
`, filepath.Join(t.TempDir(), "q"))
			if c.enrich {
				yaml += "enrichers: [{type: odd}]\n"
			}
			doc, err := config.Load("pipeline.yaml", []byte(yaml), nil)
			if err != nil {
				t.Fatal(err)
			}
			p, err := New(context.Background(), doc, Options{Registry: reg})
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Run(context.Background()); err != nil {
				t.Fatal(err)
			}
			if n := encodes.Load(); n != c.encodes {
				t.Errorf("%d encodings made for the two sink plugins, want %d (one per batch that had none)", n, c.encodes)
			}
			if n := releases.Load(); n != c.encodes {
				t.Errorf("%d of %d encodings given back after the batches' acknowledgement", n, c.encodes)
			}
			want := len(inproc.got)
			if want == 0 || len(disk.got) != want || !reflect.DeepEqual(disk.got, inproc.got) {
				t.Fatalf("the in-process sink wrote %d events, the one behind a disk queue %d, or others", want, len(disk.got))
			}
			for i, s := range plugins {
				if s.batches != int(c.batches) || s.without != 0 {
					t.Errorf("sink plugin p%d: %d batches, %d of them without an encoding; want %d and 0", i, s.batches, s.without, c.batches)
				}
				if !reflect.DeepEqual(s.got, inproc.got) {
					t.Errorf("sink plugin p%d: %d events, not the in-process sink's %d", i, len(s.got), want)
				}
			}
			if ok := countNil(src.acks); ok != 40 {
				t.Errorf("%d of 40 batches acknowledged as delivered", ok)
			}
		})
	}
}
