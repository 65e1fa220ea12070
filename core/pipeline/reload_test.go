package pipeline

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
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
	reconfs map[string]int // "kind/name" → Reconfigure calls
}

type recorder struct {
	mu      sync.Mutex
	seen    map[uint64]int
	mixed   []string // batches with more than one generation
	closedW atomic.Int64
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
	h.reg.Register(component.NewSinkFactory("rec", "", func() *recConf { return &recConf{} },
		func(env component.Env, c *recConf) (component.Sink, error) {
			h.built("sink/" + env.Name)
			return &recSink{r: h.recorder(env.Name), delay: c.Delay}, nil
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
		r = &recorder{seen: map[uint64]int{}}
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

type recConf struct {
	Delay time.Duration `yaml:"delay"`
	Tag   string        `yaml:"tag"`
}

// recSink records the IDs it wrote; every event of a batch must carry one generation
// (RuleID and SrcResourceID, stamped by two enrichers, equal and the same for the batch).
type recSink struct {
	r      *recorder
	delay  time.Duration
	closed atomic.Bool
}

func (s *recSink) Write(ctx context.Context, b *flow.Batch) error {
	if s.closed.Load() {
		s.r.closedW.Add(1)
		return errors.New("write after close")
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
		gens[e.RuleID+"|"+e.SrcResourceID] = true
		if e.RuleID != e.SrcResourceID && e.SrcResourceID != "" {
			gens["mismatch "+e.RuleID+"|"+e.SrcResourceID] = true
		}
	}
	if len(gens) > 1 {
		s.r.mixed = append(s.r.mixed, fmt.Sprint(gens))
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

// exactlyOnce checks that sink name wrote every acknowledged event exactly once.
func (h *reloadHarness) exactlyOnce(t *testing.T, name string) {
	t.Helper()
	r := h.recorder(name)
	h.mu.Lock()
	defer h.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	missing, dup := 0, 0
	for id := range h.acked {
		switch r.seen[id] {
		case 0:
			missing++
		case 1:
		default:
			dup++
		}
	}
	if missing > 0 || dup > 0 || len(r.seen) != len(h.acked) {
		t.Errorf("sink %s: %d of %d events missing, %d twice, %d written", name, missing, len(h.acked), dup, len(r.seen))
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
	if k.eDisk {
		b.WriteString("  e:\n    type: rec\n    queue: {type: disk}\n")
	} else {
		b.WriteString("  e:\n    type: rec\n    queue: {type: memory, max_events: 5000}\n")
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
	return func(r *ReloadReport) error {
		for _, c := range r.Started {
			if c == comp {
				return nil
			}
		}
		return fmt.Errorf("%s not in Started %v", comp, r.Started)
	}
}

func stopped(comp string) func(*ReloadReport) error {
	return func(r *ReloadReport) error {
		for _, c := range r.Stopped {
			if c == comp {
				return nil
			}
		}
		return fmt.Errorf("%s not in Stopped %v", comp, r.Stopped)
	}
}
