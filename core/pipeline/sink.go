package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/metrics"
	"github.com/flowpipe/flowpipe/core/tap"
	"github.com/flowpipe/flowpipe/internal/backoff"
)

// SinkSettings are the runtime's options for every sink, written beside the sink's own
// options in pipeline.yaml.
type SinkSettings struct {
	Queue QueueSettings `yaml:"queue"`
	Retry RetrySettings `yaml:"retry"`
	// InFlight is how many batches the sink may be writing at once (default 1, which keeps
	// order). Sinks that wait on a remote acknowledgement go faster with more.
	InFlight int `yaml:"in_flight"`
}

// QueueSettings choose and bound a sink's queue: in memory (max_events, max_batches) or on
// disk (path, max_size, sync, sync_interval).
type QueueSettings struct {
	Type       string `yaml:"type"` // memory or disk
	MaxEvents  int    `yaml:"max_events"`
	MaxBatches int    `yaml:"max_batches"`
	WhenFull   string `yaml:"when_full"` // block, drop_newest or drop_oldest

	Path         string          `yaml:"path"`     // default <data_dir>/queue/<sink name>
	MaxSize      config.ByteSize `yaml:"max_size"` // bytes on disk
	Sync         string          `yaml:"sync"`     // batch or interval
	SyncInterval time.Duration   `yaml:"sync_interval"`
}

// Queue types.
const (
	QueueMemory = "memory"
	QueueDisk   = "disk"
)

// RetrySettings shape the exponential backoff of failed writes.
type RetrySettings struct {
	InitialInterval time.Duration `yaml:"initial_interval"`
	MaxInterval     time.Duration `yaml:"max_interval"`
	// MaxAttempts gives up on a batch after this many failed writes (counted as dropped,
	// reason retries_exhausted); 0 retries until the pipeline stops.
	MaxAttempts int `yaml:"max_attempts"`
}

// Policies for a full queue.
const (
	WhenFullBlock      = "block"
	WhenFullDropNewest = "drop_newest"
	WhenFullDropOldest = "drop_oldest"
)

// MaxInFlight bounds in_flight: more writers than this only multiply goroutines and
// batches held in memory, never throughput.
const MaxInFlight = 1024

// sinkSettingKeys are the keys of SinkSettings; they are taken out of a sink's options
// before the rest goes to the sink's own config.
var sinkSettingKeys = []string{"queue", "retry", "in_flight"}

func defaultSinkSettings() SinkSettings {
	return SinkSettings{
		Queue: QueueSettings{
			Type: QueueMemory, MaxEvents: 100_000, MaxBatches: 1024, WhenFull: WhenFullBlock,
			MaxSize: 1 << 30, Sync: "batch", SyncInterval: 100 * time.Millisecond,
		},
		Retry:    RetrySettings{InitialInterval: 100 * time.Millisecond, MaxInterval: 30 * time.Second},
		InFlight: 1,
	}
}

// Validate checks the settings; paths are relative to the sink.
func (s *SinkSettings) Validate() error {
	var errs config.FieldErrors
	if s.Queue.MaxEvents < 1 {
		errs.Add("queue.max_events", "must be at least 1, got %d", s.Queue.MaxEvents)
	}
	if s.Queue.MaxBatches < 1 {
		errs.Add("queue.max_batches", "must be at least 1, got %d", s.Queue.MaxBatches)
	}
	switch s.Queue.WhenFull {
	case WhenFullBlock, WhenFullDropNewest, WhenFullDropOldest:
	default:
		errs.Add("queue.when_full", "unknown policy %q (want block, drop_newest or drop_oldest)", s.Queue.WhenFull)
	}
	switch s.Queue.Type {
	case QueueMemory:
	case QueueDisk:
		if s.Queue.MaxSize < 1<<20 {
			errs.Add("queue.max_size", "must be at least 1MiB, got %s", s.Queue.MaxSize)
		}
		if s.Queue.Sync != "batch" && s.Queue.Sync != "interval" {
			errs.Add("queue.sync", "unknown mode %q (want batch or interval)", s.Queue.Sync)
		}
		if s.Queue.SyncInterval <= 0 {
			errs.Add("queue.sync_interval", "must be positive")
		}
	default:
		errs.Add("queue.type", "unknown queue type %q (want memory or disk)", s.Queue.Type)
	}
	if s.Retry.InitialInterval <= 0 {
		errs.Add("retry.initial_interval", "must be positive")
	}
	if s.Retry.MaxInterval < s.Retry.InitialInterval {
		errs.Add("retry.max_interval", "must be at least retry.initial_interval (%s)", s.Retry.InitialInterval)
	}
	if s.Retry.MaxAttempts < 0 {
		errs.Add("retry.max_attempts", "must not be negative")
	}
	if s.InFlight < 1 {
		errs.Add("in_flight", "must be at least 1, got %d", s.InFlight)
	} else if s.InFlight > MaxInFlight {
		errs.Add("in_flight", "at most %d, got %d: each is a writer with a batch in hand; a sink that waits on remote acknowledgements has its own limit (the grpc sink's max_in_flight)", MaxInFlight, s.InFlight)
	}
	return errs.Err()
}

// sinkNode runs one sink: its queue, its writers and their retries. A reload that changes
// the sink's component or its retry and in_flight settings keeps the node (its queue and
// what it holds, its counters): the writers stop after their writes, the component is
// swapped, the writers start again.
type sinkNode struct {
	name     string
	spec     config.Component // as written, runtime settings included (for reload's compare)
	own      map[string]any   // the sink's own options (spec's without the runtime settings)
	qdir     string           // a disk queue's directory
	cur      atomic.Pointer[sinkImpl]
	settings SinkSettings
	queue    sinkQueue
	m        *metrics.Component
	log      *slog.Logger
	tap      *tap.Hub

	// root is Run's write context: cancelled shutdown_timeout after the pipeline was told to
	// stop. gen is the running writers' generation (Run and Reload only).
	root context.Context
	gen  *writerGen
	wg   sync.WaitGroup

	pmu      sync.Mutex
	pending  []*flow.Batch // taken from the queue, to be written before the queue's next
	retiring atomic.Bool   // a removed sink delivering what it holds: what it cannot is given up

	consecFails atomic.Int64
	lastErr     atomic.Pointer[error]
	written     atomic.Int64 // events written
	undelivered atomic.Int64 // events given up at shutdown
	kept        atomic.Int64 // events left in a disk queue at shutdown, for the next start
	dropped     atomic.Int64 // events dropped by policy, retry limit or rejection
	dead        atomic.Bool  // the sink returned a flow.FatalError
	onFatal     func()       // stops the pipeline
}

// sinkImpl is the component a sink node writes to.
type sinkImpl struct {
	sink component.Sink
	part *part
}

// writerGen is one start of a node's writers: pop stops them taking batches, write abandons
// their writes in flight (pop is derived from write, write from the node's root).
type writerGen struct {
	pop, write         context.Context
	stopPop, stopWrite context.CancelFunc
}

func newSinkNode(name string, s component.Sink, pt *part, st SinkSettings, m *metrics.Component, log *slog.Logger) *sinkNode {
	n := &sinkNode{
		name: name, settings: st,
		queue: newQueue(st.Queue.MaxBatches, st.Queue.MaxEvents),
		m:     m, log: log,
	}
	n.cur.Store(&sinkImpl{sink: s, part: pt})
	return n
}

func (n *sinkNode) component() component.Sink { return n.cur.Load().sink }

// enqueue hands b to this sink's queue under its policy.
func (n *sinkNode) enqueue(ctx context.Context, b *flow.Batch) error {
	if err := n.queue.offer(ctx, n, b); err != nil {
		return err
	}
	n.m.In.Add(float64(b.Len()))
	n.updateDepth()
	return nil
}

var errStopping = errors.New("pipeline is stopping")

func (n *sinkNode) drop(b *flow.Batch, reason string) {
	n.dropped.Add(int64(b.Len()))
	n.m.Dropped(reason, b.Len())
	b.Release(&flow.DropError{Component: n.name, Reason: reason})
}

func (n *sinkNode) updateDepth() {
	batches, events := n.queue.depth()
	pb, pe := n.pendingDepth()
	n.m.QueueBat.Set(float64(batches + pb))
	n.m.QueueEv.Set(float64(events + pe))
}

func (n *sinkNode) pendingDepth() (batches, events int) {
	n.pmu.Lock()
	defer n.pmu.Unlock()
	for _, b := range n.pending {
		events += b.Len()
	}
	return len(n.pending), events
}

// putBack keeps a batch whose write was stopped by a reload, to be written first.
func (n *sinkNode) putBack(b *flow.Batch) {
	n.pmu.Lock()
	n.pending = append([]*flow.Batch{b}, n.pending...)
	n.pmu.Unlock()
}

func (n *sinkNode) takePending() *flow.Batch {
	n.pmu.Lock()
	defer n.pmu.Unlock()
	if len(n.pending) == 0 {
		return nil
	}
	b := n.pending[0]
	n.pending = n.pending[1:]
	return b
}

func (n *sinkNode) takeAllPending() []*flow.Batch {
	n.pmu.Lock()
	defer n.pmu.Unlock()
	out := n.pending
	n.pending = nil
	return out
}

// start runs the writers. They stop when the queue is closed and drained, when root is
// cancelled (the drain deadline), giving up on what is left, or when a reload pauses them.
func (n *sinkNode) start(root context.Context) {
	n.root = root
	g := &writerGen{}
	g.write, g.stopWrite = context.WithCancel(root)
	g.pop, g.stopPop = context.WithCancel(g.write)
	n.gen = g
	for range n.settings.InFlight {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			for g.pop.Err() == nil {
				b := n.takePending()
				if b == nil {
					b = n.queue.pop(g.pop)
				}
				if b == nil {
					return
				}
				n.updateDepth()
				if n.dead.Load() {
					n.giveUp(b) // a fatal error: nothing more can be written
					continue
				}
				n.write(g, b)
			}
		}()
	}
}

// stopWriters makes the writers take no more batches and waits for them; a write still in
// flight after timeout is abandoned (its batch is put back, or given up when the sink is
// retiring or the pipeline is stopping).
func (n *sinkNode) stopWriters(timeout time.Duration) {
	g := n.gen
	if g == nil {
		return
	}
	g.stopPop()
	t := time.AfterFunc(timeout, g.stopWrite)
	n.wg.Wait()
	t.Stop()
	g.stopWrite()
	n.gen = nil
}

// waitWriters waits for the writers to finish what the (closed) queue holds, abandoning
// writes after timeout.
func (n *sinkNode) waitWriters(timeout time.Duration) {
	g := n.gen
	if g == nil {
		return
	}
	t := time.AfterFunc(timeout, g.stopWrite)
	n.wg.Wait()
	t.Stop()
	g.stopWrite()
	n.gen = nil
}

// abandon handles a batch whose write was stopped: put back for the next writers during a
// reload, given up when the pipeline is stopping or the sink is being removed.
func (n *sinkNode) abandon(b *flow.Batch) {
	if n.root.Err() != nil || n.retiring.Load() {
		n.giveUp(b)
		return
	}
	n.putBack(b)
}

// write delivers b, retrying with the backoff of retry: (internal/backoff). An error the
// sink marked flow.Permanent drops the batch at once, counted as rejected.
func (n *sinkNode) write(g *writerGen, b *flow.Batch) {
	ctx := g.write
	sink := n.component()
	retry := backoff.Policy{Initial: n.settings.Retry.InitialInterval, Max: n.settings.Retry.MaxInterval}
	if _, ok := sink.(component.EncodedWriter); !ok {
		// A batch that came undecoded (from a source plugin) is decoded for the first sink
		// that needs its events, once for all of them.
		if err := b.Decode(); err != nil {
			n.reject(b, err)
			return
		}
	}
	for attempt := 1; ; attempt++ {
		err := sink.Write(ctx, b)
		if err == nil {
			if n.consecFails.Swap(0) >= backoff.FailingAfter {
				n.log.Info("sink recovered", "sink", n.name)
			}
			n.m.Out.Add(float64(b.Len()))
			n.written.Add(int64(b.Len()))
			b.Release(nil)
			return
		}
		if ctx.Err() != nil {
			n.abandon(b)
			return
		}
		if flow.IsFatal(err) {
			n.lastErr.Store(&err)
			n.m.Errors("fatal", 1)
			if n.dead.CompareAndSwap(false, true) {
				n.log.Error("sink cannot write any more; stopping the pipeline", "sink", n.name, "error", err)
				if n.onFatal != nil {
					n.onFatal()
				}
			}
			n.giveUp(b)
			return
		}
		if flow.IsPermanent(err) {
			n.reject(b, err)
			return
		}
		fails := n.consecFails.Add(1)
		n.lastErr.Store(&err)
		n.m.Errors("write", 1)
		if fails == backoff.FailingAfter {
			n.log.Warn("sink keeps failing; retrying", "sink", n.name, "attempts", attempt, "error", err)
		} else {
			n.log.Debug("sink write failed; retrying", "sink", n.name, "attempt", attempt, "error", err)
		}
		if max := n.settings.Retry.MaxAttempts; max > 0 && attempt >= max {
			n.log.Error("sink gave up on a batch", "sink", n.name, "events", b.Len(), "attempts", attempt, "error", err)
			n.drop(b, "retries_exhausted")
			return
		}
		n.m.Retries.Inc()
		if !backoff.Sleep(g.pop, retry.Delay(attempt)) {
			n.abandon(b)
			return
		}
	}
}

// reject drops a batch the sink said can never be written (flow.Permanent): no retry.
func (n *sinkNode) reject(b *flow.Batch, err error) {
	n.log.Error("sink rejected a batch; dropping it without retry", "sink", n.name, "events", b.Len(), "error", err)
	n.dropped.Add(int64(b.Len()))
	n.m.Dropped("rejected", b.Len())
	b.Release(&flow.DropError{Component: n.name, Reason: "rejected", Message: err.Error()})
}

// giveUp releases a batch the sink could not deliver before the pipeline stopped. A batch
// from a disk queue stays there for the next start.
func (n *sinkNode) giveUp(b *flow.Batch) {
	if n.queue.durable() {
		n.kept.Add(int64(b.Len()))
		b.Release(flow.ErrShutdown)
		return
	}
	n.undelivered.Add(int64(b.Len()))
	n.m.Dropped("shutdown", b.Len())
	b.Release(flow.ErrShutdown)
}

// health reports the sink as failing after several consecutive failed writes.
func (n *sinkNode) health() error {
	if n.dead.Load() {
		if p := n.lastErr.Load(); p != nil {
			return fmt.Errorf("sink %s cannot write any more: %w", n.name, *p)
		}
	}
	if n.consecFails.Load() >= backoff.FailingAfter {
		if p := n.lastErr.Load(); p != nil {
			return fmt.Errorf("sink %s: %d consecutive failed writes, last: %w", n.name, n.consecFails.Load(), *p)
		}
	}
	if hc, ok := n.component().(component.HealthChecker); ok {
		if err := hc.Health(); err != nil {
			return fmt.Errorf("sink %s: %w", n.name, err)
		}
	}
	return nil
}
