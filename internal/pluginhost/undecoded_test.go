package pluginhost

import (
	"context"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// encodedForwarder is a pipeline that takes batches undecoded (component.EncodedEmitter), as
// the runtime does: it writes each batch to a sink plugin as it came, then, when inproc is
// set, decodes it for an in-process sink, as the runtime does before the Write of a sink
// that is not a component.EncodedWriter.
type encodedForwarder struct {
	plugin component.Sink
	inproc []flow.Event // what the in-process sink wrote

	batches, undecoded, undecodedAfterPlugin int
	decodeInproc                             bool
}

func (e *encodedForwarder) TakesEncoded() {}

func (e *encodedForwarder) Emit(ctx context.Context, b *flow.Batch) error {
	e.batches++
	if b.Undecoded() {
		e.undecoded++
	}
	if _, ok := e.plugin.(component.EncodedWriter); !ok {
		b.Release(fmt.Errorf("the plugin host's sink is not a component.EncodedWriter"))
		return nil
	}
	err := e.plugin.Write(ctx, b)
	if b.Undecoded() {
		e.undecodedAfterPlugin++
	}
	if err == nil && e.decodeInproc {
		if err = b.Decode(); err == nil {
			e.inproc = append(e.inproc, b.Events...)
		}
	}
	b.Release(err)
	return nil
}

// A source plugin's batch reaches the pipeline undecoded when the pipeline takes it so; a
// sink plugin is sent it without the host decoding it; an in-process sink beside it gets
// the same events decoded. The sink plugin writes exactly the source's events.
func TestUndecodedFromSourcePluginToSinks(t *testing.T) {
	sf := newFixture(t, component.KindSink, "out")
	path := filepath.Join(t.TempDir(), "out.jsonl")
	sc := sf.started(t, "jsonl", map[string]any{"path": path})
	f := newFixture(t, component.KindSource, "seq")
	c := f.started(t, "seq", map[string]any{"count": 3000, "batch": 500})
	before := passedThrough.Load()
	out := &encodedForwarder{plugin: sc.(component.Sink), decodeInproc: true}
	if err := c.(component.Source).Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	if err := sc.(component.Closer).Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if out.batches != 6 || out.undecoded != 6 || out.undecodedAfterPlugin != 6 {
		t.Fatalf("%d batches, %d undecoded as they came, %d still undecoded after the sink plugin's Write; want 6, 6, 6",
			out.batches, out.undecoded, out.undecodedAfterPlugin)
	}
	if passed := passedThrough.Load() - before; passed != 6 {
		t.Errorf("%d batches passed through to the sink plugin, want 6", passed)
	}
	lines := readLines(t, path)
	if len(lines) != 3000 || len(out.inproc) != 3000 {
		t.Fatalf("the sink plugin wrote %d lines, the in-process sink %d events; want 3000", len(lines), len(out.inproc))
	}
	for i, l := range lines {
		e := testpluginEvent(i)
		if want := string(flow.AppendJSON(nil, &e)); l != want {
			t.Fatalf("sink plugin, line %d:\n got %s\nwant %s", i, l, want)
		}
		if !reflect.DeepEqual(out.inproc[i], e) {
			t.Fatalf("in-process sink, event %d:\n got %+v\nwant %+v", i, out.inproc[i], e)
		}
	}
}

// threeBatches emits three batches of 100 events and records how each was acknowledged.
type threeBatches struct {
	mu   sync.Mutex
	acks map[int]error
}

func (s *threeBatches) Run(ctx context.Context, out component.Emitter) error {
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		b := flow.NewBatch(seqEvents(i*100, 100), func(err error) {
			s.mu.Lock()
			s.acks[i] = err
			s.mu.Unlock()
			wg.Done()
		})
		if err := out.Emit(ctx, b); err != nil {
			return err
		}
	}
	wg.Wait()
	return nil
}

// corruptSecondBatch is the plugin side's stream interceptor that damages the payload of
// the second source batch it sends, keeping the message itself well formed (as a plugin
// with a bug in its encoder, or memory corruption, would send it): the first event's source
// address gets an address tag that does not exist.
func corruptSecondBatch(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, &corruptingStream{ServerStream: ss})
}

type corruptingStream struct {
	grpc.ServerStream
	batches int
}

func (s *corruptingStream) SendMsg(m any) error {
	if msg, ok := m.(*pb.SourceMessage); ok {
		if b := msg.GetBatch(); b != nil {
			s.batches++
			if s.batches == 2 {
				enc := append([]byte(nil), b.Batch.Events...)
				enc[1+32+5+4+8+4] = 99 // version byte, the event's fixed part, then the tag
				b.Batch.Events = enc
			}
		}
	}
	return s.ServerStream.SendMsg(m)
}

// A source plugin's batch that is well framed but whose events do not decode is refused to
// the source with the reason, counted as dropped (plugin_bad_batch), and never reaches the
// sink plugin, in whole or in part, although the host passes batches on undecoded; the
// batches before and after it are written.
func TestMalformedSourceBatchNeverReachesSinkPlugin(t *testing.T) {
	t.Setenv(pb.DataChannelEnv, "off") // the interceptor sees the batches on gRPC
	sf := newFixture(t, component.KindSink, "out")
	path := filepath.Join(t.TempDir(), "out.jsonl")
	sc := sf.started(t, "jsonl", map[string]any{"path": path})
	src := &threeBatches{acks: map[int]error{}}
	fac := component.NewSourceFactory("three", "", func() *discardConfig { return &discardConfig{} },
		func(component.Env, *discardConfig) (component.Source, error) { return src, nil })
	m := &counts{}
	c, err := serveInMemory(context.Background(), fac, "test", nil, component.Env{Metrics: m}, grpc.StreamInterceptor(corruptSecondBatch))
	if err != nil {
		t.Fatal(err)
	}
	defer c.(component.Closer).Close(context.Background())
	out := &encodedForwarder{plugin: sc.(component.Sink)}
	if err := c.(component.Source).Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	if err := sc.(component.Closer).Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if out.batches != 2 || out.undecoded != 2 {
		t.Fatalf("the pipeline got %d batches (%d undecoded), want the 2 good ones, undecoded", out.batches, out.undecoded)
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	if src.acks[0] != nil || src.acks[2] != nil {
		t.Errorf("the good batches were acknowledged with %v and %v, want nil", src.acks[0], src.acks[2])
	}
	if err := src.acks[1]; err == nil || !strings.Contains(err.Error(), "host could not decode the batch") || !strings.Contains(err.Error(), "bad address tag 99") {
		t.Errorf("the malformed batch was acknowledged with %v, want the host's refusal with the reason", err)
	}
	if n := m.get("dropped/plugin_bad_batch"); n != 100 {
		t.Errorf("dropped/plugin_bad_batch = %d, want the malformed batch's 100 events", n)
	}
	lines := readLines(t, path)
	if len(lines) != 200 {
		t.Fatalf("the sink plugin wrote %d lines, want the 200 of the good batches", len(lines))
	}
	for i, l := range lines {
		e := testEvent(i)
		if i >= 100 {
			e = testEvent(i + 100)
		}
		if want := string(flow.AppendJSON(nil, &e)); l != want {
			t.Fatalf("line %d:\n got %s\nwant %s", i, l, want)
		}
	}
}

// encodedBatches emits its events as batches still encoded (flow.NewEncodedBatch), as a
// source may build them.
type encodedBatches struct{}

func (encodedBatches) Run(ctx context.Context, out component.Emitter) error {
	for i := range 2 {
		evs := seqEvents(i*50, 50)
		if err := out.Emit(ctx, flow.NewEncodedBatch(codec.Append(nil, evs), len(evs), true, codec.Decode, nil)); err != nil {
			return err
		}
	}
	return nil
}

// A source plugin that builds its batches still encoded loses nothing: the plugin side
// decodes them to send them, and the host gets every event.
func TestSourcePluginEmittingEncodedBatches(t *testing.T) {
	fac := component.NewSourceFactory("enc", "", func() *discardConfig { return &discardConfig{} },
		func(component.Env, *discardConfig) (component.Source, error) { return encodedBatches{}, nil })
	c, err := ServeInMemory(context.Background(), fac, "test", nil, component.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.(component.Closer).Close(context.Background())
	var got []flow.Event
	out := emitFunc(func(b *flow.Batch) {
		got = append(got, b.Events...)
		b.Release(nil)
	})
	if err := c.(component.Source).Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	if want := seqEvents(0, 100); !reflect.DeepEqual(got, want) {
		t.Fatalf("the host got %d events, want the source's 100 as they were", len(got))
	}
}

// The runtime has a batch without an encoding encoded once for every sink plugin
// (component.BatchEncoder): the sink plugin sends that encoding as it is, counted apart from
// batches that passed through, and a batch too large for one message is left to Write,
// which cuts it into parts.
func TestEncodeBatchForSinkPlugins(t *testing.T) {
	f := newFixture(t, component.KindSink, "out")
	path := filepath.Join(t.TempDir(), "out.jsonl")
	c := f.started(t, "jsonl", map[string]any{"path": path})
	enc, ok := c.(component.BatchEncoder)
	if !ok {
		t.Fatal("a sink plugin is not a component.BatchEncoder")
	}
	evs := seqEvents(0, 1000)
	b := flow.NewBatch(evs, nil)
	data, release := enc.EncodeBatch(b)
	if data == nil {
		t.Fatal("no encoding for a batch that fits one message")
	}
	b.SetEncoded(data)
	made, passed := encodedOnce.Load(), passedThrough.Load()
	if err := c.(component.Sink).Write(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	release()
	if made, passed := encodedOnce.Load()-made, passedThrough.Load()-passed; made != 1 || passed != 0 {
		t.Errorf("%d batches sent in the encoding made for the sinks, %d counted as passed through; want 1 and 0", made, passed)
	}
	defer func(size int) { pb.SplitSize = size }(pb.SplitSize)
	pb.SplitSize = 64 << 10 // the host's parts; the plugin takes messages up to its own limit
	big := make([]flow.Event, 3)
	for i := range big {
		big[i] = testEvent(i)
		big[i].RuleID = strings.Repeat("r", pb.SplitSize/2) // three of them exceed one message
	}
	if data, _ := enc.EncodeBatch(flow.NewBatch(big, nil)); data != nil {
		t.Errorf("an encoding of %d bytes for a batch that needs more than one message", len(data))
	}
	if err := c.(component.Sink).Write(context.Background(), flow.NewBatch(big, nil)); err != nil {
		t.Fatal(err)
	}
	if err := c.(component.Closer).Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	lines := readLines(t, path)
	if len(lines) != 1003 || lines[0] != string(flow.AppendJSON(nil, &evs[0])) || lines[999] != string(flow.AppendJSON(nil, &evs[999])) {
		t.Fatalf("%d lines written, want the 1,000 events then the 3 large ones", len(lines))
	}
}
