// Package conntrack is the `type: conntrack` source: it turns the Linux kernel's connection
// tracking events into flow events, a start when the kernel creates an entry (NEW) and an end
// with packet and byte counters and kernel timestamps when it destroys one (DESTROY).
//
// It is built so that a burst of tens of thousands of connections loses nothing. One
// goroutine does nothing but drain the netlink socket (a large buffer, forced as root) into
// an in-memory queue; another turns the queue into batches and waits on the pipeline. The
// socket asks the kernel for reliable delivery (NETLINK_BROADCAST_ERROR), so a DESTROY the
// socket had no room for is kept by the kernel and sent again. When the kernel still reports
// an overrun (ENOBUFS, a NEW that could not be delivered), the source counts it and dumps the
// table: entries it did not know become starts, entries it knew that are gone become ends,
// both counted as reconstructed.
package conntrack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flowpipe/flowpipe/internal/privilege"
	"github.com/google/uuid"
	"github.com/mdlayher/netlink"
	"github.com/prometheus/client_golang/prometheus"
	ct "github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/backoff"
	"github.com/flowpipe/flowpipe/internal/lockfile"
	"github.com/flowpipe/flowpipe/internal/netns"
)

// Factory is the `type: conntrack` source factory.
func Factory() component.Factory {
	f := component.NewSourceFactory("conntrack",
		"Linux kernel conntrack: a start and an end event for every tracked connection",
		defaultConfig, New)
	f.Reasons = component.Reasons{Dropped: []string{"queue_full", "shutdown"}, Filtered: filterReasonNames[:]}
	return f
}

// New builds the source; nothing is opened until Start (or Run).
func New(env component.Env, cfg *Config) (component.Source, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if env.Metrics == nil {
		env.Metrics = component.NopMetrics{}
	}
	s := &Source{env: env, log: env.Logger, q: newQueue(cfg.BatchSize, cfg.MaxPending), sweepGetMax: 256,
		reconf: make(chan *reconfRequest, 1), id: uuid.NewString()[:8]}
	s.cfg.Store(cfg)
	s.tr = newTracker(cfg, s.push)
	if env.Registerer != nil {
		if err := s.stats.register(env.Registerer, s); err != nil {
			return nil, fmt.Errorf("conntrack source %s: register metrics: %w", env.Name, err)
		}
	}
	return s, nil
}

// Source reads one network namespace's conntrack events.
type Source struct {
	// cfg is the options in force, replaced whole by Reconfigure (reconfigure.go); a
	// *Config is never changed once stored.
	cfg atomic.Pointer[Config]
	env component.Env
	log *slog.Logger
	q   *queue
	tr  *tracker

	mu       sync.Mutex // guards the fields below against Close racing Start and Run
	started  bool
	closed   bool
	ns       *netns.NS
	sysctls  []*sysctlChange
	act      *activation
	recorded bool     // this run wrote the record of its host changes (hoststate.go)
	id       string   // this instance's, in its record's and its table's names
	lock     *os.File // held while it runs: its record is not a leftover
	events   *eventConn
	dump     *ct.Conn
	running  chan struct{} // closed when the reader goroutine has stopped
	lastDump time.Time

	sweepGetMax int // up to this many entries to sweep are looked up one by one

	// reconf hands new options to the reader goroutine, which applies them between two
	// netlink messages (reconfigure.go).
	reconf   chan *reconfRequest // holds the one request of the Reconfigure in progress
	reconfMu sync.Mutex          // one Reconfigure at a time

	stats stats
}

// stats are the source's own counters, exported as Prometheus metrics.
type stats struct {
	newEvents, destroyEvents   atomic.Uint64
	overruns                   atomic.Uint64
	resyncs                    atomic.Uint64
	reconstructedStarts        atomic.Uint64
	reconstructedEnds          atomic.Uint64
	queueFull                  atomic.Uint64
	reconnects                 atomic.Uint64
	tracked                    atomic.Int64
	decodeErrors               atomic.Uint64
	reportedDrops, reportedBad uint64 // what was passed on to Env.Metrics so far (reader only)
}

func (st *stats) register(r prometheus.Registerer, s *Source) error {
	counter := func(name, help string, v *atomic.Uint64, labels prometheus.Labels) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels},
			func() float64 { return float64(v.Load()) })
	}
	cs := []prometheus.Collector{
		counter("flowpipe_conntrack_kernel_events_total", "Conntrack events read from the kernel.", &st.newEvents, prometheus.Labels{"type": "new"}),
		counter("flowpipe_conntrack_kernel_events_total", "Conntrack events read from the kernel.", &st.destroyEvents, prometheus.Labels{"type": "destroy"}),
		counter("flowpipe_conntrack_overruns_total", "Times the kernel reported that events did not fit the socket buffer (ENOBUFS); each is followed by a resync.", &st.overruns, nil),
		counter("flowpipe_conntrack_resyncs_total", "Conntrack table dumps compared with the known connections.", &st.resyncs, nil),
		counter("flowpipe_conntrack_reconstructed_total", "Events derived from a table dump instead of a kernel event.", &st.reconstructedStarts, prometheus.Labels{"type": "start"}),
		counter("flowpipe_conntrack_reconstructed_total", "Events derived from a table dump instead of a kernel event.", &st.reconstructedEnds, prometheus.Labels{"type": "end"}),
		counter("flowpipe_conntrack_reconnects_total", "Netlink event sockets reopened after an error.", &st.reconnects, nil),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "flowpipe_conntrack_tracked_connections", Help: "Connections the source knows to be open."},
			func() float64 { return float64(st.tracked.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "flowpipe_conntrack_pending_events", Help: "Events read from the kernel, waiting to be emitted."},
			func() float64 { return float64(s.q.len()) }),
	}
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// push queues an event from the tracker; it never waits.
func (s *Source) push(e *flow.Event, reconstructed bool) {
	e.Source = s.env.Name
	e.Reconstructed = reconstructed
	if reconstructed {
		if e.Type == flow.TypeStart {
			s.stats.reconstructedStarts.Add(1)
		} else {
			s.stats.reconstructedEnds.Add(1)
		}
	}
	if !s.q.push(e) {
		s.stats.queueFull.Add(1)
	}
}

// Start opens everything the source needs, in the order that loses nothing: the sysctls and
// the nftables table first (they affect the entries the kernel creates), then the event
// socket, then a dump of the table, so that every entry is either in the dump or has its
// event waiting in the socket.
func (s *Source) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return nil
	}
	if s.closed {
		return errors.New("conntrack source: started after Close")
	}
	s.started = true
	if err := s.open(); err != nil {
		s.closeLocked()
		return fmt.Errorf("conntrack source %s: %w", s.env.Name, privilege.Explain(err, s.config().Capabilities()))
	}
	return nil
}

// config is the options in force.
func (s *Source) config() *Config { return s.cfg.Load() }

func (s *Source) open() error {
	var err error
	cfg := s.config()
	if s.ns, err = netns.Open(cfg.NetNS); err != nil {
		return err
	}
	if err := s.changeHost(cfg); err != nil {
		return err
	}
	s.refreshLocal()
	if s.events, err = openEvents(s.ns, int(cfg.ReadBuffer), s.log); err != nil {
		return err
	}
	if err := s.resync(cfg.ExistingFlows); err != nil {
		return err
	}
	s.log.Info("reading conntrack events", "netns", s.ns.String(), "known_connections", len(s.tr.known),
		"read_buffer", s.events.rcvbuf, "activated", s.act != nil)
	return nil
}

// changeHost puts back what killed runs left, then records and makes this instance's
// changes (sysctls, the activation table), under the data directory's lock (hoststate.go),
// which it does not hold longer: not during the table dump that follows.
func (s *Source) changeHost(cfg *Config) error {
	unlock, err := s.lockHost()
	if err != nil {
		return err
	}
	defer unlock()
	// What a run that was killed left behind goes first, so that the values read below are
	// the host's own, not that run's.
	if err := s.restoreLeftovers(); err != nil {
		return err
	}
	// Plan the changes, record them (with the values to put back), then make them.
	rec := &hostRecord{NetNS: cfg.NetNS}
	if rec.NSID, err = s.ns.ID(); err != nil {
		return err
	}
	for _, sc := range []struct {
		on   bool
		path string
	}{{cfg.Counters, sysctlAcct}, {cfg.Timestamps, sysctlTimestamp}} {
		if !sc.on {
			continue
		}
		prev, err := readSysctl(s.ns, sc.path)
		if err != nil {
			return fmt.Errorf("read %s in %s: %w (is the nf_conntrack module loaded?)", sc.path, s.ns, err)
		}
		// Recorded also when it is 1 already: another instance that changed it hands this
		// one the value to put back when it stops first.
		if prev == "1" {
			prev = ""
		}
		rec.Sysctls = append(rec.Sysctls, recordedSysctl{Path: sc.path, Prev: prev})
	}
	if cfg.Activate {
		rec.Table = activationTable(s.env.Name, s.id)
	}
	if path := s.recordPath(); path != "" && (len(rec.Sysctls) > 0 || rec.Table != "") {
		if err := s.holdRecordLock(); err != nil {
			return fmt.Errorf("%w (the source records what it changes on the host before changing it; check data_dir)", err)
		}
		if err := writeRecord(path, rec); err != nil {
			return fmt.Errorf("%w (the source records what it changes on the host before changing it; check data_dir)", err)
		}
		s.recorded = true
	}
	for _, sc := range rec.Sysctls {
		if sc.Prev == "" {
			continue
		}
		ch, err := setSysctl(s.ns, sc.Path, "1")
		if err != nil {
			return err
		}
		if ch != nil {
			s.sysctls = append(s.sysctls, ch)
		}
	}
	if cfg.Activate {
		if s.act, err = activate(s.ns, rec.Table); err != nil {
			return err
		}
	}
	return nil
}

// activationTable is the nftables table name of an instance of a source: one per instance,
// so that two sources reading the same namespace, or a source and the instance that
// replaces it in a reload (they overlap), do not remove each other's.
func activationTable(name, id string) string {
	if name == "" {
		name = "conntrack"
	}
	const max = 200
	if len(name) > max {
		name = name[:max]
	}
	return "flowpipe_" + name + "_" + id
}

// Run reads events until ctx is done. The reader goroutine only drains the socket; this
// goroutine emits batches and is the one that waits on the pipeline.
func (s *Source) Run(ctx context.Context, out component.Emitter) error {
	if err := s.Start(ctx); err != nil {
		return err
	}
	s.mu.Lock()
	if s.closed || s.running != nil {
		s.mu.Unlock()
		return errors.New("conntrack source: Run called twice or after Close")
	}
	s.running = make(chan struct{})
	s.mu.Unlock()

	rctx, stop := context.WithCancel(ctx)
	readErr := make(chan error, 1)
	go func() {
		defer close(s.running)
		readErr <- s.read(rctx)
	}()
	err := s.emitLoop(ctx, out, readErr)
	stop()
	s.mu.Lock()
	if s.events != nil {
		s.events.close() // unblocks the reader
	}
	s.mu.Unlock()
	<-s.running
	// Emit what the reader queued before it stopped; the pipeline may still accept it while
	// it drains.
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	for {
		evs, _ := s.q.pop(0, true)
		if evs == nil {
			break
		}
		if out.Emit(fctx, s.q.batch(evs)) != nil {
			s.env.Metrics.Dropped("shutdown", s.q.len())
			break
		}
	}
	s.flushCounts()
	if err != nil && ctx.Err() != nil {
		return nil
	}
	return err
}

func (s *Source) emitLoop(ctx context.Context, out component.Emitter, readErr <-chan error) error {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		evs, wait := s.q.pop(s.config().FlushInterval, false)
		if evs != nil {
			if err := out.Emit(ctx, s.q.batch(evs)); err != nil {
				return err
			}
			continue
		}
		if wait == 0 {
			wait = time.Hour
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return nil
		case err := <-readErr:
			return err
		case <-s.q.ready:
		case <-timer.C:
		}
	}
}

const (
	// minPollPause and maxPollPause bound how long the reader waits after draining the
	// socket before it blocks (pollPause).
	minPollPause = time.Millisecond
	maxPollPause = 5 * time.Millisecond
	// minResyncInterval spaces the table dumps that follow overruns.
	minResyncInterval = 500 * time.Millisecond
)

// read drains the event socket until ctx is done. Between messages it looks after the
// tracker: resyncs after an overrun, sweeps for entries the kernel may not report, and
// reconnects after a socket error.
func (s *Source) read(ctx context.Context) error {
	batch := newRecvBatch()
	const housekeepEvery = time.Second
	nextHousekeep := time.Now().Add(housekeepEvery)
	nextLocal := time.Now().Add(30 * time.Second)
	needResync := false
	reopen := backoff.Backoff{Policy: backoff.Policy{Initial: 100 * time.Millisecond, Max: 10 * time.Second}}
	ev := s.currentEvents()
	_ = ev.setDeadline(nextHousekeep)
	// idle is set when the last non-blocking read found the socket empty. The reader then
	// pauses (pollPause) before it blocks in ppoll: under a steady stream of events this
	// wakes the process a few hundred times a second instead of once per event (each
	// wake-up costs more than decoding an event), while the socket buffer holds what
	// arrives meanwhile.
	idle := false
	for {
		select {
		case req := <-s.reconf:
			req.done <- s.apply(ev, req.cfg)
			_ = ev.setDeadline(nextHousekeep) // Reconfigure set it to now, to wake the reader
		default:
		}
		n, err := ev.recv(batch, idle && !needResync)
		now := time.Now()
		switch {
		case err == nil:
			idle = false
			for i := 0; i < n; i++ {
				msg, truncated := batch.msg(i)
				if truncated {
					s.stats.decodeErrors.Add(1)
					continue
				}
				s.tr.onMessages(msg, flow.TimeOf(now), &s.stats)
			}
		case errors.Is(err, errIdle) && (!needResync || now.Sub(s.lastDump) < minResyncInterval):
			// Under sustained overload, dumping after every overrun would only add load:
			// resyncs are spaced, and missing entries wait resync_grace anyway.
			idle = !needResync
			time.Sleep(pollPause(ev.rcvbuf))
		case errors.Is(err, errIdle):
			// The socket is drained after an overrun: compare with the table now.
			if err := s.resyncCounted(); err != nil {
				s.log.Warn("conntrack resync failed; retrying", "error", err)
				s.env.Metrics.Errors("resync", 1)
			} else {
				needResync = false
			}
		case errors.Is(err, unix.ENOBUFS):
			s.stats.overruns.Add(1)
			s.env.Metrics.Errors("kernel_overrun", 1)
			if !needResync {
				s.log.Warn("conntrack events overran the socket buffer; will resync from a table dump",
					"read_buffer", ev.rcvbuf, "hint", "raise read_buffer")
			}
			needResync = true
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The housekeeping deadline, or Reconfigure waking the reader (see the top of
			// the loop); the housekeeping below sets the next one.
			_ = ev.setDeadline(nextHousekeep)
		case ctx.Err() != nil:
			return nil
		default:
			nev, ok := s.reconnect(ctx, ev, &reopen, err)
			if !ok {
				return nil
			}
			if nev == nil {
				continue
			}
			ev = nev
			_ = ev.setDeadline(nextHousekeep)
			// Events between the two sockets went to nobody.
			needResync = true
			continue
		}
		reopen.Reset()
		if now.After(nextHousekeep) {
			nextHousekeep = now.Add(housekeepEvery)
			_ = ev.setDeadline(nextHousekeep)
			if now.After(nextLocal) {
				nextLocal = now.Add(30 * time.Second)
				s.refreshLocal()
			}
			s.housekeep(now, needResync)
		}
	}
}

// pollPause is the reader's pause after it drained a socket whose buffer holds rcvbuf bytes
// (what the kernel reports: twice read_buffer): a millisecond per 8 MiB of buffer, within
// minPollPause and maxPollPause. Filling the buffer within one pause then takes 8 MiB a
// millisecond, about 6,000 events (the kernel charges about 1.3 KiB per event), so 6 million
// events a second, whatever the buffer's size; the default (read_buffer 32 MiB: 64 MiB,
// 5 ms) has more margin still, and a buffer under 8 MiB keeps the 1 ms pause, and the
// margin, that every buffer had before.
func pollPause(rcvbuf int) time.Duration {
	return min(max(time.Duration(rcvbuf)*time.Millisecond/(8<<20), minPollPause), maxPollPause)
}

// reconnect closes the failed event socket and, after the reopen backoff, opens a new one.
// It returns nil and true when the reopen failed (the reader tries again), and false when
// the source is stopping.
func (s *Source) reconnect(ctx context.Context, ev *eventConn, reopen *backoff.Backoff, cause error) (*eventConn, bool) {
	wait := reopen.Next()
	s.log.Warn("conntrack event socket failed; reconnecting", "error", cause, "backoff", wait)
	s.env.Metrics.Errors("netlink_read", 1)
	ev.close()
	if !backoff.Sleep(ctx, wait) {
		return nil, false
	}
	nev, err := openEvents(s.ns, int(s.config().ReadBuffer), s.log)
	if err != nil {
		s.log.Warn("reopen conntrack event socket", "error", err)
		return nil, true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		nev.close()
		return nil, false
	}
	s.events = nev
	s.stats.reconnects.Add(1)
	return nev, true
}

// housekeep runs about once a second: a sweep for connections that left the table without
// a DESTROY, the ends of connections that expired, and the counts.
func (s *Source) housekeep(now time.Time, needResync bool) {
	if !needResync && s.tr.fromDump > 0 && now.Sub(s.lastDump) >= s.config().SweepInterval {
		if err := s.sweep(); err != nil {
			s.log.Warn("conntrack sweep failed", "error", err)
			s.env.Metrics.Errors("resync", 1)
		}
	}
	if n := s.tr.expire(flow.TimeOf(now)); n > 0 {
		s.log.Info("conntrack connections left the table without a DESTROY; reconstructed their ends",
			"reconstructed_ends", n)
	}
	s.q.trim()
	s.flushCounts()
}

func (s *Source) currentEvents() *eventConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.events
}

// sweep looks for connections that left the table without a DESTROY among those found by a
// dump. A few are asked for one by one (a GET each); many at once cost less as a full dump.
func (s *Source) sweep() error {
	if s.tr.fromDump > s.sweepGetMax {
		return s.resyncCounted()
	}
	if err := s.dialDump(); err != nil {
		return err
	}
	now := flow.Now()
	for k, e := range s.tr.known {
		if !e.fromDump || e.missing != 0 {
			continue
		}
		f, err := s.dump.Get(k.flow())
		switch {
		case err == nil:
			cf := fromCT(&f)
			s.tr.swept(k, &cf, now)
		case errors.Is(err, unix.ENOENT):
			s.tr.swept(k, nil, now)
		default:
			s.dump.Close()
			s.dump = nil
			return fmt.Errorf("look up a conntrack entry in %s: %w", s.ns, err)
		}
	}
	s.lastDump = time.Now()
	return nil
}

func (s *Source) dialDump() error {
	if s.dump != nil {
		return nil
	}
	c, err := ct.Dial(&netlink.Config{NetNS: s.ns.Fd()})
	if err != nil {
		return fmt.Errorf("open conntrack netlink socket in %s: %w", s.ns, err)
	}
	s.dump = c
	return nil
}

func (s *Source) resyncCounted() error {
	s.stats.resyncs.Add(1)
	return s.resync(true)
}

// resync dumps the table and reconciles it with what the tracker knows.
func (s *Source) resync(announce bool) error {
	cfs, err := s.dumpTable()
	if err != nil {
		return err
	}
	starts, missing := s.tr.onDump(cfs, flow.TimeOf(s.lastDump), announce)
	s.stats.tracked.Store(int64(len(s.tr.known)))
	if starts > 0 || missing > 0 {
		s.log.Info("conntrack table dump reconciled", "entries", len(cfs), "reconstructed_starts", starts,
			"missing_awaiting_destroy", missing)
	}
	return nil
}

// dumpTable reads the whole conntrack table of the namespace.
func (s *Source) dumpTable() ([]ctFlow, error) {
	if err := s.dialDump(); err != nil {
		return nil, err
	}
	flows, err := s.dump.Dump(nil)
	if err != nil {
		s.dump.Close()
		s.dump = nil
		return nil, fmt.Errorf("dump the conntrack table in %s: %w", s.ns, err)
	}
	s.lastDump = time.Now()
	cfs := make([]ctFlow, len(flows))
	for i := range flows {
		cfs[i] = fromCT(&flows[i])
	}
	return cfs, nil
}

// flushCounts passes the reader's own counts on to the shared metrics.
func (s *Source) flushCounts() {
	for i, n := range s.tr.filtered {
		if n > 0 {
			s.env.Metrics.Filtered(filterReasonNames[i], n)
			s.tr.filtered[i] = 0
		}
	}
	if d := s.stats.queueFull.Load(); d > s.stats.reportedDrops {
		s.env.Metrics.Dropped("queue_full", int(d-s.stats.reportedDrops))
		s.log.Warn("conntrack events dropped: the pipeline did not keep up and max_pending was reached",
			"dropped", d-s.stats.reportedDrops, "max_pending", s.config().MaxPending)
		s.stats.reportedDrops = d
	}
	if d := s.stats.decodeErrors.Load(); d > s.stats.reportedBad {
		s.env.Metrics.Errors("decode", int(d-s.stats.reportedBad))
		s.stats.reportedBad = d
	}
	s.stats.tracked.Store(int64(len(s.tr.known)))
}

// refreshLocal reloads the namespace's own addresses when local_prefixes is not set.
func (s *Source) refreshLocal() {
	if lp := s.config().LocalPrefixes; len(lp) > 0 {
		s.tr.local = lp
		return
	}
	var local []netip.Prefix
	err := s.ns.Do(func() error {
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
					ip = ip.Unmap()
					local = append(local, netip.PrefixFrom(ip, ip.BitLen()))
				}
			}
		}
		return nil
	})
	if err != nil {
		s.log.Warn("list local addresses for direction", "netns", s.ns.String(), "error", err)
		s.env.Metrics.Errors("local_addresses", 1)
		return
	}
	s.tr.local = local
}

// Close stops reading and undoes what Start changed: the nftables table and the sysctls.
func (s *Source) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	if s.events != nil {
		s.events.close()
	}
	running := s.running
	s.mu.Unlock()
	if running != nil {
		select {
		case <-running:
		case <-ctx.Done():
			return fmt.Errorf("conntrack source %s: reader did not stop: %w", s.env.Name, ctx.Err())
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closeLocked()
}

func (s *Source) closeLocked() error {
	s.closed = true
	var errs []error
	if s.events != nil {
		s.events.close()
	}
	if s.dump != nil {
		s.dump.Close()
		s.dump = nil
	}
	switch {
	case s.recorded:
		// As the record says: another instance may still need a sysctl, or have handed
		// this one the value to put back (hoststate.go). On an error the record stays, and
		// the next start tries again.
		s.recorded = false
		if err := s.undoRecorded(); err != nil {
			errs = append(errs, err)
		}
	default:
		if s.act != nil {
			if err := s.act.remove(); err != nil {
				errs = append(errs, err)
			}
		}
		for i := len(s.sysctls) - 1; i >= 0; i-- {
			if err := s.sysctls[i].restore(s.ns); err != nil {
				errs = append(errs, err)
			}
		}
	}
	s.act = nil
	s.sysctls = nil
	if s.lock != nil {
		lockfile.Unlock(s.lock)
		s.lock = nil
	}
	if s.ns != nil {
		s.ns.Close()
		s.ns = nil
	}
	return errors.Join(errs...)
}
