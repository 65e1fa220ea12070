package plugintest

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/sdk"
)

type memConfig struct {
	Prefix string `yaml:"prefix" required:"true"`
}

type memSink struct {
	cfg *memConfig
	mu  sync.Mutex
	got []string
}

func (s *memSink) Write(_ context.Context, b *flow.Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range b.Events {
		s.got = append(s.got, s.cfg.Prefix+e.RuleID)
	}
	return nil
}

func TestSinkThroughTheProtocol(t *testing.T) {
	var built *memSink
	build := func(_ component.Env, c *memConfig) (component.Sink, error) {
		built = &memSink{cfg: c}
		return built, nil
	}
	info := sdk.Info{Type: "mem", Version: "1"}
	sink := Sink(t, info, func() *memConfig { return &memConfig{} }, build, map[string]any{"prefix": "p-"})
	evs := []flow.Event{{RuleID: "a"}, {RuleID: "b"}}
	if err := sink.Write(context.Background(), flow.NewBatch(evs, nil)); err != nil {
		t.Fatal(err)
	}
	if strings.Join(built.got, ",") != "p-a,p-b" {
		t.Fatalf("sink got %q", built.got)
	}

	_, err := Start(t, component.NewSinkFactory("mem", "", func() *memConfig { return &memConfig{} }, build), map[string]any{"prefx": "x"}, nil)
	var fe options.FieldErrors
	if !errors.As(err, &fe) || !strings.Contains(fe.Error(), "prefx") {
		t.Fatalf("got %v, want field errors naming prefx", err)
	}
}

type seqConfig struct {
	Count int `yaml:"count"`
}

type seq struct{ n int }

func (s *seq) Run(ctx context.Context, out component.Emitter) error {
	var wg sync.WaitGroup
	for i := 0; i < s.n; i += 10 {
		evs := make([]flow.Event, 10)
		for j := range evs {
			evs[j].SrcPort = uint16(i + j)
		}
		wg.Add(1)
		if err := out.Emit(ctx, flow.NewBatch(evs, func(error) { wg.Done() })); err != nil {
			return err
		}
	}
	wg.Wait()
	return nil
}

func TestSourceAcks(t *testing.T) {
	src := Source(t, sdk.Info{Type: "seq"}, func() *seqConfig { return &seqConfig{} },
		func(_ component.Env, c *seqConfig) (component.Source, error) { return &seq{n: c.Count}, nil },
		map[string]any{"count": 100})
	evs := Collect(t, src, 0, nil)
	if len(evs) != 100 || evs[99].SrcPort != 99 {
		t.Fatalf("got %d events", len(evs))
	}
}

// reSink is a third-party sink that takes new options while it runs.
type reSink struct {
	mu  sync.Mutex
	cfg *memConfig
	got []string
}

func (s *reSink) Write(_ context.Context, b *flow.Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range b.Events {
		s.got = append(s.got, s.cfg.Prefix+e.RuleID)
	}
	return nil
}

func (s *reSink) Reconfigure(_ context.Context, raw map[string]any) error {
	c := &memConfig{}
	if errs := options.Check(raw, c, ""); len(errs) > 0 {
		return errs
	}
	s.mu.Lock()
	s.cfg = c
	s.mu.Unlock()
	return nil
}

// TestSinkReconfigure: a plugin's component that implements component.Reconfigurer gets a
// reload's new options through the protocol; problems come back at their keys.
func TestSinkReconfigure(t *testing.T) {
	built := &reSink{}
	sink := Sink(t, sdk.Info{Type: "re", Version: "1"}, func() *memConfig { return &memConfig{} },
		func(_ component.Env, c *memConfig) (component.Sink, error) { built.cfg = c; return built, nil },
		map[string]any{"prefix": "a-"})
	rc, ok := sink.(component.Reconfigurer)
	if !ok {
		t.Fatal("the plugin's sink does not implement component.Reconfigurer on the host's side")
	}
	if err := rc.Reconfigure(context.Background(), map[string]any{"prefix": "b-"}); err != nil {
		t.Fatal(err)
	}
	err := rc.Reconfigure(context.Background(), map[string]any{"prefx": "c-"})
	fe, ok := options.FieldErrorsOf(err)
	if !ok || len(fe) != 2 || errors.Is(err, component.ErrRestartNeeded) {
		t.Fatalf("got %v, want problems at prefx and prefix", err)
	}
	if err := sink.Write(context.Background(), flow.NewBatch([]flow.Event{{RuleID: "x"}}, nil)); err != nil {
		t.Fatal(err)
	}
	if strings.Join(built.got, ",") != "b-x" {
		t.Fatalf("sink wrote %q, want b-x (the options it took, not the refused ones)", built.got)
	}
}

// TestSinkCheckOptions: the host asks a running plugin to check options (a reload does,
// before it changes anything); problems come back at their keys, and nothing changes.
func TestSinkCheckOptions(t *testing.T) {
	built := &memSink{}
	sink := Sink(t, sdk.Info{Type: "mem", Version: "1"}, func() *memConfig { return &memConfig{} },
		func(_ component.Env, c *memConfig) (component.Sink, error) { built.cfg = c; return built, nil },
		map[string]any{"prefix": "a-"})
	oc, ok := sink.(component.OptionsChecker)
	if !ok {
		t.Fatal("the plugin's sink does not implement component.OptionsChecker on the host's side")
	}
	if err := oc.CheckOptions(context.Background(), map[string]any{"prefix": "b-"}); err != nil {
		t.Fatalf("good options: %v", err)
	}
	err := oc.CheckOptions(context.Background(), map[string]any{"prefx": "c-"})
	fe, ok := options.FieldErrorsOf(err)
	if !ok || len(fe) != 2 {
		t.Fatalf("got %v, want problems at prefx and prefix", err)
	}
	paths := []string{fe[0].Path, fe[1].Path}
	slices.Sort(paths)
	if !slices.Equal(paths, []string{"prefix", "prefx"}) {
		t.Fatalf("problems at %v, want prefix and prefx", paths)
	}
	if err := sink.Write(context.Background(), flow.NewBatch([]flow.Event{{RuleID: "x"}}, nil)); err != nil {
		t.Fatal(err)
	}
	if strings.Join(built.got, ",") != "a-x" {
		t.Fatalf("sink wrote %q, want a-x (a check changes nothing)", built.got)
	}
}
