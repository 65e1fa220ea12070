package pipeline

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// topology is one immutable snapshot of the stages a batch passes: the enrichers in order and
// the sinks. A source's batch takes the current snapshot once (acquire) and goes through it
// whole, so that a reload, which installs a new snapshot, never has a batch enriched half by
// the old chain and half by the new one. A snapshot that a reload replaced is retired: it
// admits no new batch, and the reload waits until every batch that took it is in the sinks'
// queues before it stops what the new snapshot no longer has.
type topology struct {
	enrich []*enricherNode
	sinks  []*sinkNode
	// open, when not nil, holds batches of sources back until it is closed: a reload that
	// reconfigures an enricher in place applies the change while no batch is between stages.
	open chan struct{}

	mu      sync.Mutex
	refs    int
	retired bool
	done    chan struct{} // closed once retired and no batch holds it
}

func newTopology(enrich []*enricherNode, sinks []*sinkNode) *topology {
	return &topology{enrich: enrich, sinks: sinks, done: make(chan struct{})}
}

func (t *topology) tryAcquire() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.retired {
		return false
	}
	t.refs++
	return true
}

func (t *topology) release() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.refs--
	if t.retired && t.refs == 0 {
		close(t.done)
	}
}

// retire admits no more batches; the channel is closed when the last one is through.
func (t *topology) retire() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.retired {
		t.retired = true
		if t.refs == 0 {
			close(t.done)
		}
	}
	return t.done
}

func (t *topology) enricherIndex(n *enricherNode) int {
	for i, e := range t.enrich {
		if e == n {
			return i
		}
	}
	return -1
}

// acquire takes the current topology for one batch; release it when the batch is in the
// sinks' queues.
func (p *Pipeline) acquire() *topology {
	for {
		t := p.topo.Load()
		if t.tryAcquire() {
			return t
		}
		// A reload retired it after the load: the new one is installed already.
	}
}

// outstanding counts a source's batches that are not acknowledged yet.
type outstanding struct {
	mu   sync.Mutex
	n    int
	zero chan struct{}
}

func (o *outstanding) add() {
	o.mu.Lock()
	o.n++
	o.mu.Unlock()
}

func (o *outstanding) done() {
	o.mu.Lock()
	o.n--
	if o.n == 0 && o.zero != nil {
		close(o.zero)
		o.zero = nil
	}
	o.mu.Unlock()
}

func (o *outstanding) count() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.n
}

// wait returns true once nothing is outstanding, false when ctx is done first.
func (o *outstanding) wait(ctx context.Context) bool {
	o.mu.Lock()
	if o.n == 0 {
		o.mu.Unlock()
		return true
	}
	if o.zero == nil {
		o.zero = make(chan struct{})
	}
	z := o.zero
	o.mu.Unlock()
	select {
	case <-z:
		return true
	case <-ctx.Done():
		return false
	}
}

// trackReg is the Registerer a component gets: it remembers what the component registered,
// so that a reload that replaces or removes the component can take those metrics away, and
// it gates them, so that the replacement's metrics appear only once it is in the pipeline.
// A replacement built while the instance it replaces still runs registers metrics of the
// same names and labels: those wait (pending) until the old ones are unregistered. An
// unchecked collector (one that describes nothing, as a plugin's remote metrics) cannot be
// unregistered from a Prometheus registry: it goes into the component's uncheckedSlot,
// which is registered once, and leaves it when the instance retires.
type trackReg struct {
	inner    prometheus.Registerer
	slot     *uncheckedSlot
	deferDup bool
	on       atomic.Bool

	mu      sync.Mutex
	owned   map[prometheus.Collector]*gated
	pending []prometheus.Collector
}

func newTrackReg(inner prometheus.Registerer, slot *uncheckedSlot, live bool) *trackReg {
	r := &trackReg{inner: inner, slot: slot, deferDup: !live, owned: map[prometheus.Collector]*gated{}}
	r.on.Store(live)
	return r
}

// uncheckedSlot collects the unchecked collectors of the instances of one component (by
// kind and name), each gated by its instance's trackReg. It is registered once, through the
// component's labelling Registerer, and stays for the pipeline's life (empty once the
// component is removed); instances come and go in it.
type uncheckedSlot struct {
	mu sync.Mutex
	gs map[*gated]bool
}

func (s *uncheckedSlot) Describe(chan<- *prometheus.Desc) {}

func (s *uncheckedSlot) Collect(ch chan<- prometheus.Metric) {
	s.mu.Lock()
	gs := make([]*gated, 0, len(s.gs))
	for g := range s.gs {
		gs = append(gs, g)
	}
	s.mu.Unlock()
	for _, g := range gs {
		g.Collect(ch)
	}
}

func (s *uncheckedSlot) set(g *gated, in bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if in {
		s.gs[g] = true
	} else {
		delete(s.gs, g)
	}
}

// describesNothing says whether c is an unchecked collector.
func describesNothing(c prometheus.Collector) bool {
	ch := make(chan *prometheus.Desc, 8)
	go func() { c.Describe(ch); close(ch) }()
	n := 0
	for range ch {
		n++
	}
	return n == 0
}

// gated forwards to a collector while its registerer is on.
type gated struct {
	c         prometheus.Collector
	on        *atomic.Bool
	unchecked bool // in its trackReg's slot, not in the registry
}

func (g *gated) Describe(ch chan<- *prometheus.Desc) { g.c.Describe(ch) }
func (g *gated) Collect(ch chan<- prometheus.Metric) {
	if g.on.Load() {
		g.c.Collect(ch)
	}
}

func (r *trackReg) Register(c prometheus.Collector) error {
	g := &gated{c: c, on: &r.on}
	if r.slot != nil && describesNothing(c) {
		g.unchecked = true
		r.mu.Lock()
		defer r.mu.Unlock()
		if _, dup := r.owned[c]; dup {
			return prometheus.AlreadyRegisteredError{ExistingCollector: c, NewCollector: c}
		}
		r.owned[c] = g
		r.slot.set(g, true)
		return nil
	}
	err := r.inner.Register(g)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		var are prometheus.AlreadyRegisteredError
		if r.deferDup && errors.As(err, &are) {
			r.pending = append(r.pending, c)
			return nil
		}
		return err
	}
	r.owned[c] = g
	return nil
}

func (r *trackReg) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

func (r *trackReg) Unregister(c prometheus.Collector) bool {
	r.mu.Lock()
	g, ok := r.owned[c]
	delete(r.owned, c)
	r.mu.Unlock()
	if !ok {
		return false
	}
	return r.unregister(g)
}

func (r *trackReg) unregister(g *gated) bool {
	if g.unchecked {
		r.slot.set(g, false)
		return true
	}
	return r.inner.Unregister(g)
}

// activate shows the metrics, registering those that waited for the old instance's.
func (r *trackReg) activate() error {
	r.mu.Lock()
	pending := r.pending
	r.pending, r.deferDup = nil, false
	r.mu.Unlock()
	r.on.Store(true)
	var first error
	for _, c := range pending {
		if err := r.Register(c); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// retire hides the metrics and unregisters them.
func (r *trackReg) retire() {
	r.on.Store(false)
	r.mu.Lock()
	owned := r.owned
	r.owned, r.pending = map[prometheus.Collector]*gated{}, nil
	r.mu.Unlock()
	for _, g := range owned {
		r.unregister(g)
	}
}
