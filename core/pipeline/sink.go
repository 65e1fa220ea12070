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

// sinkNode runs one sink: its queue, its writers and their retries.
type sinkNode struct {
	name     string
	sink     component.Sink
	settings SinkSettings
	queue    sinkQueue
	m        *metrics.Component
	log      *slog.Logger

	wg          sync.WaitGroup
	consecFails atomic.Int64
	lastErr     atomic.Pointer[error]
	undelivered atomic.Int64 // events given up at shutdown
	kept        atomic.Int64 // events left in a disk queue at shutdown, for the next start
	dropped     atomic.Int64 // events dropped by policy, retry limit or rejection
	dead        atomic.Bool  // the sink returned a flow.FatalError
	onFatal     func()       // stops the pipeline
}

func newSinkNode(name string, s component.Sink, st SinkSettings, m *metrics.Component, log *slog.Logger) *sinkNode {
	return &sinkNode{
		name: name, sink: s, settings: st,
		queue: newQueue(st.Queue.MaxBatches, st.Queue.MaxEvents),
		m:     m, log: log,
	}
}

// enqueue hands b to this sink's queue under its policy.
func (n *sinkNode) enqueue(ctx context.Context, b *flow.Batch) error {
	if err := n.queue.offer(ctx, n, b); err != nil {
		return err
	}
	n.m.In.Add(float64(len(b.Events)))
	n.updateDepth()
	return nil
}

var errStopping = errors.New("pipeline is stopping")

func (n *sinkNode) drop(b *flow.Batch, reason string) {
	n.dropped.Add(int64(len(b.Events)))
	n.m.Dropped(reason, len(b.Events))
	b.Release(&flow.DropError{Component: n.name, Reason: reason})
}

func (n *sinkNode) updateDepth() {
	batches, events := n.queue.depth()
	n.m.QueueBat.Set(float64(batches))
	n.m.QueueEv.Set(float64(events))
}

// start runs the writers. They stop when the queue is closed and drained, or when
// writeCtx is cancelled (the drain deadline), giving up on what is left.
func (n *sinkNode) start(writeCtx context.Context) {
	for range n.settings.InFlight {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			for {
				b := n.queue.pop(writeCtx)
				if b == nil {
					return
				}
				n.updateDepth()
				if n.dead.Load() {
					n.giveUp(b) // a fatal error: nothing more can be written
					continue
				}
				n.write(writeCtx, b)
			}
		}()
	}
}

// write delivers b, retrying with the backoff of retry: (internal/backoff). An error the
// sink marked flow.Permanent drops the batch at once, counted as rejected.
func (n *sinkNode) write(ctx context.Context, b *flow.Batch) {
	retry := backoff.Policy{Initial: n.settings.Retry.InitialInterval, Max: n.settings.Retry.MaxInterval}
	for attempt := 1; ; attempt++ {
		err := n.sink.Write(ctx, b)
		if err == nil {
			if n.consecFails.Swap(0) >= backoff.FailingAfter {
				n.log.Info("sink recovered", "sink", n.name)
			}
			n.m.Out.Add(float64(len(b.Events)))
			b.Release(nil)
			return
		}
		if ctx.Err() != nil {
			n.giveUp(b)
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
			n.log.Error("sink gave up on a batch", "sink", n.name, "events", len(b.Events), "attempts", attempt, "error", err)
			n.drop(b, "retries_exhausted")
			return
		}
		n.m.Retries.Inc()
		if !backoff.Sleep(ctx, retry.Delay(attempt)) {
			n.giveUp(b)
			return
		}
	}
}

// reject drops a batch the sink said can never be written (flow.Permanent): no retry.
func (n *sinkNode) reject(b *flow.Batch, err error) {
	n.log.Error("sink rejected a batch; dropping it without retry", "sink", n.name, "events", len(b.Events), "error", err)
	n.dropped.Add(int64(len(b.Events)))
	n.m.Dropped("rejected", len(b.Events))
	b.Release(&flow.DropError{Component: n.name, Reason: "rejected", Message: err.Error()})
}

// giveUp releases a batch the sink could not deliver before the pipeline stopped. A batch
// from a disk queue stays there for the next start.
func (n *sinkNode) giveUp(b *flow.Batch) {
	if n.queue.durable() {
		n.kept.Add(int64(len(b.Events)))
		b.Release(flow.ErrShutdown)
		return
	}
	n.undelivered.Add(int64(len(b.Events)))
	n.m.Dropped("shutdown", len(b.Events))
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
	if hc, ok := n.sink.(component.HealthChecker); ok {
		if err := hc.Health(); err != nil {
			return fmt.Errorf("sink %s: %w", n.name, err)
		}
	}
	return nil
}
