package pipeline

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/pipeline/diskqueue"
)

// diskSinkQueue is a sink's queue on disk. A batch offered to it is accepted by the sink
// once it is written (and fsynced with sync: batch); the pipeline keeps no reference to it,
// so the source's acknowledgement waits only for the other sinks. The sink's writers take
// batches back from disk, and each one written confirms its record.
type diskSinkQueue struct {
	opts diskqueue.Options
	q    *diskqueue.Queue // set by open
}

// queueDir is where a sink's disk queue lives: queue.path (relative to the pipeline file's
// directory) or <data_dir>/queue/<sink name>.
func queueDir(doc *config.Document, sink string, st QueueSettings) string {
	if st.Path == "" {
		return filepath.Join(doc.DataDir, "queue", sink)
	}
	if filepath.IsAbs(st.Path) {
		return filepath.Clean(st.Path)
	}
	return filepath.Join(doc.Dir, st.Path)
}

// checkQueueDir makes sure the directory can be created and written, as validate promises,
// without opening the queue (a running flowpipe may hold it).
func checkQueueDir(dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("cannot create the queue directory: %w", err)
	}
	f, err := os.CreateTemp(dir, ".probe-*.tmp")
	if err != nil {
		return fmt.Errorf("cannot write in the queue directory: %w", err)
	}
	f.Close()
	os.Remove(f.Name())
	return nil
}

func newDiskSinkQueue(n *sinkNode, dir string) *diskSinkQueue {
	st := n.settings.Queue
	d := &diskSinkQueue{}
	fsync := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "flowpipe_sink_queue_fsync_seconds",
		Help:    "Duration of fsyncs of a sink's disk queue.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
	})
	d.opts = diskqueue.Options{
		Dir: dir, MaxSize: int64(st.MaxSize), WhenFull: st.WhenFull,
		Sync: st.Sync, SyncInterval: st.SyncInterval,
		Logger:  n.log.With("sink", n.name),
		Dropped: n.m.Dropped,
		Fsync:   func(d time.Duration) { fsync.Observe(d.Seconds()) },
	}
	stat := func(f func(diskqueue.Stats) float64) func() float64 {
		return func() float64 {
			if d.q == nil {
				return 0
			}
			return f(d.q.Stats())
		}
	}
	// The disk queue's own reasons are published at 0, as the runtime's are.
	n.m.DropCounter("queue_corrupt")
	n.m.DropCounter("queue_error")
	reg := n.m.Registerer()
	for _, c := range []prometheus.Collector{
		fsync,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "flowpipe_sink_queue_bytes", Help: "Bytes of a sink's disk queue on disk.",
		}, stat(func(s diskqueue.Stats) float64 { return float64(s.Bytes) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "flowpipe_sink_queue_segments", Help: "Segment files of a sink's disk queue.",
		}, stat(func(s diskqueue.Stats) float64 { return float64(s.Segments) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "flowpipe_sink_queue_oldest_seconds", Help: "Age of the oldest batch in a sink's disk queue that the sink has not confirmed (0 when none).",
		}, stat(func(s diskqueue.Stats) float64 {
			if s.Oldest.IsZero() {
				return 0
			}
			return time.Since(s.Oldest).Seconds()
		})),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "flowpipe_sink_queue_corrupt_bytes_total", Help: "Damaged bytes a sink's disk queue skipped (the events in them are counted in flowpipe_events_dropped_total{reason=\"queue_corrupt\"} when known).",
		}, stat(func(s diskqueue.Stats) float64 { return float64(s.CorruptBytes) })),
	} {
		if err := reg.Register(c); err != nil {
			n.log.Warn("disk queue metric not registered", "sink", n.name, "error", err)
		}
	}
	return d
}

func (d *diskSinkQueue) open() error {
	q, err := diskqueue.Open(d.opts)
	if err != nil {
		return err
	}
	d.q = q
	return nil
}

func (d *diskSinkQueue) offer(ctx context.Context, n *sinkNode, b *flow.Batch) error {
	// The reference is held until the record is durable (sync: batch), so that the source's
	// acknowledgement waits for the fsync while the source goes on producing.
	b.Retain()
	err := d.q.AppendAsync(ctx, b.Events, func(err error) {
		if err != nil {
			n.log.Error("disk queue fsync failed; batch not accepted", "sink", n.name, "events", len(b.Events), "error", err)
			n.drop(b, "queue_error")
			return
		}
		b.Release(nil)
	})
	switch {
	case err == nil:
		return nil
	case errors.Is(err, diskqueue.ErrFull):
		n.drop(b, "queue_full")
		return nil
	case errors.Is(err, diskqueue.ErrClosed) || ctx.Err() != nil:
		// Never accepted: the source learns it was not delivered.
		n.undelivered.Add(int64(len(b.Events)))
		n.m.Dropped("shutdown", len(b.Events))
		b.Release(flow.ErrShutdown)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return errStopping
	default:
		n.log.Error("disk queue write failed; batch dropped", "sink", n.name, "events", len(b.Events), "error", err)
		n.drop(b, "queue_error")
		return nil
	}
}

func (d *diskSinkQueue) pop(ctx context.Context) *flow.Batch { return d.q.Next(ctx) }

func (d *diskSinkQueue) close(keep bool) {
	if d.q == nil {
		return
	}
	if keep {
		d.q.Stop()
	} else {
		d.q.CloseWrites()
	}
}

func (d *diskSinkQueue) drainAll() []*flow.Batch { return nil }

func (d *diskSinkQueue) depth() (batches, events int) {
	if d.q == nil {
		return 0, 0
	}
	r, e := d.q.Depth()
	return int(r), int(e)
}

func (d *diskSinkQueue) durable() bool { return true }

func (d *diskSinkQueue) shutdown() {
	if d.q != nil {
		d.q.Close()
	}
}
