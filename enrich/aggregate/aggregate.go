// Package aggregate is the `type: aggregate` enricher: it folds the TCP, UDP, ICMP and
// ICMPv6 events of every window into one `aggregate` event per conversation (source,
// destination, destination port, protocol, direction and optionally rule ID), so that a busy
// host sends one record per conversation per minute instead of one per connection.
//
// Acknowledgement stays end to end: a batch whose events were absorbed is retained until the
// aggregates carrying them have been accepted by the sinks, and is then released with their
// result, so a source learns that its events are durable only when they are.
package aggregate

import (
	"context"
	"crypto/sha1"
	"encoding/binary"
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Config is the options of `type: aggregate`.
type Config struct {
	// Window is how long events are folded before the aggregates are emitted; windows are
	// aligned to the wall clock (a 1m window closes at every full minute).
	Window time.Duration `yaml:"window"`
	// ByRuleID adds the rule ID to the key, so flows allowed by different rules stay apart.
	ByRuleID bool `yaml:"by_rule_id"`
	// MaxKeys bounds the memory of one window: when a new key would exceed it, the window
	// closes early (counted in flowpipe_aggregate_windows_total{reason="max_keys"}).
	MaxKeys int `yaml:"max_keys"`
	// BatchSize is the most aggregates emitted in one batch.
	BatchSize int `yaml:"batch_size"`
}

// DefaultConfig is one-minute windows of at most 100,000 keys.
func DefaultConfig() *Config {
	return &Config{Window: time.Minute, MaxKeys: 100_000, BatchSize: 4096}
}

// Validate reports every problem in the options.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	if c.Window < time.Millisecond {
		errs.Add("window", "must be at least 1ms, such as \"1m\"")
	}
	if c.MaxKeys < 1 {
		errs.Add("max_keys", "must be at least 1")
	}
	if c.BatchSize < 1 {
		errs.Add("batch_size", "must be at least 1")
	}
	return errs.Err()
}

// Factory is the `type: aggregate` enricher factory.
func Factory() component.Factory {
	f := component.NewEnricherFactory("aggregate",
		"windowed aggregation of TCP, UDP, ICMP and ICMPv6 events, acknowledged end to end",
		DefaultConfig,
		func(env component.Env, c *Config) (component.Enricher, error) { return New(env, c) })
	f.Holds = true // it keeps events across batches: in process only
	return f
}

// key identifies a conversation within a window.
type key struct {
	src, dst netip.Addr
	dport    uint16
	proto    uint8
	dir      flow.Direction
	rule     string
}

// Fields of an aggregate that are kept only while every event agrees on them.
const (
	mixedRule = 1 << iota
	mixedSrcRes
	mixedDstRes
	mixedCommunity
	mixedSource
	mixedSrcPort
	mixedICMP
)

// window is the state of one aggregation window. The aggregates are built in place, in
// chunks of batch_size events that become the emitted batches: nothing is copied when a
// window grows or is emitted, and a window is never used again once emitted.
type window struct {
	start  flow.Time
	index  map[key]int32 // aggregate number: chunks[n/batch_size][n%batch_size]
	chunks [][]flow.Event
	mixed  []uint8       // per aggregate: the fields its events disagree on
	n      int           // aggregates
	inputs []*flow.Batch // retained batches whose events are folded in here
	events int           // events absorbed
}

// newWindow sizes the new window's index like the last one's: a busy host has about as many
// conversations from one window to the next, and growing a map of 100,000 keys step by step
// costs more than filling it.
func newWindow(start flow.Time, last *window) *window {
	hint := 0
	if last != nil {
		hint = last.n + last.n/8
	}
	return &window{start: start, index: make(map[key]int32, hint), mixed: make([]uint8, 0, hint)}
}

// add appends a new aggregate and returns its number.
func (w *window) add(g flow.Event, chunkSize int) int32 {
	if w.n%chunkSize == 0 {
		w.chunks = append(w.chunks, make([]flow.Event, 0, chunkSize))
	}
	c := &w.chunks[len(w.chunks)-1]
	*c = append(*c, g)
	w.mixed = append(w.mixed, 0)
	w.n++
	return int32(w.n - 1)
}

// Aggregator is the aggregate enricher. Enrich is safe for concurrent use.
type Aggregator struct {
	env component.Env
	log *slog.Logger
	cfg Config

	next component.Emitter

	mu     sync.Mutex
	cur    *window
	closed bool

	// emitMu is taken while still holding mu when a window is closed, so that windows reach
	// the next stage in the order they closed; it is held while emitting, which may block on
	// backpressure.
	emitMu sync.Mutex
	ids    *flow.IDGen // under emitMu

	runCtx    context.Context // for windows the ticker closes; ends at Close
	cancelRun context.CancelFunc
	stop      chan struct{}
	done      chan struct{}
	started   bool

	absorbed prometheus.Counter
	emitted  prometheus.Counter
	windows  *prometheus.CounterVec
	held     prometheus.Gauge
	heldN    atomic.Int64
}

// New builds an aggregator; it starts its window clock in Start.
func New(env component.Env, c *Config) (*Aggregator, error) {
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if env.Metrics == nil {
		env.Metrics = component.NopMetrics{}
	}
	a := &Aggregator{env: env, log: env.Logger, cfg: *c, ids: flow.NewIDGen(),
		stop: make(chan struct{}), done: make(chan struct{})}
	a.runCtx, a.cancelRun = context.WithCancel(context.Background())
	a.absorbed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "flowpipe_aggregate_events_absorbed_total",
		Help: "Events folded into aggregates.",
	})
	a.emitted = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "flowpipe_aggregate_events_emitted_total",
		Help: "Aggregate events emitted.",
	})
	a.windows = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "flowpipe_aggregate_windows_total",
		Help: "Windows closed, by reason (tick, max_keys, close).",
	}, []string{"reason"})
	a.held = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "flowpipe_aggregate_held_batches",
		Help: "Input batches retained until the aggregates carrying their events are acknowledged.",
	})
	if err := env.Register(a.absorbed, a.emitted, a.windows, a.held); err != nil {
		return nil, err
	}
	return a, nil
}

var (
	_ component.Holder  = (*Aggregator)(nil)
	_ component.Starter = (*Aggregator)(nil)
	_ component.Closer  = (*Aggregator)(nil)
)

// Attach sets the emitter of the stages after this one; the runtime calls it before Start.
func (a *Aggregator) Attach(next component.Emitter) { a.next = next }

// Start opens the first window and closes one at every multiple of the window length.
func (a *Aggregator) Start(context.Context) error {
	if a.next == nil {
		return errors.New("aggregate: no downstream emitter attached")
	}
	a.mu.Lock()
	if a.cur == nil {
		a.cur = newWindow(flow.Now(), nil)
	}
	a.started = true
	a.mu.Unlock()
	go a.clock()
	return nil
}

func (a *Aggregator) clock() {
	defer close(a.done)
	w := a.cfg.Window
	next := time.Now().Truncate(w).Add(w)
	t := time.NewTimer(time.Until(next))
	defer t.Stop()
	for {
		select {
		case <-a.stop:
			return
		case <-t.C:
		}
		a.closeWindow(a.runCtx, "tick")
		// Skip boundaries missed while emitting blocked, rather than closing a burst of
		// empty windows.
		now := time.Now()
		for !next.After(now) {
			next = next.Add(w)
		}
		t.Reset(time.Until(next))
	}
}

// aggregatable reports the events that are folded; everything else passes through, including
// aggregates from an upstream aggregator (a collector receiving from agents).
func aggregatable(ev *flow.Event) bool {
	if ev.Type == flow.TypeAggregate {
		return false
	}
	switch ev.Protocol {
	case flow.ProtoTCP, flow.ProtoUDP, flow.ProtoICMP, flow.ProtoICMPv6:
		return true
	}
	return false
}

// Enrich folds the batch's TCP, UDP, ICMP and ICMPv6 events into the open window and leaves
// the other events in the batch. The batch is retained by each window that absorbed some of
// its events (usually one; two when a full window closed in the middle of the batch).
func (a *Aggregator) Enrich(ctx context.Context, b *flow.Batch) error {
	evs := b.Events
	a.mu.Lock()
	if a.closed || a.next == nil {
		// After Close nothing would ever flush a window: pass events on rather than hold
		// them forever.
		a.mu.Unlock()
		return nil
	}
	if a.cur == nil {
		a.cur = newWindow(flow.Now(), nil)
	}
	w := a.cur
	retained := false
	kept, absorbed := 0, 0
loop:
	for i := range evs {
		ev := &evs[i]
		if !aggregatable(ev) {
			if kept != i {
				evs[kept] = *ev
			}
			kept++
			continue
		}
		k := a.keyOf(ev)
		idx, ok := w.index[k]
		for !ok && w.n >= a.cfg.MaxKeys {
			// The window is full: close it and emit it (without mu, so other sources go
			// on), while this batch goes on into the next window.
			full := w
			a.cur = newWindow(flow.Now(), full)
			a.emitMu.Lock()
			a.mu.Unlock()
			a.emit(ctx, full, "max_keys")
			a.emitMu.Unlock()
			a.mu.Lock()
			if a.closed {
				// Close flushed the window this batch had moved on to: the rest of the
				// batch passes through, un-aggregated but not lost.
				kept += copy(evs[kept:], evs[i:])
				break loop
			}
			// Another goroutine may have used or rotated the new window meanwhile.
			w = a.cur
			retained = false
			idx, ok = w.index[k]
		}
		if !retained {
			b.Retain()
			a.heldN.Add(1)
			w.inputs = append(w.inputs, b)
			retained = true
		}
		if !ok {
			idx = w.add(aggregateOf(ev, k), a.cfg.BatchSize)
			w.index[k] = idx
		}
		fold(&w.chunks[int(idx)/a.cfg.BatchSize][int(idx)%a.cfg.BatchSize], &w.mixed[idx], ev)
		w.events++
		absorbed++
	}
	a.mu.Unlock()
	passOn(b, evs[:kept])
	a.absorbed.Add(float64(absorbed))
	a.held.Set(float64(a.heldN.Load()))
	return nil
}

// keyOf is the conversation an event is folded into.
func (a *Aggregator) keyOf(ev *flow.Event) key {
	k := key{src: ev.SrcAddr, dst: ev.DstAddr, dport: ev.DstPort, proto: ev.Protocol, dir: ev.Direction}
	if flow.IsICMP(ev.Protocol) {
		k.dport = 0
	}
	if a.cfg.ByRuleID {
		k.rule = ev.RuleID
	}
	return k
}

// aggregateOf starts the aggregate of conversation k from its first event.
func aggregateOf(ev *flow.Event, k key) flow.Event {
	return flow.Event{
		Type: flow.TypeAggregate, SrcAddr: ev.SrcAddr, DstAddr: ev.DstAddr,
		SrcPort: ev.SrcPort, DstPort: k.dport, Protocol: ev.Protocol, Direction: ev.Direction,
		ICMPType: ev.ICMPType, ICMPCode: ev.ICMPCode,
		RuleID: ev.RuleID, SrcResourceID: ev.SrcResourceID, DstResourceID: ev.DstResourceID,
		CommunityID: ev.CommunityID, Source: ev.Source, Start: ev.Start, End: ev.End,
	}
}

// passOn leaves in b only the events that were not absorbed (kept, a prefix of b.Events).
func passOn(b *flow.Batch, kept []flow.Event) {
	switch {
	case len(kept) == len(b.Events):
	case len(kept) == 0:
		// The batch is held until its window is acknowledged, possibly for minutes: keep
		// no reference to its events, so their memory can go unless the source keeps it.
		b.Events = nil
	default:
		// Same, for the few events passing through (other protocols).
		b.Events = append(make([]flow.Event, 0, len(kept)), kept...)
	}
}

// fold adds one event to an aggregate.
func fold(g *flow.Event, mixed *uint8, ev *flow.Event) {
	g.RxPackets += ev.RxPackets
	g.RxBytes += ev.RxBytes
	g.TxPackets += ev.TxPackets
	g.TxBytes += ev.TxBytes
	switch ev.Type {
	case flow.TypeStart:
		g.NumStarts++
	case flow.TypeEnd:
		g.NumEnds++
	case flow.TypeDrop:
		g.NumDrops++
	}
	if ev.Start != 0 && (g.Start == 0 || ev.Start < g.Start) {
		g.Start = ev.Start
	}
	if ev.End > g.End {
		g.End = ev.End
	}
	same := func(bit uint8, have *string, v string) {
		if *mixed&bit == 0 && *have != v {
			*mixed |= bit
			*have = ""
		}
	}
	same(mixedRule, &g.RuleID, ev.RuleID)
	same(mixedSrcRes, &g.SrcResourceID, ev.SrcResourceID)
	same(mixedDstRes, &g.DstResourceID, ev.DstResourceID)
	same(mixedCommunity, &g.CommunityID, ev.CommunityID)
	same(mixedSource, &g.Source, ev.Source)
	if *mixed&mixedSrcPort == 0 && g.SrcPort != ev.SrcPort {
		*mixed |= mixedSrcPort
		g.SrcPort = 0
	}
	if *mixed&mixedICMP == 0 && (g.ICMPType != ev.ICMPType || g.ICMPCode != ev.ICMPCode) {
		*mixed |= mixedICMP
		g.ICMPType, g.ICMPCode = 0, 0
	}
}

// closeWindow ends the open window now and emits its aggregates.
func (a *Aggregator) closeWindow(ctx context.Context, reason string) {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return
	}
	w := a.cur
	a.cur = newWindow(flow.Now(), w)
	a.emitMu.Lock()
	a.mu.Unlock()
	defer a.emitMu.Unlock()
	a.emit(ctx, w, reason)
}

// flowNamespace makes the flow_id of an aggregate a name-based UUID of its key, so that the
// aggregates of one conversation share a flow_id from window to window.
var flowNamespace = uuid.MustParse("5d0e43a8-0c1e-4b8e-9a53-6f6c6f777069")

// flowID is uuid.NewSHA1(flowNamespace, key) (a version 5 UUID) computed without the
// allocations of a hash.Hash, since every aggregate of every window gets one.
func flowID(g *flow.Event, rule string) uuid.UUID {
	var buf [16 + 2*16 + 2 + 1 + 1 + 64]byte
	b := append(buf[:0], flowNamespace[:]...)
	s, d := g.SrcAddr.As16(), g.DstAddr.As16()
	b = append(b, s[:]...)
	b = append(b, d[:]...)
	b = binary.BigEndian.AppendUint16(b, g.DstPort)
	b = append(b, g.Protocol, byte(g.Direction))
	b = append(b, rule...)
	sum := sha1.Sum(b)
	var u uuid.UUID
	copy(u[:], sum[:16])
	u[6] = (u[6] & 0x0f) | 0x50 // version 5
	u[8] = (u[8] & 0x3f) | 0x80 // RFC 4122 variant
	return u
}

// emit sends a closed window's aggregates downstream, in batches of at most BatchSize; the
// input batches are released once every one of those batches is acknowledged, with the first
// error any of them reported. The caller holds emitMu.
func (a *Aggregator) emit(ctx context.Context, w *window, reason string) {
	if w == nil || w.n == 0 {
		return
	}
	end := flow.Now()
	w.index, w.mixed = nil, nil // not needed any more; let them go before the acks come
	for _, chunk := range w.chunks {
		for i := range chunk {
			g := &chunk[i]
			g.EventID = a.ids.New()
			rule := ""
			if a.cfg.ByRuleID {
				rule = g.RuleID
			}
			g.FlowID = flowID(g, rule)
			g.Timestamp = end
			g.WindowStart = w.start
			g.WindowEnd = end
		}
	}
	a.windows.WithLabelValues(reason).Inc()
	a.emitted.Add(float64(w.n))

	inputs := w.inputs
	var pending atomic.Int32
	pending.Store(int32(len(w.chunks)))
	var firstErr atomic.Pointer[error]
	ack := func(err error) {
		if err != nil {
			firstErr.CompareAndSwap(nil, &err)
		}
		if pending.Add(-1) != 0 {
			return
		}
		var res error
		if p := firstErr.Load(); p != nil {
			res = *p
		}
		for _, in := range inputs {
			in.Release(res)
		}
		a.held.Set(float64(a.heldN.Add(-int64(len(inputs)))))
	}
	a.log.Debug("window closed", "reason", reason, "aggregates", w.n, "events", w.events, "batches_held", len(inputs))
	for _, chunk := range w.chunks {
		if err := a.next.Emit(ctx, flow.NewBatch(chunk, ack)); err != nil {
			// Emit acknowledges the batch in every case, so the inputs are released with
			// the error; log why the aggregates did not go on.
			a.log.Warn("aggregates not delivered", "reason", reason, "error", err)
		}
	}
}

// Close stops the window clock and flushes the open window; ctx bounds how long emitting may
// block. Events that arrive afterwards pass through un-aggregated.
func (a *Aggregator) Close(ctx context.Context) error {
	a.mu.Lock()
	started := a.started
	a.started = false
	a.mu.Unlock()
	if started {
		close(a.stop)
		select {
		case <-a.done:
		case <-ctx.Done():
			// The clock is blocked emitting (backpressure); give up on that window.
			a.cancelRun()
			<-a.done
		}
	}
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return nil
	}
	a.closed = true
	w := a.cur
	a.cur = nil
	a.emitMu.Lock()
	a.mu.Unlock()
	a.emit(ctx, w, "close")
	a.emitMu.Unlock()
	a.cancelRun()
	return nil
}
