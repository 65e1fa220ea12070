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
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/metrics"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/core/tap"
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
	// Taps holds the tap points (nil: a fresh registry with no ring). Pass the same registry
	// to a reloaded pipeline and taps of the components it keeps go on.
	Taps *tap.Registry
}

// Pipeline is a built pipeline, ready to Run once; while it runs, Reload changes it.
type Pipeline struct {
	opts    Options
	docp    atomic.Pointer[config.Document]
	log     *slog.Logger
	metrics *metrics.Set
	taps    *tap.Registry
	fanout  *tap.Hub // batches handed to the sinks

	topo atomic.Pointer[topology] // the stages batches go through now

	mu        sync.Mutex
	sources   []*sourceNode // the sources now
	parts     []*part       // every component built, in build order
	sinksEver []*sinkNode   // every sink node, current and retired (Undelivered counts all)
	diskStats map[string]*diskStat
	running   bool
	started   bool

	// reloadMu serialises Reload, and Reload with Run's start and shutdown.
	reloadMu sync.Mutex
	rs       *runState // Run's, while it runs
	closing  bool      // Run is shutting down: no reload any more

	slotsMu sync.Mutex
	slots   map[string]*uncheckedSlot // by "kind/name": see trackReg

	stopping chan struct{}
	runningc chan struct{} // closed once every component started (Running)

	abortOnce sync.Once
	abort     chan struct{} // closed by Abort
	failed    atomic.Int64  // events an enricher failed (acknowledged with its error)
}

// runState is what Run shares with Reload while it runs.
type runState struct {
	ctx      context.Context // Run's: cancelled when the pipeline is told to stop
	stopRun  context.CancelFunc
	writeCtx context.Context // the sinks' writes: cancelled at the shutdown deadline
	srcCtx   context.Context
	srcWG    sync.WaitGroup
	errc     chan error    // the first source failure
	done     chan struct{} // closed when the last running source ran out by itself
	doneOnce sync.Once
	active   int // sources running (under Pipeline.mu)
}

type sourceNode struct {
	name string
	spec config.Component
	src  component.Source
	part *part
	m    *metrics.Component
	p    *Pipeline
	tap  *tap.Hub

	out outstanding // batches emitted and not yet acknowledged
	// ectx is what its batches wait under for room in the sinks' queues: the drain
	// deadline's, not the source's own, so that neither a reload that stops the source nor
	// a shutdown gives up a batch it had emitted while the drain still has time (a batch
	// waiting for room in a full queue when SIGTERM comes is delivered, or given up and
	// counted at runtime.shutdown_timeout).
	ectx context.Context
	// enrichCtx is what enrichers' calls on its batches run under: the drain deadline's, so
	// that a batch being enriched when the pipeline stops is not failed by the stop (for a
	// plugin the call is an RPC that a cancelled context ends).
	enrichCtx context.Context
	cancel    context.CancelFunc
	done      chan struct{} // closed when Run returned
	stopped   atomic.Bool   // stopped by a reload, not run out

	piped piped // its batches whose enrichment runs elsewhere (component.Pipeliner)
}

// pipedDepth is how many of a source's batches may be in an out-of-process enricher at once:
// while the plugin enriches one, the source makes the next and the host encodes it, or
// decodes the answer to the one before. Three rather than two: a quarter fewer context
// switches and no slower (docs/benchmarks.md).
const pipedDepth = 3

// piped carries a source's batches from a Pipeliner's StartEnrich (in Emit) to the rest of
// their way (finish, the later enrichers, the sinks' queues), in order, on one goroutine.
type piped struct {
	open  sync.RWMutex  // held to send; flushPiped takes it to close q
	slots chan struct{} // one per batch started and not finished: pipedDepth at most
	mu    sync.Mutex
	q     chan pipedBatch
	done  chan struct{} // closed when the goroutine has carried every batch
	err   error         // the first error a batch's way ended with: Emit returns it
}

type pipedBatch struct {
	t              *topology
	i              int // the enricher that starts it
	pl             component.Pipeliner
	b              *flow.Batch
	finish         func() error
	ctx, enrichCtx context.Context
}

// push starts pb's enrichment once fewer than pipedDepth of the source's batches are in
// flight, and hands pb to the goroutine that finishes them in order (started with the
// first). It returns the error an earlier batch's way ended with, if any.
func (s *sourceNode) push(pb pipedBatch) error {
	s.piped.open.RLock()
	defer s.piped.open.RUnlock()
	s.piped.mu.Lock()
	if s.piped.q == nil {
		s.piped.slots = make(chan struct{}, pipedDepth)
		s.piped.q = make(chan pipedBatch, pipedDepth)
		s.piped.done = make(chan struct{})
		go s.carry(s.piped.q, s.piped.slots, s.piped.done)
	}
	q, slots, err := s.piped.q, s.piped.slots, s.piped.err
	s.piped.mu.Unlock()
	slots <- struct{}{} // freed by the goroutine, which never waits on Emit
	if pb.i < 0 {
		// Its whole way after the batches before it (Emit, busy): emitUntilPiped on the
		// goroutine, then finishFrom for a Pipeliner it meets.
		q <- pb
		return err
	}
	pb.finish = pb.pl.StartEnrich(pb.enrichCtx, pb.b)
	q <- pb // never full: a slot is taken first
	return err
}

func (s *sourceNode) carry(q chan pipedBatch, slots chan struct{}, done chan struct{}) {
	defer close(done)
	for pb := range q {
		err := s.p.finishFrom(pb)
		<-slots
		pb.t.release()
		if err != nil {
			s.piped.mu.Lock()
			if s.piped.err == nil {
				s.piped.err = err
			}
			s.piped.mu.Unlock()
		}
	}
}

// pipelines: one of t's enrichers works elsewhere (component.Pipeliner).
func (t *topology) pipelines() bool {
	for _, e := range t.enrich {
		if _, ok := e.en.(component.Pipeliner); ok {
			return true
		}
	}
	return false
}

// busy: a batch of the source is between a Pipeliner's start and the sinks' queues.
func (s *sourceNode) busy() bool {
	s.piped.mu.Lock()
	defer s.piped.mu.Unlock()
	return s.piped.slots != nil && len(s.piped.slots) > 0
}

// flushPiped waits until every batch pushed is on its way to the sinks (once Run returned,
// before the source counts as stopped).
func (s *sourceNode) flushPiped() {
	s.piped.open.Lock()
	s.piped.mu.Lock()
	q, done := s.piped.q, s.piped.done
	s.piped.q, s.piped.err = nil, nil
	s.piped.mu.Unlock()
	if q != nil {
		close(q)
	}
	s.piped.open.Unlock()
	if q != nil {
		<-done
	}
}

type enricherNode struct {
	name string
	spec config.Component
	en   component.Enricher
	part *part
	m    *metrics.Component
	tap  *tap.Hub
	// via is the topology a removed holder flushes through while it closes.
	via atomic.Pointer[topology]
}

// part is one built component: started in order, closed exactly once.
type part struct {
	name   string
	kind   component.Kind
	c      any
	reg    *trackReg
	closed bool
}

// New builds every component of doc. Every problem in the components' options is reported
// together as config.Problems, positioned at its line. A disabled component (enabled: false)
// is checked but not built; so is every component of a disabled pipeline.
func New(ctx context.Context, doc *config.Document, opts Options) (*Pipeline, error) {
	if opts.Registry == nil {
		return nil, errors.New("pipeline: Options.Registry is required")
	}
	p := &Pipeline{opts: opts, log: opts.Logger, metrics: opts.Metrics, stopping: make(chan struct{}), runningc: make(chan struct{}), abort: make(chan struct{}), diskStats: map[string]*diskStat{}}
	p.docp.Store(doc)
	if p.log == nil {
		p.log = slog.Default()
	}
	if p.metrics == nil {
		p.metrics = metrics.New()
	}
	p.taps = opts.Taps
	if p.taps == nil {
		p.taps = tap.NewRegistry(0)
	}
	p.fanout = p.taps.Point(tap.Fanout, "fanout")
	pl, probs := p.plan(ctx, doc, nil)
	if len(probs) > 0 {
		probs.Sort()
		p.closeParts(pl.built)
		return nil, probs
	}
	p.parts = pl.built
	p.sinksEver = pl.sinks
	p.sources = pl.sources
	p.topo.Store(newTopology(pl.enrich, pl.sinks))
	return p, nil
}

// Document is the pipeline file the pipeline runs now (the last one Reload applied).
func (p *Pipeline) Document() *config.Document { return p.docp.Load() }

func (p *Pipeline) shutdownTimeout() time.Duration {
	if t := p.Document().Runtime.ShutdownTimeout; t > 0 {
		return t
	}
	return config.DefaultShutdownTimeout
}

// sinkSpec splits a sink's options into the runtime's settings (checked) and its own.
func (p *Pipeline) sinkSpec(doc *config.Document, spec config.Component, queueDirs map[string]string) (SinkSettings, map[string]any, string, config.Problems) {
	settings := defaultSinkSettings()
	if f, ok := p.opts.Registry.Lookup(spec.Kind, spec.Type); ok && spec.Plugin == "" && f.InFlight > 0 {
		settings.InFlight = f.InFlight
	}
	own := maps.Clone(spec.Options)
	rt := map[string]any{}
	for _, k := range sinkSettingKeys {
		if v, ok := own[k]; ok {
			rt[k] = v
			delete(own, k)
		}
	}
	errs := options.Check(rt, &settings, "")
	errs = append(errs, queueKeyErrors(rt, settings.Queue.Type)...)
	var qdir string
	if len(errs) == 0 && settings.Queue.Type == QueueDisk {
		qdir = queueDir(doc, spec.Name, settings.Queue)
		if other, ok := queueDirs[qdir]; ok {
			errs.Add("queue.path", "%s is already sink %s's queue; every sink needs its own", qdir, other)
		} else if err := checkQueueDir(qdir); err != nil {
			errs.Add("queue.path", "%s: %v", qdir, err)
		}
		queueDirs[qdir] = spec.Name
	}
	return settings, own, qdir, doc.Problems(spec.Path, errs)
}

// checkDisabled checks what can be checked of a component that is not built: its type and,
// for a built-in, its options.
func (p *Pipeline) checkDisabled(doc *config.Document, spec config.Component) config.Problems {
	if spec.Plugin != "" {
		return nil
	}
	f, ok := p.opts.Registry.Lookup(spec.Kind, spec.Type)
	if !ok {
		return config.Problems{doc.Problem(config.Join(spec.Path, "type"), "unknown %s type %q (known: %s)", spec.Kind, spec.Type, strings.Join(p.opts.Registry.Types(spec.Kind), ", "))}
	}
	return doc.Problems(spec.Path, options.Check(spec.Options, f.NewConfig(), ""))
}

// newSink builds a sink node from its spec (runtime settings already split off).
func (p *Pipeline) newSink(ctx context.Context, doc *config.Document, spec config.Component, settings SinkSettings, own map[string]any, qdir string, live bool) (*sinkNode, *part, config.Problems) {
	pt, m, probs := p.buildSinkPart(ctx, doc, spec, own, live)
	if len(probs) > 0 {
		return nil, pt, probs
	}
	node := newSinkNode(spec.Name, pt.c.(component.Sink), pt, settings, m, p.log)
	p.dressSink(node, spec, own, qdir)
	return node, pt, nil
}

// dressSink gives a sink node what it has beside its component: its spec, tap point and
// queue (a memory queue unless qdir names a disk queue's directory).
func (p *Pipeline) dressSink(node *sinkNode, spec config.Component, own map[string]any, qdir string) {
	node.spec, node.own, node.qdir = spec, own, qdir
	node.tap = p.taps.Point(spec.Name, "sink")
	if qdir != "" {
		node.queue = p.newDiskSinkQueue(node, qdir)
	}
}

func (p *Pipeline) buildSinkPart(ctx context.Context, doc *config.Document, spec config.Component, own map[string]any, live bool) (*part, *metrics.Component, config.Problems) {
	bspec := spec
	bspec.Options = own
	pt, m, probs := p.build(ctx, doc, bspec, live)
	if pt == nil {
		return nil, nil, probs
	}
	if _, ok := pt.c.(component.Sink); !ok {
		return pt, nil, config.Problems{doc.Problem(spec.Path, "%s is not a sink", describeSpec(spec))}
	}
	return pt, m, nil
}

func (p *Pipeline) newEnricher(ctx context.Context, doc *config.Document, spec config.Component, live bool) (*enricherNode, *part, config.Problems) {
	pt, m, probs := p.build(ctx, doc, spec, live)
	if pt == nil {
		return nil, nil, probs
	}
	en, ok := pt.c.(component.Enricher)
	if !ok {
		return nil, pt, config.Problems{doc.Problem(spec.Path, "%s is not an enricher", describeSpec(spec))}
	}
	node := &enricherNode{name: spec.Name, spec: spec, en: en, part: pt, m: m, tap: p.taps.Point(spec.Name, "enricher")}
	if h, ok := en.(component.Holder); ok {
		h.Attach(&downstream{p: p, node: node}) // what it emits passes the stages after it
	}
	return node, pt, nil
}

func (p *Pipeline) newSource(ctx context.Context, doc *config.Document, spec config.Component, live bool) (*sourceNode, *part, config.Problems) {
	pt, m, probs := p.build(ctx, doc, spec, live)
	if pt == nil {
		return nil, nil, probs
	}
	src, ok := pt.c.(component.Source)
	if !ok {
		return nil, pt, config.Problems{doc.Problem(spec.Path, "%s is not a source", describeSpec(spec))}
	}
	return &sourceNode{name: spec.Name, spec: spec, src: src, part: pt, m: m, p: p, tap: p.taps.Point(spec.Name, "source")}, pt, nil
}

// queueKeyErrors reports queue keys that do not apply to the chosen queue type.
func queueKeyErrors(rt map[string]any, typ string) config.FieldErrors {
	var errs config.FieldErrors
	raw, _ := rt["queue"].(map[string]any)
	memOnly := []string{"max_events", "max_batches"}
	diskOnly := []string{"path", "max_size", "sync", "sync_interval"}
	check := func(keys []string, want string) {
		for _, k := range keys {
			if _, ok := raw[k]; ok {
				errs.Add("queue."+k, "applies only to queue.type: %s (this queue is %s)", want, typ)
			}
		}
	}
	switch typ {
	case QueueMemory:
		check(diskOnly, QueueDisk)
	case QueueDisk:
		check(memOnly, QueueMemory)
	}
	return errs
}

func describeSpec(spec config.Component) string {
	if spec.Plugin != "" {
		return fmt.Sprintf("plugin %q", spec.Plugin)
	}
	return fmt.Sprintf("type %q", spec.Type)
}

// runtimeReasons are the reasons the runtime counts drops and errors under, by kind; each
// component's counters for them, and for its factory's own Reasons, are published at 0 when
// it is built.
var runtimeReasons = map[component.Kind]struct{ dropped, errors []string }{
	component.KindSource:   {errors: []string{"run"}},
	component.KindEnricher: {dropped: []string{"enrich_error"}, errors: []string{"enrich"}},
	component.KindSink:     {dropped: []string{"queue_full", "retries_exhausted", "rejected", "shutdown"}, errors: []string{"write", "fatal"}},
}

// build decodes and validates one component's options and builds it. live is false for a
// component a reload builds beside the instance it replaces: its own metrics wait for the
// old ones to go (trackReg).
func (p *Pipeline) build(ctx context.Context, doc *config.Document, spec config.Component, live bool) (*part, *metrics.Component, config.Problems) {
	m := p.metrics.Component(spec.Name, string(spec.Kind))
	slot, err := p.uncheckedSlot(m, spec)
	if err != nil {
		return nil, nil, config.Problems{doc.Problem(spec.Path, "metrics: %v", err)}
	}
	reg := newTrackReg(m.Registerer(), slot, live)
	env := component.Env{
		Name: spec.Name, Kind: spec.Kind, Type: spec.Type, ConfigDir: doc.Dir, DataDir: doc.DataDir,
		Logger:     p.log.With(string(spec.Kind), spec.Name),
		Metrics:    m,
		Registerer: reg,
	}
	var f component.Factory
	if spec.Plugin == "" {
		var ok bool
		if f, ok = p.opts.Registry.Lookup(spec.Kind, spec.Type); !ok {
			return nil, nil, config.Problems{doc.Problem(config.Join(spec.Path, "type"), "unknown %s type %q (known: %s)", spec.Kind, spec.Type, strings.Join(p.opts.Registry.Types(spec.Kind), ", "))}
		}
	}
	rt := runtimeReasons[spec.Kind]
	m.Publish(append(append([]string(nil), rt.dropped...), f.Reasons.Dropped...), f.Reasons.Filtered, rt.errors)
	isolation := spec.Isolation
	switch {
	case f.Holds && isolation == "process":
		return nil, nil, config.Problems{doc.Problem(spec.Path, "enricher type %q keeps events across batches and runs only in process: set isolation: inproc", spec.Type)}
	case f.Holds:
		isolation = "inproc"
	case isolation == "":
		isolation = p.opts.DefaultIsolation
	}
	if spec.Plugin != "" || isolation == "process" {
		if p.opts.Instantiate == nil {
			return nil, nil, config.Problems{doc.Problem(spec.Path, "%s needs the plugin host, which this build does not have; use isolation: inproc", describeSpec(spec))}
		}
		c, err := p.opts.Instantiate(ctx, spec, env)
		if err != nil {
			reg.retire()
			return nil, nil, problemsFrom(doc, spec.Path, err)
		}
		return &part{name: spec.Name, kind: spec.Kind, c: c, reg: reg}, m, nil
	}
	if spec.Process != nil {
		return nil, nil, config.Problems{doc.Problem(config.Join(spec.Path, "process"), "process: settings apply only to a component run out of process; remove them or drop isolation: inproc")}
	}
	c, err := f.Build(env, spec.Options)
	if err != nil {
		reg.retire()
		return nil, nil, problemsFrom(doc, spec.Path, err)
	}
	return &part{name: spec.Name, kind: spec.Kind, c: c, reg: reg}, m, nil
}

// uncheckedSlot is the component's slot for unchecked collectors, made and registered (with
// the component's labels) the first time a component of its kind and name is built.
func (p *Pipeline) uncheckedSlot(m *metrics.Component, spec config.Component) (*uncheckedSlot, error) {
	p.slotsMu.Lock()
	defer p.slotsMu.Unlock()
	k := key(spec.Kind, spec.Name)
	if s := p.slots[k]; s != nil {
		return s, nil
	}
	s := &uncheckedSlot{gs: map[*gated]bool{}}
	if err := m.Registerer().Register(s); err != nil {
		return nil, err
	}
	if p.slots == nil {
		p.slots = map[string]*uncheckedSlot{}
	}
	p.slots[k] = s
	return s, nil
}

func problemsFrom(doc *config.Document, path string, err error) config.Problems {
	if errs, ok := options.FieldErrorsOf(err); ok {
		return doc.Problems(path, errs)
	}
	var ps config.Problems
	if errors.As(err, &ps) {
		return ps
	}
	return config.Problems{doc.Problem(path, "%v", err)}
}

// Taps is the pipeline's tap points.
func (p *Pipeline) Taps() *tap.Registry { return p.taps }

// Metrics is the pipeline's metric set.
func (p *Pipeline) Metrics() *metrics.Set { return p.metrics }

// Running is closed once Run has started every component and sources begin to run (what
// a service manager calls ready). It is never closed if a component fails to start.
func (p *Pipeline) Running() <-chan struct{} { return p.runningc }

// Ready reports nil when the pipeline is running and no sink or component reports failure.
func (p *Pipeline) Ready() error {
	p.mu.Lock()
	running := p.running
	var parts []*part
	for _, pt := range p.parts {
		if !pt.closed && pt.kind != component.KindSink { // sinks: asked through their node
			parts = append(parts, pt)
		}
	}
	p.mu.Unlock()
	if !running {
		return errors.New("pipeline is not running")
	}
	var errs []error
	for _, s := range p.topo.Load().sinks {
		if err := s.health(); err != nil {
			errs = append(errs, err)
		}
	}
	for _, pt := range parts {
		if hc, ok := pt.c.(component.HealthChecker); ok {
			if err := hc.Health(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", pt.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Run runs the pipeline until ctx is cancelled or every source is exhausted, then shuts
// down: sources stop, enrichers flush, sink queues drain (within runtime.shutdown_timeout
// after ctx is cancelled), components close. Batches that could not be delivered are
// acknowledged with flow.ErrShutdown and reported in the log. The error is the first
// failure of a source or of a component's start. A pipeline with no source running (all
// disabled, or enabled: false at the top) runs until ctx is cancelled, so that a reload
// can turn it on.
func (p *Pipeline) Run(ctx context.Context) error {
	p.mu.Lock()
	if p.started {
		p.mu.Unlock()
		return errors.New("pipeline: Run called twice")
	}
	p.started = true
	p.mu.Unlock()

	// A sink that can never write again (flow.FatalError) stops the pipeline as a signal would.
	ctx, stopRun := context.WithCancel(ctx)
	defer stopRun()

	// writeCtx bounds the sinks' work: cancelled shutdown_timeout after ctx is cancelled.
	writeCtx, cancelWrites := context.WithCancel(context.Background())
	defer cancelWrites()
	stopDeadline := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-p.abort:
			cancelWrites()
			return
		case <-stopDeadline:
			return
		}
		timeout := p.Document().Runtime.ShutdownTimeout
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case <-t.C:
			p.log.Warn("shutdown timeout reached; giving up on undelivered batches", "timeout", timeout)
			cancelWrites()
		case <-p.abort:
			cancelWrites()
		case <-stopDeadline:
		}
	}()
	defer close(stopDeadline)

	t := p.topo.Load()
	for _, s := range t.sinks {
		s.onFatal = stopRun
	}
	// Disk queues open first: what they hold is delivered before anything new.
	if err := p.openQueues(t.sinks); err != nil {
		p.closeAll()
		return err
	}
	if err := p.startAll(ctx); err != nil {
		p.closeAll()
		return err
	}
	for _, s := range t.sinks {
		s.start(writeCtx)
	}

	rs := &runState{ctx: ctx, stopRun: stopRun, writeCtx: writeCtx, errc: make(chan error, 1), done: make(chan struct{})}
	var stopSources context.CancelFunc
	rs.srcCtx, stopSources = context.WithCancel(ctx)
	defer stopSources()
	p.reloadMu.Lock()
	p.rs = rs
	p.mu.Lock()
	p.running = true
	sources := p.sources
	p.mu.Unlock()
	close(p.runningc)
	if !p.Document().Enabled {
		p.log.Info("pipeline disabled (enabled: false): nothing runs until a reload turns it on")
	} else {
		p.log.Info("pipeline running", "sources", len(sources), "enrichers", len(t.enrich), "sinks", len(t.sinks))
	}
	for _, s := range sources {
		p.runSource(rs, s)
	}
	p.reloadMu.Unlock()

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-rs.errc:
	case <-rs.done:
	}
	// A reload in progress finishes first (its waits end early once ctx is done); none starts
	// after this.
	p.reloadMu.Lock()
	p.closing = true
	p.reloadMu.Unlock()
	stopSources()
	p.waitSources(rs)
	close(p.stopping)
	if ctx.Err() != nil {
		p.log.Info("stopping: draining in-flight batches", "timeout", p.Document().Runtime.ShutdownTimeout)
	} else {
		p.log.Info("sources finished: draining in-flight batches")
	}

	// Close the enrichers in order, so that what holders (aggregation windows) flush passes
	// the later stages, then drain the sinks.
	t = p.topo.Load()
	for _, e := range t.enrich {
		p.closePart(writeCtx, e.part)
	}
	p.drainSinks(t.sinks, ctx.Err() != nil)
	p.waitAcks()
	p.closeAll()
	return runErr
}

// waitAcks waits, after the drain, until every batch the sources emitted is answered, so
// that what Undelivered counts is final when Run returns. A source that did not return
// within runtime.shutdown_timeout may still be in an Emit that waited on a full queue; the
// drain closed the queues, so that Emit is refused (and counted) at once, but on its own
// goroutine: without this wait Run could return before it is counted, and flowpipe run say
// that every accepted batch was delivered. Such a refusal comes as soon as the queue is
// closed, so the wait is short: bounded by 5 s (or runtime.shutdown_timeout when shorter, or
// a forced stop), so that a source stuck elsewhere does not hold the stop much longer.
func (p *Pipeline) waitAcks() {
	p.mu.Lock()
	sources := slices.Clone(p.sources)
	p.mu.Unlock()
	timeout := min(p.shutdownTimeout(), 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	go func() {
		select {
		case <-p.abort:
			cancel()
		case <-ctx.Done():
		}
	}()
	for _, s := range sources {
		if !s.out.wait(ctx) {
			p.log.Warn("stopping: a source's batches were not all answered after the drain; they were not delivered", "source", s.name, "batches", s.out.count(), "waited", timeout)
		}
	}
}

// Abort makes a shutdown in progress (or the next one) give up at once instead of waiting
// for runtime.shutdown_timeout: writers stop, what is left is acknowledged with
// flow.ErrShutdown and counted, and components get no more time to close. flowpipe run
// calls it on a second SIGINT/SIGTERM. Safe to call more than once, from any goroutine.
func (p *Pipeline) Abort() {
	p.abortOnce.Do(func() { close(p.abort) })
}

func (p *Pipeline) aborted() bool {
	select {
	case <-p.abort:
		return true
	default:
		return false
	}
}

// Undelivered is how many events the pipeline accepted but did not deliver to every sink:
// given up at shutdown or by a sink a reload removed, dropped by a full queue's policy,
// after retry.max_attempts or as rejected, failed by an enricher, and (while it runs) still
// in a memory queue; events kept in a disk queue for the next start are not lost and not
// counted. After Run it is final; flowpipe run exits non-zero when it is not 0.
func (p *Pipeline) Undelivered() int64 {
	n := p.failed.Load()
	p.mu.Lock()
	sinks := p.sinksEver
	p.mu.Unlock()
	for _, s := range sinks {
		n += s.undelivered.Load() + s.dropped.Load()
		if !s.queue.durable() {
			_, queued := s.queue.depth() // a disk queue keeps its events for the next start
			_, pending := s.pendingDepth()
			n += int64(queued + pending)
		}
	}
	return n
}

// runSource runs one source in Run's group. A source that fails stops the pipeline; the
// last running source that runs out by itself ends Run.
func (p *Pipeline) runSource(rs *runState, s *sourceNode) {
	ctx, cancel := context.WithCancel(rs.srcCtx)
	s.cancel = cancel
	s.ectx = rs.writeCtx
	s.enrichCtx = rs.writeCtx
	s.done = make(chan struct{})
	p.mu.Lock()
	rs.active++
	p.mu.Unlock()
	rs.srcWG.Add(1)
	go func() {
		defer rs.srcWG.Done()
		defer close(s.done)
		defer cancel()
		err := s.src.Run(ctx, s)
		s.flushPiped()
		p.mu.Lock()
		rs.active--
		last := rs.active == 0
		p.mu.Unlock()
		if s.stopped.Load() {
			p.log.Debug("source stopped by a reload", "source", s.name)
			return
		}
		if err != nil && !errors.Is(err, context.Canceled) {
			s.m.Errors("run", 1)
			p.log.Error("source failed", "source", s.name, "error", err)
			select {
			case rs.errc <- fmt.Errorf("source %s: %w", s.name, err):
			default:
			}
			return
		}
		p.log.Debug("source stopped", "source", s.name)
		if last && rs.srcCtx.Err() == nil {
			rs.doneOnce.Do(func() { close(rs.done) })
		}
	}()
}

// waitSources waits for the sources to return after they were told to stop, but not longer
// than runtime.shutdown_timeout (or a forced stop): a source may wait for the
// acknowledgements of what it emitted before it returns (an SDK plugin may), and some of
// those come only from the drain that follows, when what cannot be written is given up. The
// sinks' writers go on writing meanwhile.
func (p *Pipeline) waitSources(rs *runState) {
	returned := make(chan struct{})
	go func() {
		rs.srcWG.Wait()
		close(returned)
	}()
	timeout := p.Document().Runtime.ShutdownTimeout
	if timeout <= 0 {
		timeout = config.DefaultShutdownTimeout
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-returned:
	case <-p.abort:
	case <-t.C:
		p.log.Warn("sources did not return within runtime.shutdown_timeout after they were told to stop (one may wait for acknowledgements); draining the sinks now", "timeout", timeout)
	}
}

// drainSinks lets every sink write what its queue holds (its writers stop at the drain
// deadline), gives up on the rest, and reports what was not delivered. A disk queue keeps
// what it holds when the pipeline was told to stop (keep); it drains when the sources ran
// out by themselves.
func (p *Pipeline) drainSinks(sinks []*sinkNode, keep bool) {
	for _, s := range sinks {
		s.queue.close(keep)
	}
	kept := false
	for _, s := range sinks {
		s.wg.Wait()
		for _, b := range s.takeAllPending() {
			s.giveUp(b)
		}
		for _, b := range s.queue.drainAll() {
			s.giveUp(b)
		}
		s.updateDepth()
		if d, ok := s.queue.(*diskSinkQueue); ok {
			_, events := d.depth()
			d.shutdown()
			if events > 0 {
				kept = true
				p.log.Info("events kept in the disk queue for the next start", "sink", s.name, "events", events, "path", d.opts.Dir)
			}
		}
	}
	p.mu.Lock()
	p.running = false
	all := p.sinksEver
	p.mu.Unlock()
	lost, dropped := false, int64(0)
	for _, s := range all {
		if n := s.undelivered.Load(); n > 0 {
			lost = true
			p.log.Error("events not delivered before shutdown", "sink", s.name, "events", n)
		}
		dropped += s.dropped.Load()
	}
	if n := p.failed.Load(); n > 0 {
		lost = true
		p.log.Error("events failed by an enricher (counted in flowpipe_events_dropped_total{reason=\"enrich_error\"})", "events", n)
	}
	switch {
	case lost:
		p.log.Error("pipeline stopped; accepted events were not delivered", "events", p.Undelivered())
	case dropped > 0:
		p.log.Warn("pipeline stopped; sinks dropped events (counted in flowpipe_events_dropped_total by reason), the rest was delivered", "dropped", dropped)
	case kept:
		p.log.Info("pipeline stopped; every accepted batch was delivered or is kept in its disk queue")
	default:
		p.log.Info("pipeline stopped; every accepted batch was delivered")
	}
}

// openQueues opens the sinks' disk queues.
func (p *Pipeline) openQueues(sinks []*sinkNode) error {
	for _, s := range sinks {
		if d, ok := s.queue.(*diskSinkQueue); ok {
			if err := d.open(); err != nil {
				return fmt.Errorf("sink %s: %w", s.name, err)
			}
			s.updateDepth()
		}
	}
	return nil
}

// startAll starts every component in order, sinks, then enrichers, then sources, and stops
// at the first that fails.
func (p *Pipeline) startAll(ctx context.Context) error {
	return startParts(ctx, p.parts)
}

func startParts(ctx context.Context, parts []*part) error {
	for _, pt := range parts {
		if s, ok := pt.c.(component.Starter); ok {
			if err := s.Start(ctx); err != nil {
				return fmt.Errorf("start %s %s: %w", pt.kind, pt.name, err)
			}
		}
	}
	return nil
}

// closeAll closes every component that was built and is not closed yet, started or not:
// sources, then enrichers, then sinks. Each gets runtime.shutdown_timeout of its own,
// counted from when its close starts, so that a drain that used its deadline, or one slow
// component, does not spend another's time (and get it blamed); Abort ends every close.
func (p *Pipeline) closeAll() {
	p.mu.Lock()
	parts := p.parts
	sinks := p.sinksEver
	p.mu.Unlock()
	for _, kind := range []component.Kind{component.KindSource, component.KindEnricher, component.KindSink} {
		for _, pt := range parts {
			if pt.kind == kind {
				p.closePart(nil, pt)
			}
		}
	}
	for _, s := range sinks {
		if d, ok := s.queue.(*diskSinkQueue); ok {
			d.shutdown()
		}
	}
}

// closeParts closes parts that never ran (a pipeline or a reload that was refused).
func (p *Pipeline) closeParts(parts []*part) {
	for _, pt := range parts {
		p.closePart(nil, pt)
		pt.reg.retire()
	}
}

// closePart closes one component unless it is closed already, within ctx (nil: within a
// deadline of its own, as closeAll).
func (p *Pipeline) closePart(ctx context.Context, pt *part) {
	if pt == nil {
		return
	}
	p.mu.Lock()
	closed := pt.closed
	pt.closed = true
	p.mu.Unlock()
	if closed {
		return
	}
	if cl, ok := pt.c.(component.Closer); ok {
		p.closeOne(ctx, pt, cl)
	}
}

func (p *Pipeline) closeOne(ctx context.Context, pt *part, cl component.Closer) {
	timeout := p.shutdownTimeout()
	if ctx == nil {
		c, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		go func() {
			select {
			case <-p.abort:
				cancel()
			case <-c.Done():
			}
		}()
		ctx = c
	}
	err := cl.Close(ctx)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		// The component was still closing when its time ran out (or the user asked to stop
		// now): say so, rather than report the context's error as the component's fault.
		why := fmt.Sprintf("within runtime.shutdown_timeout (%s)", timeout)
		if p.aborted() {
			why = "before the forced stop"
		}
		p.log.Warn("component did not finish closing "+why+"; it was stopped", string(pt.kind), pt.name)
	default:
		p.log.Error("close failed", string(pt.kind), pt.name, "error", err)
	}
}

// TakesEncoded: the runtime takes a source plugin's batches undecoded
// (component.EncodedEmitter), and decodes them where their events are needed: before an
// enricher (decodeToChange), for a tap subscriber (tap.Hub.PublishBatch), and before the Write of a sink
// that is not a component.EncodedWriter (sinkNode.write). Everything else counts them
// with Len; the disk queue stores their encoding as it is.
func (s *sourceNode) TakesEncoded() {}

// Emit is the Emitter a source sees: enrichers, then fan-out to the sinks.
func (s *sourceNode) Emit(ctx context.Context, b *flow.Batch) error {
	n := b.Len()
	s.m.Out.Add(float64(n))
	b.StampSource(s.name)
	start := time.Now()
	lat := s.m.AckLat
	s.out.add()
	b.Observe(func(error) {
		lat.Observe(time.Since(start).Seconds())
		s.out.done()
	})
	s.tap.PublishBatch(b)
	enrichCtx := ctx
	if s.ectx != nil {
		ctx, enrichCtx = s.ectx, s.enrichCtx
	}
	t := s.p.acquire()
	if t.open != nil {
		select {
		case <-t.open:
		case <-ctx.Done():
			t.release()
			b.Release(flow.ErrShutdown)
			return ctx.Err()
		}
	}
	if !t.pipelines() && s.busy() {
		// Batches of this source are still on their way through an enricher elsewhere that
		// a reload removed: this one goes after them, in the source's order.
		return s.push(pipedBatch{t: t, i: -1, b: b, ctx: ctx, enrichCtx: enrichCtx})
	}
	pb, err := s.p.emitUntilPiped(ctx, enrichCtx, t, b)
	if pb == nil {
		t.release()
		return err
	}
	return s.push(*pb) // the topology is released once the batch is through it
}

// downstream is the Emitter a holder enricher sees: the stages after it in the topology it
// is part of.
type downstream struct {
	p    *Pipeline
	node *enricherNode
}

func (d *downstream) Emit(ctx context.Context, b *flow.Batch) error {
	d.node.tap.PublishBatch(b) // what the holder emits is its output
	if via := d.node.via.Load(); via != nil {
		// Removed by a reload, flushing while it closes: through the stages it was in,
		// which stay open until it is closed.
		return d.p.emitFrom(ctx, ctx, via, via.enricherIndex(d.node)+1, b)
	}
	t := d.p.acquire()
	defer t.release()
	i := t.enricherIndex(d.node)
	if i < 0 {
		i = len(t.enrich) - 1 // not (or no longer) in the pipeline: the sinks alone
	}
	return d.p.emitFrom(ctx, ctx, t, i+1, b)
}

// emitUntilPiped is emitFrom from the first enricher, up to the first that works elsewhere
// (component.Pipeliner): the rest of the batch's way, from that one's start, is returned,
// for push and the source's piped goroutine. Nil: the batch went its whole way (emitFrom's
// error).
func (p *Pipeline) emitUntilPiped(ctx, enrichCtx context.Context, t *topology, b *flow.Batch) (*pipedBatch, error) {
	for i, e := range t.enrich {
		pl, ok := e.en.(component.Pipeliner)
		if !ok {
			continue
		}
		// The enrichers before it, then its start.
		if !p.enrichRange(enrichCtx, t, 0, i, b) {
			return nil, nil
		}
		if !p.decodeToChange(e, b) {
			return nil, nil
		}
		if b.Len() == 0 {
			b.Release(nil)
			return nil, nil
		}
		e.m.In.Add(float64(b.Len()))
		return &pipedBatch{t: t, i: i, pl: pl, b: b, ctx: ctx, enrichCtx: enrichCtx}, nil
	}
	return nil, p.emitFrom(ctx, enrichCtx, t, 0, b)
}

// finishFrom waits for a piped batch's enrichment and sends it the rest of its way.
func (p *Pipeline) finishFrom(pb pipedBatch) error {
	if pb.i < 0 { // its whole way, queued behind batches in flight
		next, err := p.emitUntilPiped(pb.ctx, pb.enrichCtx, pb.t, pb.b)
		if next == nil {
			return err
		}
		pb = *next
		pb.finish = pb.pl.StartEnrich(pb.enrichCtx, pb.b)
	}
	e, b, in := pb.t.enrich[pb.i], pb.b, pb.b.Len()
	if err := pb.finish(); err != nil {
		p.enrichFailed(e, b, in, err)
		return nil
	}
	e.m.Out.Add(float64(b.Len()))
	e.tap.PublishBatch(b)
	if b.Len() == 0 {
		b.Release(nil)
		return nil
	}
	return p.emitFrom(pb.ctx, pb.enrichCtx, pb.t, pb.i+1, b)
}

func (p *Pipeline) enrichFailed(e *enricherNode, b *flow.Batch, in int, err error) {
	e.m.Errors("enrich", 1)
	e.m.Dropped("enrich_error", in)
	p.failed.Add(int64(in))
	p.log.Error("enricher failed a batch", "enricher", e.name, "events", in, "error", err)
	b.Release(fmt.Errorf("enricher %s: %w", e.name, err))
}

// decodeToChange readies b for enricher e, which changes its events: they are decoded if
// the batch came undecoded, and an encoding kept from the source is dropped (it would be
// stale). false: the batch's encoding is malformed; it is counted as e's input, dropped and
// released.
func (p *Pipeline) decodeToChange(e *enricherNode, b *flow.Batch) bool {
	if err := b.Decode(); err != nil {
		p.enrichFailed(e, b, b.Len(), err)
		return false
	}
	b.DropEncoded()
	return true
}

// enrichRange runs t's enrichers [i, end) on b; false: one failed it (b is released).
func (p *Pipeline) enrichRange(enrichCtx context.Context, t *topology, i, end int, b *flow.Batch) bool {
	if i < end && !p.decodeToChange(t.enrich[i], b) {
		return false
	}
	for ; i < end; i++ {
		e := t.enrich[i]
		in := b.Len()
		e.m.In.Add(float64(in))
		if err := e.en.Enrich(enrichCtx, b); err != nil {
			p.enrichFailed(e, b, in, err)
			return false
		}
		e.m.Out.Add(float64(b.Len()))
		e.tap.PublishBatch(b)
		if b.Len() == 0 {
			break
		}
	}
	return true
}

// emitFrom runs t's enrichers from index i on, then hands b to every sink of t, and gives
// up the caller's reference. ctx bounds the wait for room in the sinks' queues, enrichCtx
// the enrichers' calls.
func (p *Pipeline) emitFrom(ctx, enrichCtx context.Context, t *topology, i int, b *flow.Batch) error {
	if !p.enrichRange(enrichCtx, t, i, len(t.enrich), b) {
		return nil
	}
	if b.Len() == 0 {
		b.Release(nil)
		return nil
	}
	if len(t.sinks) == 0 {
		// Never while sources run (a reload stops them before it removes the last sink);
		// should it happen, the events are counted, not acknowledged as delivered.
		p.failed.Add(int64(b.Len()))
		p.log.Error("a batch reached a pipeline with no sink; counted as not delivered", "events", b.Len())
		b.Release(flow.ErrShutdown)
		return nil
	}
	encodeForSinks(t.sinks, b)
	p.fanout.PublishBatch(b)
	var err error
	for _, s := range t.sinks {
		s.tap.PublishBatch(b)
		if e := s.enqueue(ctx, b); e != nil && err == nil && !s.retiring.Load() {
			err = e // a sink a reload removes refuses batches without stopping the source
		}
	}
	b.Release(nil)
	return err
}

// encodeForSinks gives a batch that has no encoding the one its sink plugins send
// (component.BatchEncoder), made once for all of them before they share it, so that none
// of them encodes it on the path of its writes. A batch that came encoded keeps its own.
func encodeForSinks(sinks []*sinkNode, b *flow.Batch) {
	if b.Undecoded() || b.Encoded() != nil {
		return
	}
	for _, s := range sinks {
		if enc, ok := s.component().(component.BatchEncoder); ok {
			if data, release := enc.EncodeBatch(b); data != nil {
				b.SetEncoded(data)
				b.Observe(func(error) { release() })
			}
			return
		}
	}
}

// Close releases every component of a pipeline that will not Run (after validation).
func (p *Pipeline) Close(ctx context.Context) {
	p.mu.Lock()
	started := p.started
	p.started = true
	p.mu.Unlock()
	if !started {
		p.closeAll()
	}
}
