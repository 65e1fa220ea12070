package userspace

import (
	"context"
	"net/netip"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/sources/userspace/tracker"
)

// Source is the userspace source.
type Source struct {
	// cfg is the options in force, replaced whole by Reconfigure (reconfigure.go).
	cfg  atomic.Pointer[Config]
	env  component.Env
	pcap string // absolute or as given

	packets  *prometheus.CounterVec // by result: tracked, untracked, or the decoding failure
	conns    prometheus.Gauge
	evicted  prometheus.Counter
	capDrops prometheus.Counter

	// started, when set (by tests), is closed once a live capture is open.
	started chan struct{}
	// addrRefresh, when set (by tests), replaces the interval of rereading addresses, and
	// addrsChanged, when set, receives the new addresses after a change.
	addrRefresh  time.Duration
	addrsChanged chan []netip.Prefix

	// reconf hands new options to the running capture or replay, which applies them between
	// two packets (reconfigure.go); running is closed when Run returns.
	reconf   chan *reconfRequest
	reconfMu sync.Mutex
	mu       sync.Mutex
	running  chan struct{}
}

// config is the options in force.
func (s *Source) config() *Config { return s.cfg.Load() }

// New builds the source; the capture or the file is opened by Run.
func New(env component.Env, c *Config) (*Source, error) {
	s := &Source{env: env, pcap: c.Pcap, reconf: make(chan *reconfRequest)}
	cfg := *c
	s.cfg.Store(&cfg)
	if s.pcap != "" && !filepath.IsAbs(s.pcap) && env.ConfigDir != "" {
		s.pcap = filepath.Join(env.ConfigDir, s.pcap)
	}
	if s.env.Metrics == nil {
		s.env.Metrics = component.NopMetrics{}
	}
	s.packets = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "flowpipe_userspace_packets_total",
		Help: "Packets seen by the userspace tracker, by result: tracked, untracked (no connection and cannot open one), or why it could not be decoded.",
	}, []string{"result"})
	s.conns = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "flowpipe_userspace_connections",
		Help: "Connections in the userspace tracker's table.",
	})
	s.evicted = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "flowpipe_userspace_evictions_total",
		Help: "Connections evicted because the table reached max_entries.",
	})
	s.capDrops = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "flowpipe_userspace_capture_drops_total",
		Help: "Packets the kernel dropped because the capture ring was full.",
	})
	if err := env.Register(s.packets, s.conns, s.evicted, s.capDrops); err != nil {
		return nil, err
	}
	return s, nil
}

// Run captures or replays until ctx ends or the file ends.
func (s *Source) Run(ctx context.Context, out component.Emitter) error {
	running := make(chan struct{})
	s.mu.Lock()
	s.running = running
	s.mu.Unlock()
	defer close(running)
	if s.config().Pcap != "" {
		return s.runPcap(ctx, out)
	}
	return s.runLive(ctx, out)
}

func (s *Source) newTracker(local []netip.Prefix, maxPending int) *tracker.Tracker {
	return tracker.New(s.trackerConfig(s.config(), local, maxPending))
}

func (s *Source) trackerConfig(c *Config, local []netip.Prefix, maxPending int) tracker.Config {
	return tracker.Config{
		LocalPrefixes: local,
		MaxEntries:    c.MaxEntries,
		Timeouts:      c.Timeouts,
		Source:        s.env.Name,
		BatchHint:     c.batch(),
		MaxPending:    maxPending,
	}
}

// counters turns packet results into metrics in bulk, so that the per-packet path touches
// only plain integers.
type counters struct {
	tracked, untracked uint64
	failed             map[string]uint64
	failedAll          uint64
}

func (c *counters) fail(err error) {
	if c.failed == nil {
		c.failed = map[string]uint64{}
	}
	c.failed[reason(err)]++
	c.failedAll++
}

func (c *counters) count(m tracker.Match) {
	if m == tracker.MatchNone {
		c.untracked++
	} else {
		c.tracked++
	}
}

func (s *Source) publish(c *counters, tr *tracker.Tracker, last *tracker.Stats) {
	s.packets.WithLabelValues("tracked").Add(float64(c.tracked))
	s.packets.WithLabelValues("untracked").Add(float64(c.untracked))
	for r, n := range c.failed {
		s.packets.WithLabelValues(r).Add(float64(n))
		delete(c.failed, r)
	}
	c.tracked, c.untracked = 0, 0
	st := tr.Stats()
	s.conns.Set(float64(st.Entries))
	s.evicted.Add(float64(st.Evicted - last.Evicted))
	if n := st.EventsDropped - last.EventsDropped; n > 0 {
		s.env.Metrics.Dropped("pending_full", int(n))
		s.env.Logger.Warn("events dropped: the pipeline did not take them fast enough (raise max_pending or speed up the sinks)", "events", n)
	}
	*last = st
}

// emitter hands batches to the pipeline and reuses the event slices of acknowledged batches.
type emitter struct {
	out   component.Emitter
	spare chan []flow.Event
	size  int
}

func newEmitter(out component.Emitter, size int) *emitter {
	return &emitter{out: out, spare: make(chan []flow.Event, 8), size: size}
}

// emit sends evs (which it takes) as batches of at most size events.
func (e *emitter) emit(ctx context.Context, evs []flow.Event) error {
	if len(evs) == 0 && cap(evs) >= e.size {
		e.recycle(evs)
		return nil
	}
	for len(evs) > 0 {
		n := min(len(evs), e.size)
		chunk := evs[:n:n]
		evs = evs[n:]
		reuse := n == e.size && cap(chunk) == e.size
		b := flow.NewBatch(chunk, func(error) {
			// Acknowledged: no stage holds the events any more. Outcomes (drops, shutdown)
			// are counted by the runtime; the tracker cannot resend an event.
			if reuse {
				e.recycle(chunk)
			}
		})
		if err := e.out.Emit(ctx, b); err != nil {
			return err
		}
	}
	return nil
}

// recycle keeps an event slice nobody uses any more for the tracker to fill again.
func (e *emitter) recycle(evs []flow.Event) {
	select {
	case e.spare <- evs[:0]:
	default:
	}
}

// buffer returns a slice the tracker may fill next, or nil.
func (e *emitter) buffer() []flow.Event {
	select {
	case b := <-e.spare:
		return b
	default:
		return nil
	}
}

// flushAll ends every open connection at now and emits the end events.
func (s *Source) flushAll(ctx context.Context, tr *tracker.Tracker, em *emitter, now flow.Time) error {
	for {
		left := tr.Flush(now, s.config().batch())
		if err := em.emit(ctx, tr.DrainEvents(em.buffer())); err != nil {
			return err
		}
		if left == 0 {
			return nil
		}
	}
}

// shutdownEmit is how long a stopping live source may take to hand over the end events of
// the connections still open.
const shutdownEmit = 5 * time.Second
