package pipeline

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/core/tap"
)

// ReloadReport says what a reload did, component by component. Components are named
// "<kind>/<name>" (source/kernel, sink/collector, enricher/resources).
type ReloadReport struct {
	Started []string // new components, or ones turned on with enabled: true
	Stopped []string // removed components, or ones turned off with enabled: false
	Changed []Change // components whose settings changed
	Kept    []string // unchanged components, left running untouched
	// HandedOver is, by sink name, how many queued events a changed sink's queue handed to
	// its new instance (the queue at the component's swap, or what moved to a new queue); Delivered how many a removed sink delivered before it stopped, and
	// Undelivered how many it could not (counted as at shutdown), or, for a changed sink
	// whose old disk queue blocked the reload (a full disk), how many events waiting to
	// enter it were refused.
	HandedOver  map[string]int64
	Delivered   map[string]int64
	Undelivered map[string]int64
	// Errors are what went wrong while the change was applied, after the new pipeline was
	// checked and built (a new source that failed to start, a Reconfigure that failed): the
	// component named went on as the message says. Empty on a clean reload.
	Errors []string
}

// Change is one changed component.
type Change struct {
	Component string   // "<kind>/<name>"
	Keys      []string // what changed: option key paths, or type, plugin, isolation, sha256, run_as, process
	// How is "reconfigured" (the running instance took the new options, component.Reconfigurer;
	// also a sink whose only change is its retry or in_flight settings, which its writers
	// take) or "replaced" (a new instance took over; also a sink given a new queue), or
	// "failed" (a source whose change could not be applied: it goes on with its old options,
	// and ReloadReport.Errors says why).
	How string
}

// Ways a changed component changes.
const (
	HowReconfigured = "reconfigured"
	HowReplaced     = "replaced"
	HowFailed       = "failed"
)

// plan is what a document needs beyond what runs: New builds everything in it, and Reload's
// first phase builds what is new or changed (and nothing else).
type plan struct {
	doc     *config.Document
	report  *ReloadReport
	built   []*part          // new instances, in start order: sinks, enrichers, sources
	opened  []*diskSinkQueue // disk queues opened for the new pipeline (closed if refused)
	sinks   []*sinkNode      // the new topology's sinks
	enrich  []*enricherNode  // and its enrichers, in order
	sources []*sourceNode    // every source of the new pipeline

	sinkOps   []*sinkOp
	enrichOps []*reconfOp // enrichers reconfigured in place
	removedEn []*enricherNode
	srcOps    []*srcOp
	changes   map[string]*Change
}

type sinkOp struct {
	spec     config.Component
	old      *sinkNode // nil: a new sink
	node     *sinkNode // the sink's node in the new topology; nil: removed
	comp     *part     // a new component (nil: the old one goes on)
	reconf   bool      // Reconfigure the old component with own
	own      map[string]any
	settings SinkSettings
	deferred bool // node's disk queue opens once old's is closed (the same directory)
	done     bool // nothing left after changeSink (the node was kept)
	// A removed sink's counters when the reload began: its report is what changed since.
	baseWritten, baseLost int64
}

type reconfOp struct {
	node *enricherNode
	spec config.Component
}

type srcOp struct {
	spec   config.Component
	old    *sourceNode // nil: a new source
	node   *sourceNode // the new instance; nil: removed, or reconfigured in place
	reconf bool
}

func key(kind component.Kind, name string) string { return string(kind) + "/" + name }

// identityKeys are what, changed, needs a new instance whatever the component can do.
func identityChanges(a, b config.Component) []string {
	var keys []string
	if a.Type != b.Type {
		keys = append(keys, "type")
	}
	if a.Plugin != b.Plugin {
		keys = append(keys, "plugin")
	}
	if a.SHA256 != b.SHA256 {
		keys = append(keys, "sha256")
	}
	if a.Isolation != b.Isolation {
		keys = append(keys, "isolation")
	}
	if a.RunAs != b.RunAs {
		keys = append(keys, "run_as")
	}
	if !reflect.DeepEqual(a.Process, b.Process) {
		keys = append(keys, "process")
	}
	return keys
}

// optionChanges lists the key paths whose values differ between two option maps.
func optionChanges(a, b map[string]any, prefix string) []string {
	var keys []string
	names := map[string]bool{}
	for k := range a {
		names[k] = true
	}
	for k := range b {
		names[k] = true
	}
	for k := range names {
		path := config.Join(prefix, k)
		va, oka := a[k]
		vb, okb := b[k]
		ma, isMa := va.(map[string]any)
		mb, isMb := vb.(map[string]any)
		switch {
		case oka && okb && isMa && isMb:
			keys = append(keys, optionChanges(ma, mb, path)...)
		case oka != okb || !reflect.DeepEqual(va, vb):
			keys = append(keys, path)
		}
	}
	sort.Strings(keys)
	return keys
}

func isRuntimeKey(k string) bool {
	for _, r := range sinkSettingKeys {
		if k == r || strings.HasPrefix(k, r+".") {
			return true
		}
	}
	return false
}

// checkOptions checks the options of a component that will be reconfigured in place, so
// that a wrong option refuses the reload: a built-in's as its factory would, an external
// plugin's by asking the running plugin (component.OptionsChecker).
func (p *Pipeline) checkOptions(ctx context.Context, doc *config.Document, spec config.Component, opts map[string]any, running any) config.Problems {
	if spec.Plugin != "" {
		oc, ok := running.(component.OptionsChecker)
		if !ok {
			return nil
		}
		err := oc.CheckOptions(ctx, opts)
		if err == nil {
			return nil
		}
		errs, ok := options.FieldErrorsOf(err)
		if !ok {
			errs = options.FieldErrors{{Msg: err.Error()}}
		}
		return doc.Problems(spec.Path, errs)
	}
	f, ok := p.opts.Registry.Lookup(spec.Kind, spec.Type)
	if !ok {
		return nil
	}
	return doc.Problems(spec.Path, options.Check(opts, f.NewConfig(), ""))
}

// plan checks doc and builds what it needs that does not run already. cur is nil for New
// (everything is new), or the topology and sources that run now.
func (p *Pipeline) plan(ctx context.Context, doc *config.Document, cur *topology) (*plan, config.Problems) {
	reload := cur != nil
	pl := &plan{doc: doc, report: &ReloadReport{HandedOver: map[string]int64{}, Delivered: map[string]int64{}, Undelivered: map[string]int64{}}, changes: map[string]*Change{}}
	var probs config.Problems
	on := func(c config.Component) bool { return doc.Enabled && c.Enabled }
	change := func(k string, keys []string) *Change {
		c := &Change{Component: k, Keys: keys, How: HowReplaced}
		pl.changes[k] = c
		return c
	}

	// Sinks.
	oldSinks := map[string]*sinkNode{}
	runningDirs := map[string]bool{}
	if reload {
		for _, s := range cur.sinks {
			oldSinks[s.name] = s
			if s.qdir != "" {
				runningDirs[s.qdir] = true
			}
		}
	}
	queueDirs := map[string]string{}
	enabledSinks := 0
	for _, spec := range doc.Sinks {
		settings, own, qdir, ps := p.sinkSpec(doc, spec, queueDirs)
		probs = append(probs, ps...)
		if !on(spec) {
			ds := spec
			ds.Options = own
			probs = append(probs, p.checkDisabled(doc, ds)...)
			continue
		}
		enabledSinks++
		k := key(component.KindSink, spec.Name)
		o := oldSinks[spec.Name]
		delete(oldSinks, spec.Name)
		if o == nil {
			node, pt, ps := p.newSink(ctx, doc, spec, settings, own, qdir, !reload)
			if pt != nil {
				pl.built = append(pl.built, pt)
			}
			probs = append(probs, ps...)
			if node == nil {
				continue
			}
			pl.sinks = append(pl.sinks, node)
			op := &sinkOp{spec: spec, node: node, settings: settings}
			if reload && qdir != "" && runningDirs[qdir] {
				op.deferred = true
			}
			pl.sinkOps = append(pl.sinkOps, op)
			if reload {
				pl.report.Started = append(pl.report.Started, k)
			}
			continue
		}
		identity := identityChanges(o.spec, spec)
		optKeys := optionChanges(o.spec.Options, spec.Options, "")
		if len(identity) == 0 && len(optKeys) == 0 {
			pl.sinks = append(pl.sinks, o)
			pl.report.Kept = append(pl.report.Kept, k)
			continue
		}
		ch := change(k, append(identity, optKeys...))
		var ownKeys []string
		for _, k := range optKeys {
			if !isRuntimeKey(k) {
				ownKeys = append(ownKeys, k)
			}
		}
		op := &sinkOp{spec: spec, old: o, own: own, settings: settings}
		if len(identity) > 0 || len(ownKeys) > 0 {
			if _, ok := o.component().(component.Reconfigurer); ok && len(identity) == 0 {
				ps := p.checkOptions(ctx, doc, spec, own, o.component())
				probs = append(probs, ps...)
				op.reconf = true
				ch.How = HowReconfigured
			} else {
				pt, _, ps := p.buildSinkPart(ctx, doc, spec, own, false)
				if pt != nil {
					pl.built = append(pl.built, pt)
				}
				probs = append(probs, ps...)
				if len(ps) > 0 {
					continue
				}
				op.comp = pt
			}
		} else {
			ch.How = HowReconfigured // the runtime's own settings: the component goes on
		}
		if settings.Queue != o.settings.Queue || qdir != o.qdir {
			// A new queue: a new node that keeps the sink's name, metrics and tap point.
			impl := o.cur.Load()
			if op.comp != nil {
				impl = &sinkImpl{sink: op.comp.c.(component.Sink), part: op.comp}
			}
			node := newSinkNode(spec.Name, impl.sink, impl.part, settings, o.m, p.log)
			p.dressSink(node, spec, own, qdir)
			op.node = node
			op.deferred = qdir != "" && runningDirs[qdir]
			ch.How = HowReplaced
		} else {
			op.node = o
		}
		pl.sinks = append(pl.sinks, op.node)
		pl.sinkOps = append(pl.sinkOps, op)
	}
	for _, o := range cur.sinksOrNil() {
		if _, gone := oldSinks[o.name]; gone {
			pl.sinkOps = append(pl.sinkOps, &sinkOp{old: o})
			pl.report.Stopped = append(pl.report.Stopped, key(component.KindSink, o.name))
		}
	}

	// Enrichers, in order.
	oldEn := map[string]*enricherNode{}
	for _, e := range cur.enrichOrNil() {
		oldEn[e.name] = e
	}
	inNew := map[*enricherNode]bool{}
	for _, spec := range doc.Enrichers {
		if !on(spec) {
			probs = append(probs, p.checkDisabled(doc, spec)...)
			continue
		}
		k := key(component.KindEnricher, spec.Name)
		o := oldEn[spec.Name]
		if o != nil {
			identity := identityChanges(o.spec, spec)
			optKeys := optionChanges(o.spec.Options, spec.Options, "")
			if len(identity) == 0 && len(optKeys) == 0 {
				pl.enrich = append(pl.enrich, o)
				inNew[o] = true
				pl.report.Kept = append(pl.report.Kept, k)
				continue
			}
			ch := change(k, append(identity, optKeys...))
			if _, ok := o.en.(component.Reconfigurer); ok && len(identity) == 0 {
				probs = append(probs, p.checkOptions(ctx, doc, spec, spec.Options, o.en)...)
				ch.How = HowReconfigured
				pl.enrichOps = append(pl.enrichOps, &reconfOp{node: o, spec: spec})
				pl.enrich = append(pl.enrich, o)
				inNew[o] = true
				continue
			}
		}
		node, pt, ps := p.newEnricher(ctx, doc, spec, !reload)
		if pt != nil {
			pl.built = append(pl.built, pt)
		}
		probs = append(probs, ps...)
		if node == nil {
			continue
		}
		pl.enrich = append(pl.enrich, node)
		if reload && o == nil {
			pl.report.Started = append(pl.report.Started, k)
		}
	}
	for _, e := range cur.enrichOrNil() {
		if !inNew[e] {
			pl.removedEn = append(pl.removedEn, e)
			if pl.changes[key(component.KindEnricher, e.name)] == nil {
				pl.report.Stopped = append(pl.report.Stopped, key(component.KindEnricher, e.name))
			}
		}
	}

	// Sources.
	oldSrc := map[string]*sourceNode{}
	if reload {
		p.mu.Lock()
		for _, s := range p.sources {
			oldSrc[s.name] = s
		}
		p.mu.Unlock()
	}
	enabledSources := 0
	for _, spec := range doc.Sources {
		if !on(spec) {
			probs = append(probs, p.checkDisabled(doc, spec)...)
			continue
		}
		enabledSources++
		k := key(component.KindSource, spec.Name)
		o := oldSrc[spec.Name]
		delete(oldSrc, spec.Name)
		if o != nil {
			identity := identityChanges(o.spec, spec)
			optKeys := optionChanges(o.spec.Options, spec.Options, "")
			if len(identity) == 0 && len(optKeys) == 0 {
				pl.sources = append(pl.sources, o)
				pl.report.Kept = append(pl.report.Kept, k)
				continue
			}
			ch := change(k, append(identity, optKeys...))
			if _, ok := o.src.(component.Reconfigurer); ok && len(identity) == 0 {
				probs = append(probs, p.checkOptions(ctx, doc, spec, spec.Options, o.src)...)
				ch.How = HowReconfigured
				pl.srcOps = append(pl.srcOps, &srcOp{spec: spec, old: o, reconf: true})
				pl.sources = append(pl.sources, o)
				continue
			}
		}
		node, pt, ps := p.newSource(ctx, doc, spec, !reload)
		if pt != nil {
			pl.built = append(pl.built, pt)
		}
		probs = append(probs, ps...)
		if node == nil {
			continue
		}
		pl.sources = append(pl.sources, node)
		pl.srcOps = append(pl.srcOps, &srcOp{spec: spec, old: o, node: node})
		if reload && o == nil {
			pl.report.Started = append(pl.report.Started, k)
		}
	}
	for _, o := range oldSrc {
		pl.srcOps = append(pl.srcOps, &srcOp{old: o})
		pl.report.Stopped = append(pl.report.Stopped, key(component.KindSource, o.name))
	}
	if doc.Enabled && enabledSources > 0 && enabledSinks == 0 {
		probs = append(probs, doc.Problem("sinks", "every sink is disabled (enabled: false) while sources run: their events would go nowhere; enable a sink or disable the sources"))
	}
	for _, c := range pl.changes {
		pl.report.Changed = append(pl.report.Changed, *c)
	}
	sort.Slice(pl.report.Changed, func(i, j int) bool { return pl.report.Changed[i].Component < pl.report.Changed[j].Component })
	sort.Strings(pl.report.Started)
	sort.Strings(pl.report.Stopped)
	sort.Strings(pl.report.Kept)
	if len(probs) > 0 || !reload {
		return pl, probs
	}

	// Start what is safe to start before anything changes (sinks, enrichers), and open the
	// new disk queues in directories no running sink holds, so that a failure refuses the
	// reload.
	for _, op := range pl.sinkOps {
		if op.node != nil && op.node != op.old && !op.deferred {
			if d, ok := op.node.queue.(*diskSinkQueue); ok {
				if err := d.open(); err != nil {
					probs = append(probs, doc.Problem(config.Join(op.spec.Path, "queue"), "%v", err))
					continue
				}
				pl.opened = append(pl.opened, d)
			}
		}
	}
	for _, pt := range pl.built {
		if pt.kind == component.KindSource {
			continue
		}
		if s, ok := pt.c.(component.Starter); ok {
			// Started under Run's context, as Run starts components: the reload's caller
			// (an HTTP request) may be gone long before the component.
			if err := s.Start(p.rs.ctx); err != nil {
				probs = append(probs, doc.Problem(specPath(doc, pt), "start: %v", err))
			}
		}
	}
	return pl, probs
}

func specPath(doc *config.Document, pt *part) string {
	var list []config.Component
	switch pt.kind {
	case component.KindSource:
		list = doc.Sources
	case component.KindEnricher:
		list = doc.Enrichers
	default:
		list = doc.Sinks
	}
	for _, c := range list {
		if c.Name == pt.name {
			return c.Path
		}
	}
	return ""
}

func (t *topology) sinksOrNil() []*sinkNode {
	if t == nil {
		return nil
	}
	return t.sinks
}

func (t *topology) enrichOrNil() []*enricherNode {
	if t == nil {
		return nil
	}
	return t.enrich
}

// Reload changes the running pipeline into the one doc describes. doc is validated and its
// new and changed components are built first; if anything is wrong, Reload returns the
// problems (config.Problems) and nothing changes. Otherwise unchanged components keep running
// untouched, and changed, new and removed ones are swapped in without losing an accepted
// event (docs/configuration.md, Reload). Reload may be called only while Run runs; calls are
// serialised.
func (p *Pipeline) Reload(ctx context.Context, doc *config.Document) (*ReloadReport, error) {
	p.reloadMu.Lock()
	defer p.reloadMu.Unlock()
	rs := p.rs
	if rs == nil || p.closing {
		return nil, errors.New("pipeline: not running (Reload applies only while Run runs)")
	}
	cur := p.topo.Load()
	pl, probs := p.plan(ctx, doc, cur)
	if len(probs) == 0 {
		probs = p.stuckKeptSinks(ctx, doc, cur, pl)
	}
	if len(probs) > 0 {
		probs.Sort()
		for _, d := range pl.opened {
			d.shutdown()
		}
		p.closeParts(pl.built)
		// The caller logs the problems, each at its line, and the refusal once (flowpipe
		// run: "reload rejected: N problem(s) found; nothing changed ...").
		return nil, probs
	}
	p.mu.Lock()
	p.parts = append(p.parts, pl.built...)
	p.mu.Unlock()
	p.apply(rs, cur, pl)
	p.pruneTaps()
	p.docp.Store(doc)
	p.logReport(doc, pl.report)
	if a, b := enricherNames(cur.enrich), enricherNames(p.topo.Load().enrich); a != b {
		p.log.Info("reload: enricher chain", "was", a, "now", b)
	}
	return pl.report, nil
}

// apply is Reload's second phase: the new topology goes in, what it no longer has is
// stopped after what it holds is through, sources change last.
func (p *Pipeline) apply(rs *runState, t1 *topology, pl *plan) {
	rep := pl.report
	timeout := p.shutdownTimeout()
	// What a reload does while the pipeline is told to stop goes on with the shutdown's
	// deadline: rs.ctx bounds the reload's waits, writes go on until the drain deadline.
	wctx := rs.ctx
	failed := func(k string, format string, args ...any) {
		msg := k + ": " + fmt.Sprintf(format, args...)
		rep.Errors = append(rep.Errors, msg)
		p.log.Error("reload: "+fmt.Sprintf(format, args...), "component", k)
	}

	// New sinks start before they are in the topology.
	for _, op := range pl.sinkOps {
		if op.node == nil {
			continue
		}
		op.node.onFatal = rs.stopRun
		if op.old == nil {
			p.addSinkNode(op.node)
			if !op.deferred {
				op.node.start(rs.writeCtx)
			}
			op.node.cur.Load().part.reg.activate()
		}
	}

	for _, op := range pl.sinkOps {
		if op.old != nil && op.node == nil {
			op.baseWritten, op.baseLost = op.old.written.Load(), op.old.undelivered.Load()
		}
	}
	// Removed sources stop first, while every stage their batches may be in still runs.
	for _, op := range pl.srcOps {
		if op.node == nil && !op.reconf && op.old != nil {
			p.stopSource(op.old, timeout, rs)
			op.old.part.reg.retire()
			op.old = nil
		}
	}

	// Changed sinks take their new component (or options) now.
	for _, op := range pl.sinkOps {
		if op.old != nil && op.node != nil {
			p.changeSink(rs, pl, op, timeout, failed)
		}
	}

	// A memory queue that a new one replaces takes the old topology's batches whatever its
	// limit: they all move on.
	for _, op := range pl.sinkOps {
		if op.old != nil && op.node != nil && op.node != op.old {
			if q, ok := op.old.queue.(*queue); ok {
				q.unbound()
			}
		}
	}

	t2 := newTopology(pl.enrich, pl.sinks)
	if len(pl.enrichOps) > 0 {
		t2.open = make(chan struct{})
	}
	for _, e := range pl.removedEn {
		e.via.Store(t1)
	}
	p.topo.Store(t2)
	// Every batch that took the old stages must be in the old sinks' queues. A removed sink
	// whose full queue holds one back gets runtime.shutdown_timeout, then stops taking
	// batches: what it refuses is given up and counted, as at shutdown. So does the old disk
	// queue of a sink given a new queue (a memory queue is unbound above and never holds one
	// back): on a full disk its appends would wait forever for room its stuck sink never
	// frees.
	retired := t1.retire()
	select {
	case <-retired:
	case <-time.After(timeout):
		type closedQueue struct {
			dir, why string
			base     int64 // the node's undelivered events before
		}
		closed := map[*sinkOp]closedQueue{}
		for _, op := range pl.sinkOps {
			switch {
			case op.old == nil:
			case op.node == nil:
				op.old.retiring.Store(true)
				op.old.queue.close(false)
			case op.node != op.old:
				d, ok := op.old.queue.(*diskSinkQueue)
				if !ok {
					continue
				}
				closed[op] = closedQueue{dir: d.opts.Dir, why: p.blockedWhy(op.old), base: op.old.undelivered.Load()}
				op.old.retiring.Store(true)
				op.old.queue.close(false)
			}
		}
		p.waitRetired(retired, timeout, pl)
		for op, c := range closed {
			if n := op.old.undelivered.Load() - c.base; n > 0 {
				rep.Undelivered[op.old.name] += n
				p.log.Error("reload: a sink's old disk queue blocked the reload for runtime.shutdown_timeout; it was closed: the events waiting to enter it were refused (not acknowledged to their source, counted as dropped, reason shutdown), what it holds stays on disk for the new queue",
					"sink", op.old.name, "dir", c.dir, "why", c.why, "events", n, "shutdown_timeout", timeout)
			}
		}
	}

	// Enrichers reconfigured in place, while no source batch is between stages.
	for _, op := range pl.enrichOps {
		k := key(component.KindEnricher, op.node.name)
		err := op.node.en.(component.Reconfigurer).Reconfigure(wctx, op.spec.Options)
		switch {
		case err == nil:
			op.node.spec = op.spec
		case errors.Is(err, component.ErrRestartNeeded):
			node, pt, ps := p.newEnricher(wctx, pl.doc, op.spec, false)
			if ps := p.adoptReplacement(wctx, pt, ps, true); len(ps) > 0 {
				failed(k, "cannot take the new options in place and its replacement failed (%v); it goes on with its old options", ps)
				continue
			}
			pl.changes[k].How = HowReplaced
			i := slices.Index(t2.enrich, op.node)
			enrich := slices.Clone(t2.enrich)
			enrich[i] = node
			t3 := newTopology(enrich, t2.sinks)
			t3.open = make(chan struct{})
			op.node.via.Store(t2)
			p.topo.Store(t3)
			close(t2.open) // its waiting batches go through t2, whole
			<-t2.retire()
			p.closePart(nil, op.node.part)
			op.node.part.reg.retire()
			pt.reg.activate()
			t2 = t3
		default:
			failed(k, "Reconfigure failed (%v); it goes on with its old options", err)
		}
	}
	if t2.open != nil {
		close(t2.open)
	}
	for i := range rep.Changed {
		if c := pl.changes[rep.Changed[i].Component]; c != nil {
			rep.Changed[i].How = c.How
		}
	}

	// Removed and replaced enrichers, in their old order: a holder flushes what it holds
	// through the old stages after it, which are all still open.
	for _, e := range pl.removedEn {
		p.closePart(nil, e.part)
		e.part.reg.retire()
	}
	for _, e := range pl.enrich {
		e.part.reg.activate()
	}

	// Sinks.
	var deferred []*sinkOp
	for _, op := range pl.sinkOps {
		switch {
		case op.old == nil:
			if op.deferred {
				deferred = append(deferred, op)
			}
		case op.node == nil:
			p.retireSink(op, timeout, rep)
		case !op.done:
			p.handOver(rs, pl, op, timeout)
			if op.deferred {
				deferred = append(deferred, op)
			}
		}
	}
	for _, op := range deferred {
		d := op.node.queue.(*diskSinkQueue)
		if err := d.open(); err != nil {
			failed(key(component.KindSink, op.node.name), "disk queue: %v; batches offered to it are dropped (reason queue_error)", err)
		}
		op.node.updateDepth()
		op.node.start(rs.writeCtx)
	}

	// Sources last, when every stage they feed is in place.
	var sources []*sourceNode
	// A source whose change failed goes on as it was: its diff line must not say it changed.
	failedSource := func(k string, format string, args ...any) {
		failed(k, format, args...)
		pl.setHow(k, HowFailed)
	}
	for _, op := range pl.srcOps {
		if op.old == nil && op.node == nil {
			continue // stopped above
		}
		k := key(component.KindSource, op.spec.Name)
		if op.old != nil && op.reconf {
			err := op.old.src.(component.Reconfigurer).Reconfigure(wctx, op.spec.Options)
			switch {
			case err == nil:
				op.old.spec = op.spec
				continue
			case errors.Is(err, component.ErrRestartNeeded):
				node, pt, ps := p.newSource(wctx, pl.doc, op.spec, false)
				if ps := p.adoptReplacement(wctx, pt, ps, false); len(ps) > 0 { // started below
					failedSource(k, "cannot take the new options in place and its replacement failed (%v); it goes on with its old options", ps)
					continue
				}
				pl.setHow(k, HowReplaced)
				op.node = node
			default:
				failedSource(k, "Reconfigure failed (%v); it goes on with its old options", err)
				continue
			}
		}
		if op.node != nil {
			if s, ok := op.node.part.c.(component.Starter); ok {
				if err := s.Start(wctx); err != nil {
					op.node.stopped.Store(true)
					p.closeParts([]*part{op.node.part})
					what := "it was not started"
					if op.old != nil {
						what = "the old instance goes on"
					}
					failedSource(key(component.KindSource, op.node.name), "start: %v; %s", err, what)
					if op.old != nil {
						sources = append(sources, op.old)
						op.node = nil
						op.old = nil
					}
					continue
				}
			}
			// The new instance runs before the old one stops: they overlap.
			p.runSource(rs, op.node)
			sources = append(sources, op.node)
		}
		if op.old != nil {
			p.stopSource(op.old, timeout, rs)
			op.old.part.reg.retire()
		}
		if op.node != nil {
			op.node.part.reg.activate()
		}
	}
	p.mu.Lock()
	var now []*sourceNode
	for _, s := range pl.sources {
		if !s.stopped.Load() {
			now = append(now, s)
		}
	}
	for _, s := range sources {
		if !slices.Contains(now, s) {
			now = append(now, s)
		}
	}
	p.sources = now
	p.mu.Unlock()
	for i := range rep.Changed {
		if c := pl.changes[rep.Changed[i].Component]; c != nil {
			rep.Changed[i].How = c.How
		}
	}
}

// waitRetired waits for the last batches of a retired topology. While they do not come, it
// says every timeout which sinks' full queues may be holding them (a sink the reload keeps,
// whose queue blocks until it writes again).
func (p *Pipeline) waitRetired(retired <-chan struct{}, timeout time.Duration, pl *plan) {
	for {
		select {
		case <-retired:
			return
		case <-time.After(timeout):
		}
		var full []string
		for _, n := range pl.sinks {
			if why := p.blockedWhy(n); why != "" {
				full = append(full, n.name+" ("+why+")")
			}
		}
		p.log.Warn("reload: still waiting for batches of the old pipeline to enter the sinks' queues; the reload goes on once they are in", "full_queues", strings.Join(full, ", "))
	}
}

// stuckKeptSinks refuses a reload that would wait for good: a reload goes on once every
// batch that took the running pipeline is in its sinks' queues, and a batch waiting to enter
// the full queue of a sink that is stuck (its disk full, its destination down: nothing has
// left the queue) waits until that sink moves again. Sinks the reload changes or removes are
// bounded by runtime.shutdown_timeout (their old queues are closed); a sink it keeps as it
// is, is not. So a kept sink whose queue holds batches back gets runtime.shutdown_timeout
// to take one or write one; if it does neither, the reload is refused before anything
// changed, with a problem at that sink saying why and what to do.
func (p *Pipeline) stuckKeptSinks(ctx context.Context, doc *config.Document, cur *topology, pl *plan) config.Problems {
	touched := map[*sinkNode]bool{}
	for _, op := range pl.sinkOps {
		if op.old != nil {
			touched[op.old] = true
		}
	}
	type watched struct {
		n       *sinkNode
		written int64
	}
	var ws []watched
	for _, n := range cur.sinks {
		if touched[n] || !slices.Contains(pl.sinks, n) || n.settings.Queue.WhenFull != WhenFullBlock {
			continue // a drop_* policy never holds a batch back
		}
		if p.blockedWhy(n) != "" {
			ws = append(ws, watched{n, n.written.Load()})
		}
	}
	if len(ws) == 0 {
		return nil
	}
	timeout := p.shutdownTimeout()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for len(ws) > 0 && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return nil // the reload's waits end early anyway
		case <-p.abort:
			return nil
		case <-tick.C:
		}
		kept := ws[:0]
		for _, w := range ws {
			if p.blockedWhy(w.n) != "" && w.n.written.Load() == w.written {
				kept = append(kept, w)
			}
		}
		ws = kept
	}
	var probs config.Problems
	for _, w := range ws {
		why := p.blockedWhy(w.n)
		if why == "" {
			continue
		}
		path := w.n.spec.Path
		for _, spec := range doc.Sinks {
			if spec.Name == w.n.name {
				path = spec.Path
			}
		}
		probs = append(probs, doc.Problem(path, "the sink is stuck: its queue is full (%s) and nothing left it within runtime.shutdown_timeout (%s), so the batches waiting to enter it hold the running pipeline and the reload would wait until the sink moves again; nothing changed. Free its queue (the disk, the destination), or change or remove this sink in the same reload: its old queue is then closed after runtime.shutdown_timeout and what waits to enter it is refused and counted", why, timeout))
	}
	return probs
}

// blockedWhy says why a sink's queue may hold a batch back: its disk is full, or the queue
// is at its limit; "" when neither.
func (p *Pipeline) blockedWhy(n *sinkNode) string {
	switch q := n.queue.(type) {
	case *diskSinkQueue:
		dq := q.q.Load()
		if dq == nil {
			return ""
		}
		st := dq.Stats()
		switch {
		case st.DiskFull:
			return "disk full at " + q.opts.Dir
		case st.Bytes >= q.opts.MaxSize:
			return fmt.Sprintf("queue at its max_size (%d bytes) at %s", q.opts.MaxSize, q.opts.Dir)
		}
	case *queue:
		b, e := q.depth()
		q.mu.Lock()
		maxB, maxE := q.maxBatches, q.maxEvents
		q.mu.Unlock()
		if b >= maxB || e >= maxE {
			return fmt.Sprintf("memory queue full (%d batches, %d events)", b, e)
		}
	}
	return ""
}

// pruneTaps removes the tap points of the components the pipeline no longer has (removed,
// or turned off with enabled: false): `flowpipe tap` no longer lists them, and a tap that
// follows one ends. A replaced component keeps its name and its tap point.
func (p *Pipeline) pruneTaps() {
	live := map[string]bool{tap.Fanout: true}
	t := p.topo.Load()
	for _, e := range t.enrich {
		live[e.name] = true
	}
	for _, s := range t.sinks {
		live[s.name] = true
	}
	p.mu.Lock()
	for _, s := range p.sources {
		live[s.name] = true
	}
	p.mu.Unlock()
	for _, name := range p.taps.Names() {
		if !live[name] {
			p.taps.Remove(name)
		}
	}
}

func enricherNames(list []*enricherNode) string {
	names := make([]string, len(list))
	for i, e := range list {
		names[i] = e.name
	}
	return strings.Join(names, " -> ")
}

func (pl *plan) setHow(k, how string) {
	if c := pl.changes[k]; c != nil {
		c.How = how
	}
}

func (p *Pipeline) addSinkNode(n *sinkNode) {
	p.mu.Lock()
	p.sinksEver = append(p.sinksEver, n)
	p.mu.Unlock()
}

// retireSink stops a removed sink: it takes no new batch (the topology without it is in and
// the old one's batches are queued), delivers what its queue holds within timeout, gives up
// on (and counts) the rest, and closes.
func (p *Pipeline) retireSink(op *sinkOp, timeout time.Duration, rep *ReloadReport) {
	n := op.old
	written, lost := op.baseWritten, op.baseLost
	n.retiring.Store(true)
	n.queue.close(false)
	n.waitWriters(timeout)
	for _, b := range n.takeAllPending() {
		n.giveUp(b)
	}
	for _, b := range n.queue.drainAll() {
		n.giveUp(b)
	}
	n.updateDepth()
	if d, ok := n.queue.(*diskSinkQueue); ok {
		if _, events := d.depth(); events > 0 {
			p.log.Warn("removed sink: events kept in its disk queue (delivered when a sink uses this queue again)", "sink", n.name, "events", events, "path", d.opts.Dir)
		}
		d.shutdown()
	}
	impl := n.cur.Load()
	p.closePart(nil, impl.part)
	impl.part.reg.retire()
	rep.Delivered[n.name] = n.written.Load() - written
	if u := n.undelivered.Load() - lost; u > 0 {
		rep.Undelivered[n.name] = u
		p.log.Error("removed sink: events not delivered before it stopped", "sink", n.name, "events", u)
	}
}

// adoptReplacement takes in the instance built for a change its running component could not
// take in place (Reconfigure answered ErrRestartNeeded): it starts it (when start is set;
// a source starts with the others later) and adds it to the parts. When building or
// starting failed, it closes what was built and returns the problems; the running instance
// then goes on with its old options.
func (p *Pipeline) adoptReplacement(ctx context.Context, pt *part, ps config.Problems, start bool) config.Problems {
	if len(ps) == 0 && start {
		if s, ok := pt.c.(component.Starter); ok {
			if err := s.Start(ctx); err != nil {
				ps = config.Problems{{Msg: err.Error()}}
			}
		}
	}
	if len(ps) > 0 {
		if pt != nil {
			p.closeParts([]*part{pt})
		}
		return ps
	}
	p.mu.Lock()
	p.parts = append(p.parts, pt)
	p.mu.Unlock()
	return nil
}

// changeSink gives a changed sink its new component, settings or queue; what the queue holds
// goes to the new instance.
func (p *Pipeline) changeSink(rs *runState, pl *plan, op *sinkOp, timeout time.Duration, failed func(string, string, ...any)) {
	rep := pl.report
	o := op.old
	k := key(component.KindSink, o.name)
	if op.reconf {
		err := o.component().(component.Reconfigurer).Reconfigure(rs.ctx, op.own)
		switch {
		case err == nil:
		case errors.Is(err, component.ErrRestartNeeded):
			pt, _, ps := p.buildSinkPart(rs.ctx, pl.doc, op.spec, op.own, false)
			if ps := p.adoptReplacement(rs.ctx, pt, ps, true); len(ps) > 0 {
				failed(k, "cannot take the new options in place and its replacement failed (%v); it goes on with its old options", ps)
				break
			}
			op.comp = pt
			if op.node != o {
				op.node.cur.Store(&sinkImpl{sink: pt.c.(component.Sink), part: pt})
			}
			pl.setHow(k, HowReplaced)
		default:
			failed(k, "Reconfigure failed (%v); it goes on with its old options", err)
		}
	}
	// The component is swapped now, before the old topology's batches are through: they may
	// be waiting for room in this very queue, which only the new component (a collector's
	// new URL, say) can empty.
	swapped := false
	if op.comp != nil {
		o.stopWriters(timeout)
		_, events := o.queue.depth()
		_, pending := o.pendingDepth()
		oldImpl := o.cur.Load()
		p.closePart(nil, oldImpl.part)
		oldImpl.part.reg.retire()
		o.cur.Store(&sinkImpl{sink: op.comp.c.(component.Sink), part: op.comp})
		op.comp.reg.activate()
		rep.HandedOver[o.name] = int64(events + pending)
		swapped = true
	}
	if op.node == o {
		// Same queue: it goes on; new retry and in_flight settings take a restart of the
		// writers.
		if o.settings.Retry != op.settings.Retry || o.settings.InFlight != op.settings.InFlight {
			if !swapped {
				o.stopWriters(timeout)
			}
			o.settings.Retry, o.settings.InFlight = op.settings.Retry, op.settings.InFlight
			swapped = true
		}
		if swapped {
			o.start(rs.writeCtx)
		}
		o.spec, o.own = op.spec, op.own
		op.done = true
		return
	}
	if swapped {
		o.start(rs.writeCtx) // the old queue drains through the new component meanwhile
	}
}

// handOver gives a sink's new queue (a new node) what the old one holds, once the old
// topology's batches are in the old queue.
func (p *Pipeline) handOver(rs *runState, pl *plan, op *sinkOp, timeout time.Duration) {
	rep := pl.report
	o := op.old
	n := op.node // the component is n's already (changeSink swapped it in the old node)
	p.addSinkNode(n)
	_, oldDisk := o.queue.(*diskSinkQueue)
	switch {
	case !oldDisk:
		// Memory: its batches move to the new queue, ahead of what came since.
		o.stopWriters(timeout)
		o.queue.close(false)
		moved := append(o.takeAllPending(), o.queue.drainAll()...)
		o.updateDepth()
		n.start(rs.writeCtx)
		var events int64
		for _, b := range moved {
			events += int64(b.Len())
		}
		if q, ok := n.queue.(*queue); ok {
			q.pushFront(moved)
		} else {
			for _, b := range moved {
				_ = n.queue.offer(rs.writeCtx, n, b)
				b.Release(nil)
			}
		}
		n.updateDepth()
		handed(rep, o.name, events)
	case op.deferred:
		// The same directory: the old queue stops, what it holds stays on disk, and the new
		// queue opens it (after apply's sink changes) and hands it to the writers.
		_, events := o.queue.depth()
		o.queue.close(true)
		o.retiring.Store(true)
		o.stopWriters(timeout)
		for _, b := range o.takeAllPending() {
			o.giveUp(b) // stays on disk for the new queue
		}
		o.queue.(*diskSinkQueue).shutdown()
		o.updateDepth()
		handed(rep, o.name, int64(events))
	default:
		// A disk queue elsewhere: it is drained through the (new) component first, then the
		// new queue's writers start. What is left at timeout stays in the old directory.
		written := o.written.Load()
		o.stopWriters(timeout)
		o.cur.Store(n.cur.Load())
		o.queue.close(false)
		o.retiring.Store(true)
		o.start(rs.writeCtx)
		o.waitWriters(timeout)
		for _, b := range o.takeAllPending() {
			o.giveUp(b)
		}
		d := o.queue.(*diskSinkQueue)
		if _, events := d.depth(); events > 0 {
			p.log.Warn("changed sink: events kept in its old disk queue (delivered when a sink uses this queue again)", "sink", o.name, "events", events, "path", d.opts.Dir)
		}
		d.shutdown()
		o.updateDepth()
		n.start(rs.writeCtx)
		handed(rep, o.name, o.written.Load()-written)
	}
}

// handed records what a sink's queue handed to its new instance: when both the component
// and the queue changed, the larger of the two hand-overs (the queue at the component's
// swap, and what moved to the new queue after), which count many of the same events.
func handed(rep *ReloadReport, sink string, n int64) {
	if n > rep.HandedOver[sink] {
		rep.HandedOver[sink] = n
	} else if _, ok := rep.HandedOver[sink]; !ok {
		rep.HandedOver[sink] = n
	}
}

// stopSource stops a removed or replaced source: its Run is cancelled, its batches in
// flight are acknowledged (within timeout), then it closes.
func (p *Pipeline) stopSource(s *sourceNode, timeout time.Duration, rs *runState) {
	s.stopped.Store(true)
	if s.cancel != nil {
		s.cancel()
		select {
		case <-s.done:
		case <-time.After(timeout):
			p.log.Warn("reload: a stopped source did not return within runtime.shutdown_timeout", "source", s.name)
		}
	}
	ctx, cancel := context.WithTimeout(rs.ctx, timeout)
	if !s.out.wait(ctx) {
		p.log.Warn("reload: a stopped source's batches were not all acknowledged within runtime.shutdown_timeout; closing it anyway", "source", s.name, "batches", s.out.count())
	}
	cancel()
	p.closePart(nil, s.part)
}

// logReport logs a reload as a diff: a line per started, stopped and changed component and
// a summary.
func (p *Pipeline) logReport(doc *config.Document, rep *ReloadReport) {
	for _, k := range rep.Started {
		p.log.Info("reload: started", "component", k)
	}
	for _, k := range rep.Stopped {
		args := []any{"component", k}
		if name, ok := strings.CutPrefix(k, "sink/"); ok {
			args = append(args, "delivered", rep.Delivered[name], "undelivered", rep.Undelivered[name])
		}
		p.log.Info("reload: stopped", args...)
	}
	for _, c := range rep.Changed {
		args := []any{"component", c.Component, "keys", strings.Join(c.Keys, ","), "how", c.How}
		if name, ok := strings.CutPrefix(c.Component, "sink/"); ok {
			if n, ok := rep.HandedOver[name]; ok {
				args = append(args, "handed_over", n)
			}
		}
		p.log.Info("reload: changed", args...)
	}
	var handed int64
	for _, n := range rep.HandedOver {
		handed += n
	}
	var undelivered int64
	for _, n := range rep.Undelivered {
		undelivered += n
	}
	p.log.Info("reload applied", "file", doc.File, "started", len(rep.Started), "stopped", len(rep.Stopped), "changed", len(rep.Changed), "kept", len(rep.Kept), "handed_over", handed, "undelivered", undelivered, "errors", len(rep.Errors))
}
