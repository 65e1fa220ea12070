// Package pipeline is flowpipe's runtime: it builds the components a pipeline.yaml names,
// runs sources, passes their batches through the enrichers in order and fans them out to
// every sink, each sink with its own bounded queue, retries and full-queue policy, and
// acknowledges a batch to its source only when every sink has accepted it. It owns the
// lifecycle: start, backpressure, and a shutdown that drains within a deadline and reports
// what could not be delivered.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/metrics"
	"github.com/flowpipe/flowpipe/core/options"
)

// Options configure how a pipeline is built.
type Options struct {
	Registry *component.Registry
	Logger   *slog.Logger // nil: slog.Default()
	Metrics  *metrics.Set // nil: a fresh set
	// Instantiate builds a component out of process (the plugin host sets it). It is called
	// for every component that names a plugin or asks for isolation: process; the others are
	// built in process from the registry. Nil builds everything in process and refuses
	// plugins.
	Instantiate func(ctx context.Context, spec config.Component, env component.Env) (any, error)
	// DefaultIsolation applies to built-in components that set no isolation:
	// "inproc" (when empty) or "process".
	DefaultIsolation string
}

// Pipeline is a built pipeline, ready to Run once.
type Pipeline struct {
	doc      *config.Document
	log      *slog.Logger
	metrics  *metrics.Set
	sources  []*sourceNode
	enrich   []*enricherNode
	sinks    []*sinkNode
	closers  []namedCloser
	stopping chan struct{}

	mu      sync.Mutex
	running bool
	started bool
}

type sourceNode struct {
	name   string
	src    component.Source
	m      *metrics.Component
	p      *Pipeline
	closed bool
}

type enricherNode struct {
	name string
	en   component.Enricher
	m    *metrics.Component
}

type namedCloser struct {
	name string
	c    any
}

// New builds every component of doc. Every problem in the components' options is reported
// together as config.Problems, positioned at its line.
func New(ctx context.Context, doc *config.Document, opts Options) (*Pipeline, error) {
	if opts.Registry == nil {
		return nil, errors.New("pipeline: Options.Registry is required")
	}
	p := &Pipeline{doc: doc, log: opts.Logger, metrics: opts.Metrics, stopping: make(chan struct{})}
	if p.log == nil {
		p.log = slog.Default()
	}
	if p.metrics == nil {
		p.metrics = metrics.New()
	}
	var probs config.Problems
	for _, spec := range doc.Sinks {
		settings := defaultSinkSettings()
		if f, ok := opts.Registry.Lookup(spec.Kind, spec.Type); ok && spec.Plugin == "" && f.InFlight > 0 {
			settings.InFlight = f.InFlight
		}
		opts2 := maps.Clone(spec.Options)
		rt := map[string]any{}
		for _, k := range sinkSettingKeys {
			if v, ok := opts2[k]; ok {
				rt[k] = v
				delete(opts2, k)
			}
		}
		probs = append(probs, doc.Problems(spec.Path, options.Check(rt, &settings, ""))...)
		spec.Options = opts2
		c, m, ps := p.build(ctx, spec, opts)
		probs = append(probs, ps...)
		if c == nil {
			continue
		}
		sink, ok := c.(component.Sink)
		if !ok {
			probs = append(probs, doc.Problem(spec.Path, "%s is not a sink", describeSpec(spec)))
			continue
		}
		p.sinks = append(p.sinks, newSinkNode(spec.Name, sink, settings, m, p.log))
	}
	for _, spec := range doc.Enrichers {
		c, m, ps := p.build(ctx, spec, opts)
		probs = append(probs, ps...)
		if c == nil {
			continue
		}
		en, ok := c.(component.Enricher)
		if !ok {
			probs = append(probs, doc.Problem(spec.Path, "%s is not an enricher", describeSpec(spec)))
			continue
		}
		p.enrich = append(p.enrich, &enricherNode{name: spec.Name, en: en, m: m})
	}
	for _, spec := range doc.Sources {
		c, m, ps := p.build(ctx, spec, opts)
		probs = append(probs, ps...)
		if c == nil {
			continue
		}
		src, ok := c.(component.Source)
		if !ok {
			probs = append(probs, doc.Problem(spec.Path, "%s is not a source", describeSpec(spec)))
			continue
		}
		p.sources = append(p.sources, &sourceNode{name: spec.Name, src: src, m: m, p: p})
	}
	if len(probs) > 0 {
		probs.Sort()
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		p.closeAll(cctx)
		return nil, probs
	}
	return p, nil
}

func describeSpec(spec config.Component) string {
	if spec.Plugin != "" {
		return fmt.Sprintf("plugin %q", spec.Plugin)
	}
	return fmt.Sprintf("type %q", spec.Type)
}

// build decodes and validates one component's options and builds it.
func (p *Pipeline) build(ctx context.Context, spec config.Component, opts Options) (any, *metrics.Component, config.Problems) {
	m := p.metrics.Component(spec.Name, string(spec.Kind))
	env := component.Env{
		Name: spec.Name, Kind: spec.Kind, Type: spec.Type, ConfigDir: p.doc.Dir, DataDir: p.doc.DataDir,
		Logger:     p.log.With(string(spec.Kind), spec.Name),
		Metrics:    m,
		Registerer: m.Registerer(),
	}
	var f component.Factory
	if spec.Plugin == "" {
		var ok bool
		if f, ok = opts.Registry.Lookup(spec.Kind, spec.Type); !ok {
			return nil, nil, config.Problems{p.doc.Problem(config.Join(spec.Path, "type"), "unknown %s type %q (known: %s)", spec.Kind, spec.Type, strings.Join(opts.Registry.Types(spec.Kind), ", "))}
		}
	}
	isolation := spec.Isolation
	switch {
	case f.Holds && isolation == "process":
		return nil, nil, config.Problems{p.doc.Problem(spec.Path, "enricher type %q keeps events across batches and runs only in process: set isolation: inproc", spec.Type)}
	case f.Holds:
		isolation = "inproc"
	case isolation == "":
		isolation = opts.DefaultIsolation
	}
	if spec.Plugin != "" || isolation == "process" {
		if opts.Instantiate == nil {
			return nil, nil, config.Problems{p.doc.Problem(spec.Path, "%s needs the plugin host, which this build does not have; use isolation: inproc", describeSpec(spec))}
		}
		c, err := opts.Instantiate(ctx, spec, env)
		if err != nil {
			return nil, nil, p.problemsFrom(spec.Path, err)
		}
		p.closers = append(p.closers, namedCloser{spec.Name, c})
		return c, m, nil
	}
	if spec.Process != nil {
		return nil, nil, config.Problems{p.doc.Problem(config.Join(spec.Path, "process"), "process: settings apply only to a component run out of process; remove them or drop isolation: inproc")}
	}
	c, err := f.Build(env, spec.Options)
	if err != nil {
		return nil, nil, p.problemsFrom(spec.Path, err)
	}
	p.closers = append(p.closers, namedCloser{spec.Name, c})
	return c, m, nil
}

func (p *Pipeline) problemsFrom(path string, err error) config.Problems {
	if errs, ok := options.FieldErrorsOf(err); ok {
		return p.doc.Problems(path, errs)
	}
	var ps config.Problems
	if errors.As(err, &ps) {
		return ps
	}
	return config.Problems{p.doc.Problem(path, "%v", err)}
}

// Metrics is the pipeline's metric set.
func (p *Pipeline) Metrics() *metrics.Set { return p.metrics }

// Ready reports nil when the pipeline is running and no sink or component reports failure.
func (p *Pipeline) Ready() error {
	p.mu.Lock()
	running := p.running
	p.mu.Unlock()
	if !running {
		return errors.New("pipeline is not running")
	}
	var errs []error
	for _, s := range p.sinks {
		if err := s.health(); err != nil {
			errs = append(errs, err)
		}
	}
	for _, c := range p.closers {
		if hc, ok := c.c.(component.HealthChecker); ok {
			if _, isSink := c.c.(component.Sink); isSink {
				continue // already asked through its sink node
			}
			if err := hc.Health(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", c.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Run runs the pipeline until ctx is cancelled or every source is exhausted, then shuts
// down: sources stop, enrichers flush, sink queues drain (within runtime.shutdown_timeout
// after ctx is cancelled), components close. Batches that could not be delivered are
// acknowledged with flow.ErrShutdown and reported in the log. The error is the first
// failure of a source or of a component's start.
func (p *Pipeline) Run(ctx context.Context) error {
	p.mu.Lock()
	if p.started {
		p.mu.Unlock()
		return errors.New("pipeline: Run called twice")
	}
	p.started = true
	p.mu.Unlock()

	// writeCtx bounds the sinks' work: cancelled shutdown_timeout after ctx is cancelled.
	writeCtx, cancelWrites := context.WithCancel(context.Background())
	defer cancelWrites()
	stopDeadline := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-stopDeadline:
			return
		}
		t := time.NewTimer(p.doc.Runtime.ShutdownTimeout)
		defer t.Stop()
		select {
		case <-t.C:
			p.log.Warn("shutdown timeout reached; giving up on undelivered batches", "timeout", p.doc.Runtime.ShutdownTimeout)
			cancelWrites()
		case <-stopDeadline:
		}
	}()
	defer close(stopDeadline)

	closeCtx := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), p.doc.Runtime.ShutdownTimeout)
	}

	// Start sinks, then enrichers, then sources.
	var startErr error
	for _, s := range p.sinks {
		if err := start(ctx, s.sink); err != nil {
			startErr = fmt.Errorf("start sink %s: %w", s.name, err)
			break
		}
	}
	if startErr == nil {
		for i, e := range p.enrich {
			if h, ok := e.en.(component.Holder); ok {
				h.Attach(&downstream{p: p, from: i + 1})
			}
			if err := start(ctx, e.en); err != nil {
				startErr = fmt.Errorf("start enricher %s: %w", e.name, err)
				break
			}
		}
	}
	if startErr == nil {
		for _, s := range p.sources {
			if err := start(ctx, s.src); err != nil {
				startErr = fmt.Errorf("start source %s: %w", s.name, err)
				break
			}
		}
	}
	if startErr != nil {
		c, cancel := closeCtx()
		defer cancel()
		p.closeAll(c)
		return startErr
	}

	for _, s := range p.sinks {
		s.start(writeCtx)
	}
	p.mu.Lock()
	p.running = true
	p.mu.Unlock()
	p.log.Info("pipeline running", "sources", len(p.sources), "enrichers", len(p.enrich), "sinks", len(p.sinks))

	// Run sources; the first failure stops the others.
	srcCtx, stopSources := context.WithCancel(ctx)
	defer stopSources()
	var wg sync.WaitGroup
	errc := make(chan error, len(p.sources))
	for _, s := range p.sources {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := s.src.Run(srcCtx, s)
			if err != nil && !errors.Is(err, context.Canceled) {
				s.m.Errors("run", 1)
				p.log.Error("source failed", "source", s.name, "error", err)
				errc <- fmt.Errorf("source %s: %w", s.name, err)
				stopSources()
				return
			}
			p.log.Debug("source stopped", "source", s.name)
		}()
	}
	wg.Wait()
	close(errc)
	runErr := <-errc
	close(p.stopping)
	if ctx.Err() != nil {
		p.log.Info("stopping: draining in-flight batches", "timeout", p.doc.Runtime.ShutdownTimeout)
	} else {
		p.log.Info("sources finished: draining in-flight batches")
	}

	// Flush holders (aggregation windows) in order, so that what they emit passes the later
	// stages, then drain the sinks.
	c, cancel := closeCtx()
	defer cancel()
	for _, e := range p.enrich {
		if h, ok := e.en.(component.Closer); ok {
			if err := h.Close(writeCtx); err != nil {
				p.log.Error("enricher close failed", "enricher", e.name, "error", err)
			}
		}
	}
	for _, s := range p.sinks {
		s.queue.close()
	}
	for _, s := range p.sinks {
		s.wg.Wait()
		for _, b := range s.queue.drainAll() {
			s.giveUp(b)
		}
		s.updateDepth()
	}
	p.mu.Lock()
	p.running = false
	p.mu.Unlock()
	lost := false
	for _, s := range p.sinks {
		if n := s.undelivered.Load(); n > 0 {
			lost = true
			p.log.Error("events not delivered before shutdown", "sink", s.name, "events", n)
		}
	}
	if !lost {
		p.log.Info("pipeline stopped; every accepted batch was delivered")
	}
	p.closeAll(c)
	return runErr
}

func start(ctx context.Context, c any) error {
	if s, ok := c.(component.Starter); ok {
		return s.Start(ctx)
	}
	return nil
}

// closeAll closes every component that was built (sources, then enrichers that are not
// holders, then sinks).
func (p *Pipeline) closeAll(ctx context.Context) {
	for _, s := range p.sources {
		p.closeOne(ctx, s.name, s.src)
	}
	for _, e := range p.enrich {
		if _, ok := e.en.(component.Holder); !ok {
			p.closeOne(ctx, e.name, e.en)
		}
	}
	for _, s := range p.sinks {
		p.closeOne(ctx, s.name, s.sink)
	}
	// Components that were built but never placed (a build error elsewhere).
	for _, c := range p.closers {
		if !p.placed(c.c) {
			p.closeOne(ctx, c.name, c.c)
		}
	}
}

func (p *Pipeline) placed(c any) bool {
	for _, s := range p.sources {
		if any(s.src) == c {
			return true
		}
	}
	for _, e := range p.enrich {
		if any(e.en) == c {
			return true
		}
	}
	for _, s := range p.sinks {
		if any(s.sink) == c {
			return true
		}
	}
	return false
}

func (p *Pipeline) closeOne(ctx context.Context, name string, c any) {
	if cl, ok := c.(component.Closer); ok {
		if err := cl.Close(ctx); err != nil {
			p.log.Error("close failed", "component", name, "error", err)
		}
	}
}

// Emit is the Emitter a source sees: enrichers, then fan-out to the sinks.
func (s *sourceNode) Emit(ctx context.Context, b *flow.Batch) error {
	n := len(b.Events)
	s.m.Out.Add(float64(n))
	if b.Source == "" {
		b.Source = s.name
	}
	for i := range b.Events {
		if b.Events[i].Source == "" {
			b.Events[i].Source = s.name
		}
	}
	start := time.Now()
	lat := s.m.AckLat
	b.Observe(func(error) { lat.Observe(time.Since(start).Seconds()) })
	return s.p.emitFrom(ctx, 0, b)
}

// downstream is the Emitter a holder enricher sees: the stages after it.
type downstream struct {
	p    *Pipeline
	from int
}

func (d *downstream) Emit(ctx context.Context, b *flow.Batch) error {
	return d.p.emitFrom(ctx, d.from, b)
}

// emitFrom runs enrichers from index i on, then hands b to every sink, and gives up the
// caller's reference.
func (p *Pipeline) emitFrom(ctx context.Context, i int, b *flow.Batch) error {
	for ; i < len(p.enrich); i++ {
		e := p.enrich[i]
		in := len(b.Events)
		e.m.In.Add(float64(in))
		if err := e.en.Enrich(ctx, b); err != nil {
			e.m.Errors("enrich", 1)
			e.m.Dropped("enrich_error", in)
			p.log.Error("enricher failed a batch", "enricher", e.name, "events", in, "error", err)
			b.Release(fmt.Errorf("enricher %s: %w", e.name, err))
			return nil
		}
		e.m.Out.Add(float64(len(b.Events)))
		if len(b.Events) == 0 {
			break
		}
	}
	if len(b.Events) == 0 {
		b.Release(nil)
		return nil
	}
	var err error
	for _, s := range p.sinks {
		if e := s.enqueue(ctx, b); e != nil && err == nil {
			err = e
		}
	}
	b.Release(nil)
	return err
}

// Close releases every component of a pipeline that will not Run (after validation).
func (p *Pipeline) Close(ctx context.Context) {
	p.mu.Lock()
	started := p.started
	p.started = true
	p.mu.Unlock()
	if !started {
		p.closeAll(ctx)
	}
}
