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

// Pipeline is a built pipeline, ready to Run once.
type Pipeline struct {
	doc     *config.Document
	log     *slog.Logger
	metrics *metrics.Set
	sources []*sourceNode
	enrich  []*enricherNode
	sinks   []*sinkNode
	// parts is every component that was built, in start order (sinks, enrichers, sources,
	// as New builds them): one list that every kind goes through to start and to close.
	parts    []*part
	stopping chan struct{}
	runningc chan struct{} // closed once every component started (Running)
	taps     *tap.Registry
	fanout   *tap.Hub   // batches handed to the sinks
	sinkTaps []*tap.Hub // by index of sinks

	abortOnce sync.Once
	abort     chan struct{} // closed by Abort
	failed    atomic.Int64  // events an enricher failed (acknowledged with its error)

	mu      sync.Mutex
	running bool
	started bool
}

type sourceNode struct {
	name string
	src  component.Source
	m    *metrics.Component
	p    *Pipeline
	tap  *tap.Hub
}

type enricherNode struct {
	name string
	en   component.Enricher
	m    *metrics.Component
	tap  *tap.Hub
}

// part is one built component: started in order, closed exactly once.
type part struct {
	name   string
	kind   component.Kind
	c      any
	closed bool
}

// New builds every component of doc. Every problem in the components' options is reported
// together as config.Problems, positioned at its line.
func New(ctx context.Context, doc *config.Document, opts Options) (*Pipeline, error) {
	if opts.Registry == nil {
		return nil, errors.New("pipeline: Options.Registry is required")
	}
	p := &Pipeline{doc: doc, log: opts.Logger, metrics: opts.Metrics, stopping: make(chan struct{}), runningc: make(chan struct{}), abort: make(chan struct{})}
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
	var probs config.Problems
	var sinkTaps []*tap.Hub
	queueDirs := map[string]string{} // disk queue directory → sink
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
		probs = append(probs, doc.Problems(spec.Path, errs)...)
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
		node := newSinkNode(spec.Name, sink, settings, m, p.log)
		if qdir != "" {
			node.queue = newDiskSinkQueue(node, qdir)
		}
		p.sinks = append(p.sinks, node)
		sinkTaps = append(sinkTaps, p.taps.Point(spec.Name, "sink"))
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
		p.enrich = append(p.enrich, &enricherNode{name: spec.Name, en: en, m: m, tap: p.taps.Point(spec.Name, "enricher")})
		if h, ok := en.(component.Holder); ok {
			h.Attach(&downstream{p: p, from: len(p.enrich)}) // what it emits passes the stages after it
		}
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
		p.sources = append(p.sources, &sourceNode{name: spec.Name, src: src, m: m, p: p, tap: p.taps.Point(spec.Name, "source")})
	}
	if len(probs) > 0 {
		probs.Sort()
		p.closeAll()
		return nil, probs
	}
	p.sinkTaps = sinkTaps
	return p, nil
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
	rt := runtimeReasons[spec.Kind]
	m.Publish(append(append([]string(nil), rt.dropped...), f.Reasons.Dropped...), f.Reasons.Filtered, rt.errors)
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
		p.parts = append(p.parts, &part{name: spec.Name, kind: spec.Kind, c: c})
		return c, m, nil
	}
	if spec.Process != nil {
		return nil, nil, config.Problems{p.doc.Problem(config.Join(spec.Path, "process"), "process: settings apply only to a component run out of process; remove them or drop isolation: inproc")}
	}
	c, err := f.Build(env, spec.Options)
	if err != nil {
		return nil, nil, p.problemsFrom(spec.Path, err)
	}
	p.parts = append(p.parts, &part{name: spec.Name, kind: spec.Kind, c: c})
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
	for _, pt := range p.parts {
		if hc, ok := pt.c.(component.HealthChecker); ok && pt.kind != component.KindSink { // sinks: asked through their node
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
// failure of a source or of a component's start.
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
	for _, s := range p.sinks {
		s.onFatal = stopRun
	}

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
		t := time.NewTimer(p.doc.Runtime.ShutdownTimeout)
		defer t.Stop()
		select {
		case <-t.C:
			p.log.Warn("shutdown timeout reached; giving up on undelivered batches", "timeout", p.doc.Runtime.ShutdownTimeout)
			cancelWrites()
		case <-p.abort:
			cancelWrites()
		case <-stopDeadline:
		}
	}()
	defer close(stopDeadline)

	// Disk queues open first: what they hold is delivered before anything new.
	if err := p.openQueues(); err != nil {
		p.closeAll()
		return err
	}
	if err := p.startAll(ctx); err != nil {
		p.closeAll()
		return err
	}

	for _, s := range p.sinks {
		s.start(writeCtx)
	}
	p.mu.Lock()
	p.running = true
	p.mu.Unlock()
	close(p.runningc)
	p.log.Info("pipeline running", "sources", len(p.sources), "enrichers", len(p.enrich), "sinks", len(p.sinks))

	runErr := p.runSources(ctx)
	close(p.stopping)
	if ctx.Err() != nil {
		p.log.Info("stopping: draining in-flight batches", "timeout", p.doc.Runtime.ShutdownTimeout)
	} else {
		p.log.Info("sources finished: draining in-flight batches")
	}

	// Close the enrichers in order, so that what holders (aggregation windows) flush passes
	// the later stages, then drain the sinks.
	p.closeKind(writeCtx, component.KindEnricher)
	p.drainSinks(ctx.Err() != nil)
	p.closeAll()
	return runErr
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
// given up at shutdown, dropped by a full queue's policy, after retry.max_attempts or as
// rejected, failed by an enricher, and (while it runs) still in a memory queue; events
// kept in a disk queue for the next start are not lost and not counted. After Run it is final;
// flowpipe run exits non-zero when it is not 0.
func (p *Pipeline) Undelivered() int64 {
	n := p.failed.Load()
	for _, s := range p.sinks {
		n += s.undelivered.Load() + s.dropped.Load()
		if _, durable := s.queue.(*diskSinkQueue); !durable {
			_, queued := s.queue.depth() // a disk queue keeps its events for the next start
			n += int64(queued)
		}
	}
	return n
}

// runSources runs every source until each returns; the first failure stops the others and
// is returned.
func (p *Pipeline) runSources(ctx context.Context) error {
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
	return <-errc
}

// drainSinks lets every sink write what its queue holds (its writers stop at the drain
// deadline), gives up on the rest, and reports what was not delivered. A disk queue keeps
// what it holds when the pipeline was told to stop (keep); it drains when the sources ran
// out by themselves.
func (p *Pipeline) drainSinks(keep bool) {
	for _, s := range p.sinks {
		s.queue.close(keep)
	}
	kept := false
	for _, s := range p.sinks {
		s.wg.Wait()
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
	p.mu.Unlock()
	lost, dropped := false, int64(0)
	for _, s := range p.sinks {
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

// openQueues opens every sink's disk queue.
func (p *Pipeline) openQueues() error {
	for _, s := range p.sinks {
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
	for _, pt := range p.parts {
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
	for _, kind := range []component.Kind{component.KindSource, component.KindEnricher, component.KindSink} {
		p.closeKind(nil, kind)
	}
	for _, s := range p.sinks {
		if d, ok := s.queue.(*diskSinkQueue); ok {
			d.shutdown()
		}
	}
}

// closeKind closes, in order, the components of one kind that are not closed yet, within
// ctx (nil: each within a deadline of its own, as closeAll).
func (p *Pipeline) closeKind(ctx context.Context, kind component.Kind) {
	for _, pt := range p.parts {
		if pt.kind != kind || pt.closed {
			continue
		}
		pt.closed = true
		if cl, ok := pt.c.(component.Closer); ok {
			p.closeOne(ctx, pt, cl)
		}
	}
}

func (p *Pipeline) closeOne(ctx context.Context, pt *part, cl component.Closer) {
	timeout := p.doc.Runtime.ShutdownTimeout
	if timeout <= 0 {
		timeout = config.DefaultShutdownTimeout
	}
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

// Emit is the Emitter a source sees: enrichers, then fan-out to the sinks.
func (s *sourceNode) Emit(ctx context.Context, b *flow.Batch) error {
	n := len(b.Events)
	s.m.Out.Add(float64(n))
	b.StampSource(s.name)
	start := time.Now()
	lat := s.m.AckLat
	b.Observe(func(error) { lat.Observe(time.Since(start).Seconds()) })
	s.tap.Publish(b.Events)
	return s.p.emitFrom(ctx, 0, b)
}

// downstream is the Emitter a holder enricher sees: the stages after it.
type downstream struct {
	p    *Pipeline
	from int
}

func (d *downstream) Emit(ctx context.Context, b *flow.Batch) error {
	d.p.enrich[d.from-1].tap.Publish(b.Events) // what the holder emits is its output
	return d.p.emitFrom(ctx, d.from, b)
}

// emitFrom runs enrichers from index i on, then hands b to every sink, and gives up the
// caller's reference.
func (p *Pipeline) emitFrom(ctx context.Context, i int, b *flow.Batch) error {
	if i < len(p.enrich) {
		b.DropEncoded() // enrichers change events: an encoding kept from the source is stale
	}
	for ; i < len(p.enrich); i++ {
		e := p.enrich[i]
		in := len(b.Events)
		e.m.In.Add(float64(in))
		if err := e.en.Enrich(ctx, b); err != nil {
			e.m.Errors("enrich", 1)
			e.m.Dropped("enrich_error", in)
			p.failed.Add(int64(in))
			p.log.Error("enricher failed a batch", "enricher", e.name, "events", in, "error", err)
			b.Release(fmt.Errorf("enricher %s: %w", e.name, err))
			return nil
		}
		e.m.Out.Add(float64(len(b.Events)))
		e.tap.Publish(b.Events)
		if len(b.Events) == 0 {
			break
		}
	}
	if len(b.Events) == 0 {
		b.Release(nil)
		return nil
	}
	p.fanout.Publish(b.Events)
	var err error
	for i, s := range p.sinks {
		p.sinkTaps[i].Publish(b.Events)
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
		p.closeAll()
	}
}
