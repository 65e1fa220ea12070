package pipeline

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"weak"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/core/tap"
)

// The reload tests run the real runtime in process with small components that record what
// they see: a counting source (unique event IDs across every instance of it), a sink that
// records every event ID it wrote and checks that the events of each batch were enriched by
// one generation of the enricher chain, and an enricher that stamps its generation on every
// event. cmd/flowpipe runs reloads through the binary with the default isolation.

// reloadHarness holds the components' shared state, by component name, so that it outlives
// the instances a reload replaces.
type reloadHarness struct {
	reg    *component.Registry
	nextID atomic.Uint64
	stop   chan struct{} // closed: sources run out (return nil)

	mu      sync.Mutex
	recs    map[string]*recorder
	builds  map[string]int // "kind/name" → instances built
	acked   map[uint64]error
	emitted int64
	reconfs map[string]int                  // "kind/name" → Reconfigure calls
	remotes []weak.Pointer[remoteCollector] // of each "remote" sink instance built
}

type recorder struct {
	mu    sync.Mutex
	seen  map[uint64]int
	rules map[string]int // events written, by RuleID (the stamp enricher's generation)
	srcs  map[string]int // and by SrcResourceID
	// acrossBatches: batches hold events from several source batches (a holder's), which
	// may carry different generations legitimately.
	acrossBatches bool
	mixed         []string // batches with more than one generation
	closedW       atomic.Int64
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}

func newReloadHarness() *reloadHarness {
	h := &reloadHarness{reg: component.NewRegistry(), stop: make(chan struct{}), recs: map[string]*recorder{}, builds: map[string]int{}, acked: map[uint64]error{}, reconfs: map[string]int{}}
	h.reg.Register(component.NewSourceFactory("count", "", func() *countConf { return &countConf{Batch: 20} },
		func(env component.Env, c *countConf) (component.Source, error) {
			h.built("source/" + env.Name)
			return &countSource{h: h, batch: c.Batch}, nil
		}))
	h.reg.Register(component.NewSourceFactory("recount", "", func() *countConf { return &countConf{Batch: 20} },
		func(env component.Env, c *countConf) (component.Source, error) {
			h.built("source/" + env.Name)
			s := &reconfSource{countSource: countSource{h: h, batch: c.Batch}, name: env.Name}
			return s, nil
		}))
	h.reg.Register(component.NewSourceFactory("startcount", "", func() *countConf { return &countConf{Batch: 20} },
		func(env component.Env, c *countConf) (component.Source, error) {
			h.built("source/" + env.Name)
			return &startingSource{countSource: countSource{h: h, batch: c.Batch}, fail: c.Tag == "fail"}, nil
		}))
	h.reg.Register(component.NewSinkFactory("rec", "", func() *recConf { return &recConf{} },
		func(env component.Env, c *recConf) (component.Sink, error) {
			h.built("sink/" + env.Name)
			s := &recSink{r: h.recorder(env.Name), delay: c.Delay, fatal: c.Fatal, down: c.Down, writes: prometheus.NewCounter(prometheus.CounterOpts{
				Name: "flowpipe_test_writes_total", Help: "Batches this instance wrote.",
			})}
			return s, env.Register(s.writes)
		}))
	h.reg.Register(component.NewSinkFactory("remote", "", func() *recConf { return &recConf{} },
		func(env component.Env, c *recConf) (component.Sink, error) {
			h.built("sink/" + env.Name)
			rc := &remoteCollector{tag: c.Tag}
			h.mu.Lock()
			h.remotes = append(h.remotes, weak.Make(rc))
			h.mu.Unlock()
			return &recSink{r: h.recorder(env.Name)}, env.Registerer.Register(rc)
		}))
	h.reg.Register(component.NewSinkFactory("rerec", "", func() *recConf { return &recConf{} },
		func(env component.Env, c *recConf) (component.Sink, error) {
			h.built("sink/" + env.Name)
			s := &reconfSink{recSink: recSink{r: h.recorder(env.Name)}, h: h, name: env.Name}
			s.tag.Store(&c.Tag)
			return s, nil
		}))
	h.reg.Register(component.NewEnricherFactory("stamp", "", func() *stampConf { return &stampConf{} },
		func(env component.Env, c *stampConf) (component.Enricher, error) {
			h.built("enricher/" + env.Name)
			return &stamp{gen: c.Gen, field: c.Field}, nil
		}))
	hold := component.NewEnricherFactory("hold", "", func() *stampConf { return &stampConf{} },
		func(env component.Env, c *stampConf) (component.Enricher, error) {
			h.built("enricher/" + env.Name)
			return &holder{}, nil
		})
	hold.Holds = true
	h.reg.Register(hold)
	h.reg.Register(component.NewEnricherFactory("restamp", "", func() *stampConf { return &stampConf{} },
		func(env component.Env, c *stampConf) (component.Enricher, error) {
			h.built("enricher/" + env.Name)
			s := &reconfStamp{h: h, name: env.Name}
			s.cfg.Store(c)
			return s, nil
		}))
	return h
}

func (h *reloadHarness) built(k string) {
	h.mu.Lock()
	h.builds[k]++
	h.mu.Unlock()
}

func (h *reloadHarness) buildsOf(k string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.builds[k]
}

func (h *reloadHarness) recorder(name string) *recorder {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.recs[name]
	if r == nil {
		r = &recorder{seen: map[uint64]int{}, rules: map[string]int{}, srcs: map[string]int{}}
		h.recs[name] = r
	}
	return r
}

func (h *reloadHarness) ackedCount() (ok, failed int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, err := range h.acked {
		if err == nil {
			ok++
		} else {
			failed++
		}
	}
	return
}

type countConf struct {
	Batch int    `yaml:"batch"`
	Tag   string `yaml:"tag"`
}

// countSource emits batches of events with IDs (TxPackets) unique across all its instances,
// as fast as backpressure lets it, until cancelled or the harness stops the sources.
type countSource struct {
	h     *reloadHarness
	batch int
}

func (s *countSource) Run(ctx context.Context, out component.Emitter) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.h.stop:
			return nil
		default:
		}
		evs := make([]flow.Event, s.batch)
		ids := make([]uint64, s.batch)
		for i := range evs {
			ids[i] = s.h.nextID.Add(1)
			evs[i].TxPackets = ids[i]
		}
		b := flow.NewBatch(evs, func(err error) {
			s.h.mu.Lock()
			for _, id := range ids {
				s.h.acked[id] = err
			}
			s.h.mu.Unlock()
		})
		s.h.mu.Lock()
		s.h.emitted += int64(len(ids))
		s.h.mu.Unlock()
		if err := out.Emit(ctx, b); err != nil {
			return nil
		}
	}
}

// startingSource is a countSource with a Start, which fails when its tag is "fail" (as a
// listener's does on an address in use).
type startingSource struct {
	countSource
	fail bool
}

func (s *startingSource) Start(context.Context) error {
	if s.fail {
		return errors.New("listen: address already in use")
	}
	return nil
}

// reconfSource is a countSource that takes new options in place (its batch size).
type reconfSource struct {
	countSource
	name string
	size atomic.Int64
}

func (s *reconfSource) Run(ctx context.Context, out component.Emitter) error {
	s.size.CompareAndSwap(0, int64(s.batch))
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.h.stop:
			return nil
		default:
		}
		n := int(s.size.Load())
		evs := make([]flow.Event, n)
		ids := make([]uint64, n)
		for i := range evs {
			ids[i] = s.h.nextID.Add(1)
			evs[i].TxPackets = ids[i]
		}
		b := flow.NewBatch(evs, func(err error) {
			s.h.mu.Lock()
			for _, id := range ids {
				s.h.acked[id] = err
			}
			s.h.mu.Unlock()
		})
		s.h.mu.Lock()
		s.h.emitted += int64(n)
		s.h.mu.Unlock()
		if err := out.Emit(ctx, b); err != nil {
			return nil
		}
	}
}

func (s *reconfSource) Reconfigure(_ context.Context, raw map[string]any) error {
	c := &countConf{Batch: 20}
	if err := checkRaw(raw, c); err != nil {
		return err
	}
	s.size.Store(int64(c.Batch))
	s.h.mu.Lock()
	s.h.reconfs["source/"+s.name]++
	s.h.mu.Unlock()
	return nil
}

type recConf struct {
	Delay time.Duration `yaml:"delay"`
	Tag   string        `yaml:"tag"`
	Fatal bool          `yaml:"fatal"` // every write fails with flow.Fatal
	Down  bool          `yaml:"down"`  // every write fails (retried): a collector that is gone
}

// recSink records the IDs it wrote; every event of a batch must carry one generation
// (RuleID and SrcResourceID, stamped by two enrichers, equal and the same for the batch).
type recSink struct {
	r      *recorder
	delay  time.Duration
	closed atomic.Bool
	writes prometheus.Counter // registered with Env.Register; nil for reconfSink
	fatal  bool
	down   bool
}

func (s *recSink) Write(ctx context.Context, b *flow.Batch) error {
	if s.closed.Load() {
		s.r.closedW.Add(1)
		return errors.New("write after close")
	}
	if s.fatal {
		return flow.Fatal(errors.New("the disk is gone"))
	}
	if s.down {
		return errors.New("collector unreachable")
	}
	if s.delay > 0 {
		select {
		case <-time.After(s.delay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.r.mu.Lock()
	defer s.r.mu.Unlock()
	gens := map[string]bool{}
	for _, e := range b.Events {
		s.r.seen[e.TxPackets]++
		s.r.rules[e.RuleID]++
		s.r.srcs[e.SrcResourceID]++
		gens[e.RuleID+"|"+e.SrcResourceID] = true
		if e.RuleID != "" && e.SrcResourceID != "" && e.RuleID != e.SrcResourceID {
			gens["mismatch "+e.RuleID+"|"+e.SrcResourceID] = true
		}
	}
	if len(gens) > 1 && !s.r.acrossBatches {
		s.r.mixed = append(s.r.mixed, fmt.Sprint(gens))
	}
	if s.writes != nil {
		s.writes.Inc()
	}
	return nil
}

func (s *recSink) Close(context.Context) error {
	s.closed.Store(true)
	return nil
}

// reconfSink is a recSink that takes new options in place.
type reconfSink struct {
	recSink
	h    *reloadHarness
	name string
	tag  atomic.Pointer[string]
}

func (s *reconfSink) Reconfigure(_ context.Context, raw map[string]any) error {
	c := &recConf{}
	if errs := checkRaw(raw, c); errs != nil {
		return errs
	}
	if c.Tag == "restart" {
		return fmt.Errorf("tag restart: %w", component.ErrRestartNeeded)
	}
	s.tag.Store(&c.Tag)
	s.h.mu.Lock()
	s.h.reconfs["sink/"+s.name]++
	s.h.mu.Unlock()
	return nil
}

type stampConf struct {
	Gen   string `yaml:"gen"`
	Field string `yaml:"field"` // rule (RuleID) or src (SrcResourceID)
}

// stamp writes its generation into every event.
type stamp struct{ gen, field string }

func (s *stamp) Enrich(_ context.Context, b *flow.Batch) error {
	for i := range b.Events {
		if s.field == "src" {
			b.Events[i].SrcResourceID = s.gen
		} else {
			b.Events[i].RuleID = s.gen
		}
	}
	return nil
}

// reconfStamp is a stamp that takes new options in place.
type reconfStamp struct {
	h    *reloadHarness
	name string
	cfg  atomic.Pointer[stampConf]
}

func (s *reconfStamp) Enrich(ctx context.Context, b *flow.Batch) error {
	c := s.cfg.Load()
	return (&stamp{gen: c.Gen, field: c.Field}).Enrich(ctx, b)
}

func (s *reconfStamp) Reconfigure(_ context.Context, raw map[string]any) error {
	c := &stampConf{}
	if errs := checkRaw(raw, c); errs != nil {
		return errs
	}
	s.cfg.Store(c)
	s.h.mu.Lock()
	s.h.reconfs["enricher/"+s.name]++
	s.h.mu.Unlock()
	return nil
}

func checkRaw(raw map[string]any, cfg any) error {
	if errs := options.Check(raw, cfg, ""); len(errs) > 0 {
		return errs
	}
	return nil
}

func loadDoc(t *testing.T, yaml string) *config.Document {
	t.Helper()
	doc, err := config.Load(filepath.Join(t.TempDir(), "pipeline.yaml"), []byte(yaml), nil)
	if err != nil {
		t.Fatalf("config: %v\n%s", err, yaml)
	}
	return doc
}

// reloadDoc keeps a document's data_dir across reloads (the disk queues live there).
func (h *reloadHarness) doc(t *testing.T, dataDir, body string) *config.Document {
	t.Helper()
	return loadDoc(t, "data_dir: "+dataDir+"\nruntime:\n  shutdown_timeout: 20s\n"+body)
}

func (h *reloadHarness) start(t *testing.T, doc *config.Document) (*Pipeline, context.CancelFunc, chan error) {
	t.Helper()
	p, err := New(context.Background(), doc, Options{Registry: h.reg})
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := runAsync(p, ctx)
	select {
	case <-p.Running():
	case err := <-done:
		t.Fatalf("run: %v", err)
	}
	t.Cleanup(cancel)
	return p, cancel, done
}

func (h *reloadHarness) reload(t *testing.T, p *Pipeline, doc *config.Document) *ReloadReport {
	t.Helper()
	rep, err := p.Reload(context.Background(), doc)
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	if len(rep.Errors) > 0 {
		t.Fatalf("reload errors: %v", rep.Errors)
	}
	return rep
}

// waitMore waits until sink name has recorded more events than it had.
func (h *reloadHarness) waitMore(t *testing.T, name string, than int) {
	t.Helper()
	r := h.recorder(name)
	waitFor(t, "sink "+name+" to write more", func() bool { return r.count() > than+200 })
}

// finish makes the sources run out, waits for Run and checks that nothing was lost.
func (h *reloadHarness) finish(t *testing.T, p *Pipeline, done chan error) {
	t.Helper()
	close(h.stop)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Run did not return after the sources ran out")
	}
	if n := p.Undelivered(); n != 0 {
		t.Errorf("Undelivered() = %d, want 0", n)
	}
	ok, failed := h.ackedCount()
	h.mu.Lock()
	emitted := h.emitted
	h.mu.Unlock()
	if failed != 0 || int64(ok) != emitted {
		t.Errorf("acks: %d ok, %d failed, of %d emitted", ok, failed, emitted)
	}
	p.mu.Lock()
	nodes := p.sinksEver
	p.mu.Unlock()
	for _, n := range nodes {
		if u, d := n.undelivered.Load(), n.dropped.Load(); u != 0 || d != 0 {
			t.Errorf("sink %s: %d undelivered, %d dropped", n.name, u, d)
		}
	}
}

// exactlyOnce checks that sink name wrote every event acknowledged as delivered, and
// nothing twice.
func (h *reloadHarness) exactlyOnce(t *testing.T, name string) {
	t.Helper()
	r := h.recorder(name)
	h.mu.Lock()
	defer h.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	missing, dup, unknown, ok := 0, 0, 0, 0
	for id, err := range h.acked {
		if err != nil {
			continue // not delivered everywhere, and counted so (Undelivered)
		}
		ok++
		if r.seen[id] == 0 {
			missing++
		}
	}
	for id, n := range r.seen {
		if n > 1 {
			dup++
		}
		if _, known := h.acked[id]; !known {
			unknown++
		}
	}
	if missing > 0 || dup > 0 || unknown > 0 || ok == 0 {
		t.Errorf("sink %s: %d of %d delivered events missing, %d twice, %d never acknowledged", name, missing, ok, dup, unknown)
	}
	h.checkRec(t, name, r)
}

// atMostOnce checks a sink that did not exist throughout: nothing twice, nothing unknown.
func (h *reloadHarness) atMostOnce(t *testing.T, name string) {
	t.Helper()
	r := h.recorder(name)
	h.mu.Lock()
	defer h.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, n := range r.seen {
		if n != 1 {
			t.Errorf("sink %s wrote event %d %d times", name, id, n)
			break
		}
		if _, ok := h.acked[id]; !ok {
			t.Errorf("sink %s wrote event %d that no source acknowledged", name, id)
			break
		}
	}
	h.checkRec(t, name, r)
}

func (h *reloadHarness) checkRec(t *testing.T, name string, r *recorder) {
	t.Helper()
	if len(r.mixed) > 0 {
		t.Errorf("sink %s: %d batches enriched by more than one generation, e.g. %s", name, len(r.mixed), r.mixed[0])
	}
	if n := r.closedW.Load(); n > 0 {
		t.Errorf("sink %s: %d writes to a closed instance", name, n)
	}
}

// knobs is what the 20 reloads turn.
type knobs struct {
	aTag      string
	aMaxEv    int
	aRetry    string
	cOn       bool
	dTag      string
	dSync     string
	dInFlight int
	eDisk     bool
	gen       int
	stampB    bool
	batch     int
}

func (k knobs) yaml() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sources:\n  gen:\n    type: count\n    batch: %d\n", k.batch)
	fmt.Fprintf(&b, "enrichers:\n  - type: stamp\n    name: a\n    field: rule\n    gen: g%d\n", k.gen)
	if k.stampB {
		fmt.Fprintf(&b, "  - type: stamp\n    name: b\n    field: src\n    gen: g%d\n", k.gen)
	}
	b.WriteString("sinks:\n")
	fmt.Fprintf(&b, "  a:\n    type: rec\n    tag: %s\n    queue: {max_events: %d}\n    retry: {initial_interval: %s}\n", k.aTag, k.aMaxEv, k.aRetry)
	if k.cOn {
		b.WriteString("  c:\n    type: rec\n    delay: 1ms\n")
	}
	fmt.Fprintf(&b, "  d:\n    type: rec\n    tag: %s\n    in_flight: %d\n    queue: {type: disk, sync: %s}\n", k.dTag, k.dInFlight, k.dSync)
	// e is slow, so that its queue holds a backlog when its type changes.
	if k.eDisk {
		b.WriteString("  e:\n    type: rec\n    delay: 1ms\n    queue: {type: disk}\n")
	} else {
		b.WriteString("  e:\n    type: rec\n    delay: 1ms\n    queue: {type: memory, max_events: 5000}\n")
	}
	return b.String()
}

// 20 reloads in a row under load, each changing something different: every event reaches
// each sink that existed throughout exactly once, a sink added and removed loses nothing it
// accepted, and no batch is enriched half by the old chain and half by the new.
func TestTwentyReloadsUnderLoad(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	k := knobs{aTag: "x", aMaxEv: 2000, aRetry: "100ms", dTag: "x", dSync: "batch", dInFlight: 1, gen: 1, batch: 20}
	p, _, done := h.start(t, h.doc(t, dataDir, k.yaml()))
	h.waitMore(t, "a", 0)
	// What the admin listener and flowpipe run read, read all along (-race checks them).
	pollStop := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		for {
			select {
			case <-pollStop:
				return
			case <-time.After(time.Millisecond):
			}
			_ = p.Ready()
			_ = p.Undelivered()
			_ = p.Document().Sinks
		}
	}()
	steps := []struct {
		what   string
		change func(*knobs)
		check  func(*ReloadReport) error
	}{
		{"sink option (replaced)", func(k *knobs) { k.aTag = "y" }, changed("sink/a", "tag")},
		{"enricher added", func(k *knobs) { k.stampB = true }, started("enricher/b")},
		{"sink added", func(k *knobs) { k.cOn = true }, started("sink/c")},
		{"memory queue size", func(k *knobs) { k.aMaxEv = 3000 }, changed("sink/a", "queue.max_events")},
		{"disk-queued sink option", func(k *knobs) { k.dTag = "y" }, changed("sink/d", "tag")},
		{"enricher generation", func(k *knobs) { k.gen++ }, changed("enricher/a", "gen")},
		{"sink removed", func(k *knobs) { k.cOn = false }, stopped("sink/c")},
		{"disk queue sync (same directory)", func(k *knobs) { k.dSync = "interval" }, changed("sink/d", "queue.sync")},
		{"retry setting", func(k *knobs) { k.aRetry = "200ms" }, changed("sink/a", "retry.initial_interval")},
		{"in_flight", func(k *knobs) { k.dInFlight = 3 }, changed("sink/d", "in_flight")},
		{"memory queue to disk", func(k *knobs) { k.eDisk = true }, changed("sink/e", "queue.type")},
		{"both enrichers' generation", func(k *knobs) { k.gen++ }, changed("enricher/b", "gen")},
		{"source option (replaced, overlapping)", func(k *knobs) { k.batch = 7 }, changed("source/gen", "batch")},
		{"disk queue to memory", func(k *knobs) { k.eDisk = false }, changed("sink/e", "queue.type")},
		{"sink added again", func(k *knobs) { k.cOn = true }, started("sink/c")},
		{"enricher removed", func(k *knobs) { k.stampB = false }, stopped("enricher/b")},
		{"sink option and queue at once", func(k *knobs) { k.aTag = "z"; k.aMaxEv = 2500 }, changed("sink/a", "queue.max_events", "tag")},
		{"sink removed again", func(k *knobs) { k.cOn = false }, stopped("sink/c")},
		{"disk queue sync back", func(k *knobs) { k.dSync = "batch"; k.dInFlight = 1 }, changed("sink/d", "in_flight", "queue.sync")},
		{"nothing", func(*knobs) {}, func(r *ReloadReport) error {
			if len(r.Started)+len(r.Stopped)+len(r.Changed) > 0 {
				return fmt.Errorf("an unchanged file changed %v %v %v", r.Started, r.Stopped, r.Changed)
			}
			return nil
		}},
	}
	for i, st := range steps {
		st.change(&k)
		before := h.recorder("a").count()
		rep := h.reload(t, p, h.doc(t, dataDir, k.yaml()))
		if err := st.check(rep); err != nil {
			t.Fatalf("reload %d (%s): %v (report %+v)", i+1, st.what, err, rep)
		}
		h.waitMore(t, "a", before) // events flow after every reload
	}
	close(pollStop)
	<-polled
	h.finish(t, p, done)
	for _, s := range []string{"a", "d", "e"} {
		h.exactlyOnce(t, s)
	}
	h.atMostOnce(t, "c")
	if n := h.buildsOf("source/gen"); n != 2 {
		t.Errorf("source built %d times, want 2 (one replacement)", n)
	}
}

func changed(comp string, keys ...string) func(*ReloadReport) error {
	return func(r *ReloadReport) error {
		for _, c := range r.Changed {
			if c.Component == comp {
				for _, k := range keys {
					found := false
					for _, ck := range c.Keys {
						found = found || ck == k
					}
					if !found {
						return fmt.Errorf("%s changed %v, want %v", comp, c.Keys, keys)
					}
				}
				return nil
			}
		}
		return fmt.Errorf("%s not in Changed %+v", comp, r.Changed)
	}
}

func started(comp string) func(*ReloadReport) error {
	return func(r *ReloadReport) error { return listed(comp, "Started", r.Started) }
}

func stopped(comp string) func(*ReloadReport) error {
	return func(r *ReloadReport) error { return listed(comp, "Stopped", r.Stopped) }
}

func listed(comp, what string, list []string) error {
	if slices.Contains(list, comp) {
		return nil
	}
	return fmt.Errorf("%s not in %s %v", comp, what, list)
}

// A document with a problem changes nothing: the problems come back positioned, the running
// instances go on, and nothing new was left built.
func TestBrokenReloadChangesNothing(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	good := "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec}\n"
	p, _, done := h.start(t, h.doc(t, dataDir, good))
	h.waitMore(t, "a", 0)
	bad := "sources:\n  gen: {type: count}\n  two: {type: count, batch: nope}\nsinks:\n  a: {type: rec, tag: other}\n  b:\n    type: rec\n    queue: {max_events: -1}\n"
	rep, err := p.Reload(context.Background(), h.doc(t, dataDir, bad))
	var probs config.Problems
	if !errors.As(err, &probs) || rep != nil {
		t.Fatalf("Reload = %v, %v; want config.Problems", rep, err)
	}
	msg := probs.Error()
	for _, want := range []string{"pipeline.yaml:6: sources.two.batch:", "pipeline.yaml:11: sinks.b.queue.max_events: must be at least 1"} {
		if !strings.Contains(msg, want) {
			t.Errorf("problems miss %q:\n%s", want, msg)
		}
	}
	if n := h.buildsOf("sink/a"); n != 2 { // the first, and the refused replacement
		t.Errorf("sink a built %d times, want 2", n)
	}
	if p.Document().Sinks[0].Options["tag"] != nil {
		t.Error("the refused document became the pipeline's")
	}
	before := h.recorder("a").count()
	h.waitMore(t, "a", before) // the old pipeline goes on
	// A correct file afterwards is applied.
	rep = h.reload(t, p, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec, tag: fixed}\n"))
	if err := changed("sink/a", "tag")(rep); err != nil {
		t.Fatal(err)
	}
	h.finish(t, p, done)
	h.exactlyOnce(t, "a")
	if n := h.recorder("a").closedW.Load(); n != 0 {
		t.Errorf("%d writes to the refused instance", n)
	}
}

// A component that implements component.Reconfigurer takes new options in place: the same
// instance goes on; a change it cannot take (ErrRestartNeeded) replaces it.
func TestReconfigurerKeepsItsInstance(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	batch := 10
	doc := func(gen, tag string) *config.Document {
		batch++ // each document changes the source's batch size too
		return h.doc(t, dataDir, fmt.Sprintf("sources:\n  gen: {type: recount, batch: %d}\nenrichers:\n  - {type: restamp, name: a, field: rule, gen: %s}\n  - {type: restamp, name: b, field: src, gen: %s}\nsinks:\n  out: {type: rerec, tag: %s}\n", batch, gen, gen, tag))
	}
	p, _, done := h.start(t, doc("g1", "t1"))
	h.waitMore(t, "out", 0)
	for i := 2; i <= 5; i++ {
		before := h.recorder("out").count()
		rep := h.reload(t, p, doc(fmt.Sprintf("g%d", i), fmt.Sprintf("t%d", i)))
		for _, c := range rep.Changed {
			if c.How != HowReconfigured {
				t.Errorf("reload %d: %s %s, want reconfigured", i, c.Component, c.How)
			}
		}
		if len(rep.Changed) != 4 {
			t.Errorf("reload %d: changed %+v, want 4 components", i, rep.Changed)
		}
		h.waitMore(t, "out", before)
	}
	for _, k := range []string{"source/gen", "enricher/a", "enricher/b", "sink/out"} {
		if n := h.buildsOf(k); n != 1 {
			t.Errorf("%s built %d times, want 1", k, n)
		}
		h.mu.Lock()
		n := h.reconfs[k]
		h.mu.Unlock()
		if n != 4 {
			t.Errorf("%s reconfigured %d times, want 4", k, n)
		}
	}
	sink := p.topo.Load().sinks[0].component().(*reconfSink)
	if got := *sink.tag.Load(); got != "t5" {
		t.Errorf("sink tag %q, want t5", got)
	}
	// A change it cannot take in place: a new instance.
	rep := h.reload(t, p, doc("g5", "restart")) // the batch size changes too (in place)
	if err := changed("sink/out", "tag")(rep); err != nil || len(rep.Changed) != 2 {
		t.Errorf("changed %+v, want sink/out and source/gen", rep.Changed)
	}
	for _, c := range rep.Changed {
		if want := map[string]string{"sink/out": HowReplaced, "source/gen": HowReconfigured}[c.Component]; c.How != want {
			t.Errorf("%s %s, want %s", c.Component, c.How, want)
		}
	}
	if n := h.buildsOf("sink/out"); n != 2 {
		t.Errorf("sink built %d times after ErrRestartNeeded, want 2", n)
	}
	// An option the factory refuses refuses the reload, though the instance would be
	// reconfigured in place.
	if _, err := p.Reload(context.Background(), h.doc(t, dataDir, "sources:\n  gen: {type: recount, batch: 24}\nenrichers:\n  - {type: restamp, name: a, field: rule, gen: g5, surplus: 1}\n  - {type: restamp, name: b, field: src, gen: g5}\nsinks:\n  out: {type: rerec, tag: restart}\n")); err == nil || !strings.Contains(err.Error(), "enrichers[0].surplus") {
		t.Errorf("Reload with an unknown option = %v, want a problem at enrichers[0].surplus", err)
	}
	h.finish(t, p, done)
	h.exactlyOnce(t, "out")
}

// A removed sink delivers what its queue holds before it stops, slow as it is; the sources'
// batches are acknowledged only then.
func TestRemovedSlowSinkDeliversItsQueue(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	p, _, done := h.start(t, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  fast: {type: rec}\n  slow:\n    type: rec\n    delay: 5ms\n    in_flight: 2\n    queue: {max_events: 4000}\n"))
	slow := p.topo.Load().sinks[1]
	waitFor(t, "the slow sink's queue to fill", func() bool { _, ev := slow.queue.depth(); return ev > 1000 })
	rep := h.reload(t, p, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  fast: {type: rec}\n"))
	if err := stopped("sink/slow")(rep); err != nil {
		t.Fatal(err)
	}
	written := int64(h.recorder("slow").count())
	if rep.Delivered["slow"] == 0 || rep.Undelivered["slow"] != 0 {
		t.Errorf("removed slow sink delivered %d, undelivered %d", rep.Delivered["slow"], rep.Undelivered["slow"])
	}
	if _, ev := slow.queue.depth(); ev != 0 {
		t.Errorf("the removed sink's queue still holds %d events", ev)
	}
	if got := int64(testutilCounter(slow.m.In)); got != written {
		t.Errorf("slow sink accepted %d events and wrote %d", got, written)
	}
	h.finish(t, p, done)
	h.exactlyOnce(t, "fast")
	h.atMostOnce(t, "slow")
}

// A removed sink that cannot deliver within runtime.shutdown_timeout counts what it gave up:
// Undelivered (and so flowpipe run's exit status) says so.
func TestRemovedStuckSinkCountsWhatItGaveUp(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	doc := func(body string) *config.Document {
		return loadDoc(t, "data_dir: "+dataDir+"\nruntime:\n  shutdown_timeout: 200ms\n"+body)
	}
	p, _, done := h.start(t, doc("sources:\n  gen: {type: count}\nsinks:\n  fast: {type: rec}\n  stuck:\n    type: rec\n    delay: 1h\n    queue: {max_events: 500}\n"))
	stuck := p.topo.Load().sinks[1]
	waitFor(t, "the stuck sink's queue to fill", func() bool { _, ev := stuck.queue.depth(); return ev >= 400 })
	rep := h.reload(t, p, doc("sources:\n  gen: {type: count}\nsinks:\n  fast: {type: rec}\n"))
	if rep.Undelivered["stuck"] == 0 || rep.Delivered["stuck"] != 0 {
		t.Errorf("stuck sink: delivered %d, undelivered %d", rep.Delivered["stuck"], rep.Undelivered["stuck"])
	}
	if got := p.Undelivered(); got < rep.Undelivered["stuck"] {
		t.Errorf("Undelivered() = %d, below the removed sink's %d", got, rep.Undelivered["stuck"])
	}
	h.waitMore(t, "fast", h.recorder("fast").count())
	close(h.stop) // the sources run out: the rest drains without a deadline
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := p.Undelivered(); got != rep.Undelivered["stuck"] {
		t.Errorf("after Run, Undelivered() = %d, want the removed sink's %d", got, rep.Undelivered["stuck"])
	}
}

// A shutdown right after a reload drains everything, the new and the handed-over.
func TestShutdownRightAfterReload(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	p, cancel, done := h.start(t, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a:\n    type: rec\n    delay: 1ms\n    queue: {max_events: 3000}\n  d:\n    type: rec\n    queue: {type: disk}\n"))
	h.waitMore(t, "a", 0)
	h.reload(t, p, h.doc(t, dataDir, "sources:\n  gen: {type: count, batch: 9}\nsinks:\n  a:\n    type: rec\n    tag: new\n    queue: {max_events: 2000}\n  d:\n    type: rec\n    tag: new\n    queue: {type: disk, sync: interval}\n  n: {type: rec}\n"))
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run: %v", err)
	}
	// A batch a source was still waiting to queue when told to stop is given up and
	// counted (as at any shutdown); nothing else may be missing.
	_, failed := h.ackedCount()
	if n := p.Undelivered(); n != int64(failed) {
		t.Errorf("Undelivered() = %d, but %d events were acknowledged with an error", n, failed)
	}
	h.exactlyOnce(t, "a")
	h.atMostOnce(t, "n")
	h.atMostOnce(t, "d")
}

// Reload and shutdown race: a reload asked for while Run stops is refused or applied whole,
// never half, and Run drains either way.
func TestReloadRacingShutdown(t *testing.T) {
	for i := range 5 {
		h := newReloadHarness()
		dataDir := t.TempDir()
		p, cancel, done := h.start(t, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec}\n"))
		h.waitMore(t, "a", 0)
		errc := make(chan error, 1)
		go func() {
			_, err := p.Reload(context.Background(), h.doc(t, dataDir, fmt.Sprintf("sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec, tag: t%d}\n  b: {type: rec}\n", i)))
			errc <- err
		}()
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("run: %v", err)
		}
		<-errc // applied or refused as not running: either is fine
		if _, failed := h.ackedCount(); p.Undelivered() != int64(failed) {
			t.Errorf("Undelivered() = %d, but %d events were acknowledged with an error", p.Undelivered(), failed)
		}
		h.exactlyOnce(t, "a")
		h.atMostOnce(t, "b")
		if _, err := p.Reload(context.Background(), h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec}\n")); err == nil {
			t.Error("Reload after Run returned succeeded")
		}
	}
}

// enabled: false builds nothing of the component; of the whole pipeline, nothing at all, and
// Run waits for a reload or a stop.
func TestEnabledFalse(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	p, cancel, done := h.start(t, h.doc(t, dataDir, "enabled: false\nsources:\n  gen: {type: count}\nsinks:\n  a: {type: rec}\n"))
	if n := h.buildsOf("source/gen") + h.buildsOf("sink/a"); n != 0 {
		t.Fatalf("a disabled pipeline built %d components", n)
	}
	select {
	case err := <-done:
		t.Fatalf("a disabled pipeline's Run returned: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	rep := h.reload(t, p, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec}\n  b: {type: rec, enabled: false}\n"))
	if len(rep.Started) != 2 {
		t.Errorf("started %v, want source/gen and sink/a", rep.Started)
	}
	h.waitMore(t, "a", 0)
	if n := h.buildsOf("sink/b"); n != 0 {
		t.Errorf("disabled sink b built %d times", n)
	}
	rep = h.reload(t, p, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec, enabled: false}\n  b: {type: rec}\n"))
	if err := stopped("sink/a")(rep); err != nil {
		t.Error(err)
	}
	if err := started("sink/b")(rep); err != nil {
		t.Error(err)
	}
	h.waitMore(t, "b", 0)
	// A disabled component is still checked.
	if _, err := p.Reload(context.Background(), h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec, enabled: false, surplus: 1}\n  b: {type: rec}\n")); err == nil || !strings.Contains(err.Error(), "sinks.a.surplus") {
		t.Errorf("a disabled sink's unknown option: %v", err)
	}
	// Every sink off while a source runs would send events nowhere.
	if _, err := p.Reload(context.Background(), h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  b: {type: rec, enabled: false}\n")); err == nil || !strings.Contains(err.Error(), "every sink is disabled") {
		t.Errorf("every sink disabled: %v", err)
	}
	// The whole pipeline off again: everything stops, Run goes on.
	rep = h.reload(t, p, h.doc(t, dataDir, "enabled: false\nsources:\n  gen: {type: count}\nsinks:\n  b: {type: rec}\n"))
	if len(rep.Stopped) != 2 {
		t.Errorf("stopped %v, want source/gen and sink/b", rep.Stopped)
	}
	select {
	case err := <-done:
		t.Fatalf("Run returned once the pipeline was disabled: %v", err)
	default:
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := p.Undelivered(); n != 0 {
		t.Errorf("Undelivered() = %d", n)
	}
	// Each batch went to a (before the switch) or to b (after), whole.
	h.mu.Lock()
	defer h.mu.Unlock()
	ra, rb := h.recs["a"], h.recs["b"]
	ra.mu.Lock()
	defer ra.mu.Unlock()
	rb.mu.Lock()
	defer rb.mu.Unlock()
	bad := 0
	for id := range h.acked {
		if ra.seen[id]+rb.seen[id] != 1 {
			bad++
		}
	}
	if bad > 0 || len(h.acked) == 0 {
		t.Errorf("%d of %d events not written exactly once by a or b", bad, len(h.acked))
	}
}

func testutilCounter(c interface{ Write(*dto.Metric) error }) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}

// holder keeps every event it sees (as a window would) and emits them all when it closes;
// the batches it took them from are acknowledged once what it emitted is.
type holder struct {
	next   component.Emitter
	mu     sync.Mutex
	events []flow.Event
	held   []*flow.Batch
}

func (h *holder) Attach(next component.Emitter) { h.next = next }
func (h *holder) Enrich(_ context.Context, b *flow.Batch) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, b.Events...)
	b.Retain()
	h.held = append(h.held, b)
	b.Events = b.Events[:0]
	return nil
}
func (h *holder) Close(ctx context.Context) error {
	h.mu.Lock()
	events, held := h.events, h.held
	h.events, h.held = nil, nil
	h.mu.Unlock()
	if len(events) == 0 {
		return nil
	}
	return h.next.Emit(ctx, flow.NewBatch(events, func(err error) {
		for _, b := range held {
			b.Release(err)
		}
	}))
}

// A holder that a reload removes flushes what it holds through the stages after it (the old
// chain's), before it goes: nothing it held is lost.
func TestRemovedHolderFlushes(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	p, _, done := h.start(t, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nenrichers:\n  - {type: hold, name: h}\n  - {type: stamp, name: a, field: rule, gen: g1}\nsinks:\n  out: {type: rec}\n"))
	hn := p.topo.Load().enrich[0]
	waitFor(t, "the holder to hold events", func() bool {
		hl := hn.en.(*holder)
		hl.mu.Lock()
		defer hl.mu.Unlock()
		return len(hl.events) > 500
	})
	if n := h.recorder("out").count(); n != 0 {
		t.Fatalf("the sink wrote %d events before the holder let go", n)
	}
	rep := h.reload(t, p, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nenrichers:\n  - {type: stamp, name: a, field: rule, gen: g1}\nsinks:\n  out: {type: rec}\n"))
	if err := stopped("enricher/h")(rep); err != nil {
		t.Fatal(err)
	}
	if n := h.buildsOf("enricher/a"); n != 1 {
		t.Errorf("the kept enricher was built %d times", n)
	}
	h.waitMore(t, "out", 0)
	h.finish(t, p, done)
	h.exactlyOnce(t, "out")
	// What the holder flushed went through the enricher after it.
	r := h.recorder("out")
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.rules[""] != 0 || r.rules["g1"] != len(r.seen) {
		t.Errorf("events by stamp %v: the holder's flush skipped the enricher after it", r.rules)
	}
}

// A replaced component's own metrics (Env.Register) are the new instance's once it is in:
// one series, no duplicate registration, no gather error; a refused reload leaves the old.
func TestReplacedComponentsMetrics(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	p, _, done := h.start(t, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec}\n"))
	h.waitMore(t, "a", 0)
	series := func() (n int, v float64) {
		t.Helper()
		fams, err := p.Metrics().Registry.Gather()
		if err != nil {
			t.Fatalf("gather: %v", err)
		}
		for _, f := range fams {
			if f.GetName() == "flowpipe_test_writes_total" {
				for _, m := range f.GetMetric() {
					n++
					v = m.GetCounter().GetValue()
				}
			}
		}
		return n, v
	}
	if n, _ := series(); n != 1 {
		t.Fatalf("%d series before the reload", n)
	}
	if _, err := p.Reload(context.Background(), h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec, tag: x, surplus: 1}\n")); err == nil {
		t.Fatal("a reload with an unknown option was applied")
	}
	old := p.topo.Load().sinks[0].component().(*recSink)
	h.reload(t, p, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec, tag: x}\n"))
	oldWrites := testutilCounter(old.writes) // final: it is closed
	cur := p.topo.Load().sinks[0].component().(*recSink)
	waitFor(t, "the new instance to write more than the old", func() bool { return testutilCounter(cur.writes) > oldWrites })
	n, v := series()
	if n != 1 || v <= oldWrites {
		t.Errorf("after the reload: %d series, value %v; the old instance wrote %v batches, the new %v", n, v, oldWrites, testutilCounter(cur.writes))
	}
	h.finish(t, p, done)
}

// A sink a reload adds that can never write (flow.Fatal) stops the pipeline, as one built at
// the start would.
func TestFatalNewSinkStopsThePipeline(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	p, _, done := h.start(t, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec}\n"))
	h.waitMore(t, "a", 0)
	h.reload(t, p, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec}\n  broken: {type: rec, fatal: true}\n"))
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("a fatal new sink did not stop the pipeline")
	}
	if err := p.topo.Load().sinks[1].health(); err == nil || !strings.Contains(err.Error(), "cannot write any more") {
		t.Errorf("the fatal sink's health: %v", err)
	}
}

// A kept holder whose place in the chain moves emits into the stages after its new place.
func TestKeptHolderFollowsItsNewPlace(t *testing.T) {
	h := newReloadHarness()
	h.recorder("out").acrossBatches = true
	dataDir := t.TempDir()
	p, cancel, done := h.start(t, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nenrichers:\n  - {type: stamp, name: a, field: rule, gen: g1}\n  - {type: hold, name: h}\n  - {type: stamp, name: x, field: src, gen: s1}\nsinks:\n  out: {type: rec}\n"))
	hn := p.topo.Load().enrich[1]
	held := func() int {
		hl := hn.en.(*holder)
		hl.mu.Lock()
		defer hl.mu.Unlock()
		return len(hl.events)
	}
	waitFor(t, "the holder to hold events", func() bool { return held() > 200 })
	rep := h.reload(t, p, h.doc(t, dataDir, "sources:\n  gen: {type: count}\nenrichers:\n  - {type: hold, name: h}\n  - {type: stamp, name: x, field: src, gen: s1}\nsinks:\n  out: {type: rec}\n"))
	if err := stopped("enricher/a")(rep); err != nil {
		t.Fatal(err)
	}
	if p.topo.Load().enrich[0] != hn || h.buildsOf("enricher/h") != 1 {
		t.Fatal("the holder was not kept")
	}
	before := held()
	waitFor(t, "the holder to hold more", func() bool { return held() > before+200 })
	cancel() // the holder flushes at shutdown, from its new place
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	r := h.recorder("out")
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.seen) == 0 || r.srcs["s1"] != len(r.seen) || r.rules["g1"] == 0 || r.rules[""] == 0 {
		t.Errorf("%d events; by stamp x %v, by the removed stamp a %v: want every event through x, some through a", len(r.seen), r.srcs, r.rules)
	}
}

// The NetBird case: the collector is gone, the sink's queue is full, the sources wait; a
// reload that points the sink elsewhere (here: a working instance) goes through, and what
// the full queue held is delivered by the new instance. Also when the queue changes too.
func TestReloadUnblocksAStuckSink(t *testing.T) {
	for _, queue := range []string{"{max_events: 400}", "{max_events: 300}", "{type: disk, max_size: 1MiB}", "queue only"} {
		t.Run(queue, func(t *testing.T) {
			h := newReloadHarness()
			dataDir := t.TempDir()
			doc := func(down bool) *config.Document {
				q := "{max_events: 400}"
				if !down {
					q = queue
				}
				if queue == "queue only" {
					// The collector stays gone; only the queue changes: the reload goes
					// through, and the events wait in the new queue.
					down, q = true, "{max_events: 400}"
					if h.buildsOf("sink/a") > 0 {
						q = "{max_events: 500}"
					}
				}
				return h.doc(t, dataDir, fmt.Sprintf("sources:\n  gen: {type: count}\nsinks:\n  a:\n    type: rec\n    down: %v\n    queue: %s\n    retry: {initial_interval: 5ms, max_interval: 20ms}\n", down, q))
			}
			p, cancel, done := h.start(t, doc(true))
			a := p.topo.Load().sinks[0]
			waitFor(t, "the queue to fill", func() bool { _, ev := a.queue.depth(); return ev >= 380 })
			rep := h.reload(t, p, doc(false))
			if queue == "queue only" {
				if err := changed("sink/a", "queue.max_events")(rep); err != nil {
					t.Fatal(err)
				}
				n := p.topo.Load().sinks[0]
				waitFor(t, "the new queue to fill", func() bool { _, ev := n.queue.depth(); return ev >= 480 })
				// Stopped with the collector still gone: what the queue holds is counted.
				cancel()
				p.Abort()
				<-done
				if n := p.Undelivered(); n < 480 {
					t.Errorf("Undelivered() = %d after a stop with a full queue", n)
				}
				return
			}
			if err := changed("sink/a", "down")(rep); err != nil {
				t.Fatal(err)
			}
			if rep.HandedOver["a"] < 380 {
				t.Errorf("handed over %d events, want the full queue's", rep.HandedOver["a"])
			}
			h.waitMore(t, "a", 0)
			h.finish(t, p, done)
			h.exactlyOnce(t, "a")
		})
	}
}

func TestOptionChangesNamesKeyPaths(t *testing.T) {
	a := map[string]any{"url": "x", "queue": map[string]any{"type": "disk", "max_size": "1GiB"}, "list": []any{1, 2}, "gone": 1}
	b := map[string]any{"url": "y", "queue": map[string]any{"type": "disk", "max_size": "2GiB", "sync": "interval"}, "list": []any{1, 2}, "new": true}
	got := strings.Join(optionChanges(a, b, ""), ",")
	if want := "gone,new,queue.max_size,queue.sync,url"; got != want {
		t.Errorf("optionChanges = %s, want %s", got, want)
	}
	if got := optionChanges(a, a, ""); len(got) != 0 {
		t.Errorf("no change: %v", got)
	}
}

// BenchmarkReloadUnderLoad measures one reload that replaces a memory-queued sink's component
// while a source keeps its queue full, in process:
//
//	go test -run '^$' -bench ReloadUnderLoad -benchtime 20x ./core/pipeline/
func BenchmarkReloadUnderLoad(b *testing.B) {
	h := newReloadHarness()
	dataDir := b.TempDir()
	doc := func(i int) *config.Document {
		d, err := config.Load(filepath.Join(dataDir, "pipeline.yaml"), []byte(fmt.Sprintf("data_dir: %s\nsources:\n  gen: {type: count}\nsinks:\n  a: {type: rec, tag: t%d}\n  b: {type: rec}\n", dataDir, i)), nil)
		if err != nil {
			b.Fatal(err)
		}
		return d
	}
	p, err := New(context.Background(), doc(0), Options{Registry: h.reg, Logger: slogDiscard()})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := runAsync(p, ctx)
	<-p.Running()
	var handed int64
	b.ResetTimer()
	for i := range b.N {
		rep, err := p.Reload(context.Background(), doc(i+1))
		if err != nil {
			b.Fatal(err)
		}
		handed += rep.HandedOver["a"]
	}
	b.StopTimer()
	b.ReportMetric(float64(handed)/float64(b.N), "handed_over/op")
	cancel()
	<-done
}

func slogDiscard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// A changed source whose new instance fails to start goes on as it was: the reload reports
// the error, and the change says how=failed, not replaced.
func TestFailedSourceReplacementIsNotReportedReplaced(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	p, _, done := h.start(t, h.doc(t, dataDir, "sources:\n  gen: {type: startcount}\nsinks:\n  out: {type: rec}\n"))
	h.waitMore(t, "out", 0)
	rep, err := p.Reload(context.Background(), h.doc(t, dataDir, "sources:\n  gen: {type: startcount, tag: fail}\nsinks:\n  out: {type: rec}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Errors) != 1 || !strings.Contains(rep.Errors[0], "address already in use") {
		t.Errorf("errors %v, want the new instance's start failure", rep.Errors)
	}
	if len(rep.Changed) != 1 || rep.Changed[0].Component != "source/gen" || rep.Changed[0].How != HowFailed {
		t.Errorf("changed %+v, want source/gen how=failed", rep.Changed)
	}
	h.waitMore(t, "out", h.recorder("out").count()) // the old instance goes on
	h.finish(t, p, done)
	h.exactlyOnce(t, "out")
}

// A reload that removes components removes their tap points (a removed sink, a removed
// enricher, a sink turned off with enabled: false): they are no longer listed, and a tap
// following one ends; a replaced component keeps its tap point, with its subscribers.
func TestReloadRemovesTheTapPointsOfRemovedComponents(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	p, _, done := h.start(t, h.doc(t, dataDir, `sources:
  gen: {type: count}
enrichers:
  - {type: stamp, name: st, field: rule, gen: g1}
sinks:
  a: {type: rec}
  b: {type: rec}
  c: {type: rec}
`))
	h.waitMore(t, "b", 0)
	names := func() string { return strings.Join(p.Taps().Names(), " ") }
	if got := names(); got != "(sinks) a b c gen st" {
		t.Fatalf("tap points at start: %s", got)
	}
	hubOf := func(name string) *tap.Hub {
		t.Helper()
		hub, ok := p.Taps().Lookup(name)
		if !ok {
			t.Fatalf("no tap point %s", name)
		}
		return hub
	}
	aHub := hubOf("a")
	subA, _ := aHub.Subscribe(nil, 1<<20, false, 0, 0)
	defer subA.Close()
	subB, _ := hubOf("b").Subscribe(nil, 1<<20, false, 0, 0)
	defer subB.Close()
	rep := h.reload(t, p, h.doc(t, dataDir, `sources:
  gen: {type: count}
sinks:
  a: {type: rec, tag: new}
  c: {type: rec, enabled: false}
`))
	reloaded := flow.Now()
	for _, check := range []func(*ReloadReport) error{stopped("sink/b"), stopped("sink/c"), stopped("enricher/st"), changed("sink/a", "tag")} {
		if err := check(rep); err != nil {
			t.Error(err)
		}
	}
	if got := names(); got != "(sinks) a gen" {
		t.Errorf("tap points after the reload: %s, want (sinks) a gen", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		_, _, err := subB.Next(ctx)
		if errors.Is(err, tap.ErrRemoved) {
			break
		}
		if err != nil {
			t.Fatalf("the removed sink's tap: %v, want it to end with tap.ErrRemoved", err)
		}
	}
	if hubOf("a") != aHub || aHub.Subscribers() != 1 {
		t.Error("the replaced sink a lost its tap point or its subscriber")
	}
	// The replaced sink's tap goes on with what is handed to the new instance.
	for after := false; !after; {
		recs, _, err := subA.Next(ctx)
		if err != nil {
			t.Fatalf("tap of the replaced sink after the reload: %v", err)
		}
		for _, r := range recs {
			after = after || r.Seen >= reloaded
		}
	}
	h.finish(t, p, done)
}

// remoteCollector is an unchecked collector (it describes nothing), as a plugin component's
// remote metrics are (internal/pluginhost): one series naming its instance's tag.
type remoteCollector struct{ tag string }

func (c *remoteCollector) Describe(chan<- *prometheus.Desc) {}
func (c *remoteCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(prometheus.NewDesc("flowpipe_test_remote_instance", "The instance's tag.", []string{"tag"}, nil),
		prometheus.GaugeValue, 1, c.tag)
}

// A replaced or removed component's unchecked collector (a plugin's remote metrics describe
// nothing: the Prometheus registry cannot unregister such a collector) goes with it: its
// series are gone, the new instance's are there once, and the registry no longer holds the
// old collector (nor, through it, the old instance).
func TestReplacedComponentsUncheckedCollectorIsReleased(t *testing.T) {
	h := newReloadHarness()
	dataDir := t.TempDir()
	yaml := func(sinks string) string { return "sources:\n  gen: {type: count}\nsinks:\n  a: {type: rec}\n" + sinks }
	p, _, done := h.start(t, h.doc(t, dataDir, yaml("  r: {type: remote, tag: one}\n")))
	tags := func() []string {
		t.Helper()
		fams, err := p.Metrics().Registry.Gather()
		if err != nil {
			t.Fatalf("gather: %v", err)
		}
		var out []string
		for _, f := range fams {
			if f.GetName() != "flowpipe_test_remote_instance" {
				continue
			}
			for _, m := range f.GetMetric() {
				labels := map[string]string{}
				for _, l := range m.GetLabel() {
					labels[l.GetName()] = l.GetValue()
				}
				out = append(out, labels["component"]+"/"+labels["kind"]+"/"+labels["tag"])
			}
		}
		sort.Strings(out)
		return out
	}
	if got := fmt.Sprint(tags()); got != "[r/sink/one]" {
		t.Fatalf("series at start: %s", got)
	}
	for _, tag := range []string{"two", "three"} {
		h.reload(t, p, h.doc(t, dataDir, yaml("  r: {type: remote, tag: "+tag+"}\n")))
		if got, want := fmt.Sprint(tags()), "[r/sink/"+tag+"]"; got != want {
			t.Errorf("series after the reload to %s: %s, want %s", tag, got, want)
		}
	}
	h.reload(t, p, h.doc(t, dataDir, yaml("")))
	if got := tags(); len(got) != 0 {
		t.Errorf("series after r was removed: %v", got)
	}
	h.mu.Lock()
	remotes := slices.Clone(h.remotes)
	h.mu.Unlock()
	if len(remotes) != 3 {
		t.Fatalf("%d remote sink instances built, want 3", len(remotes))
	}
	runtime.GC()
	runtime.GC()
	for i, w := range remotes {
		if w.Value() != nil {
			t.Errorf("the collector of instance %d (of 3, all replaced or removed) is still held", i+1)
		}
	}
	h.finish(t, p, done)
}
