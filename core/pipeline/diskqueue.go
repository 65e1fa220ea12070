package pipeline

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/pipeline/diskqueue"
)

// diskSinkQueue is a sink's queue on disk. A batch offered to it is accepted by the sink
// once it is written (and fsynced with sync: batch); the pipeline keeps no reference to it,
// so the source's acknowledgement waits only for the other sinks. The sink's writers take
// batches back from disk, and each one written confirms its record.
type diskSinkQueue struct {
	opts  diskqueue.Options
	stat  *diskStat
	q     atomic.Pointer[diskqueue.Queue] // set by open
	ready chan struct{}                   // closed by open, successful or not
	err   error                           // open's error, read after ready

	node          *sinkNode // whose queue it is: pop asks whether its sink takes encodings
	undecodedOnce sync.Once // the debug log that records go to the sink undecoded
}

// diskStat is what a sink's disk queue metrics read: one set per sink name, registered once,
// reading whichever queue the sink has now (a reload may give it another).
type diskStat struct {
	q     atomic.Pointer[diskqueue.Queue]
	fsync prometheus.Histogram
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

func (p *Pipeline) newDiskSinkQueue(n *sinkNode, dir string) *diskSinkQueue {
	st := n.settings.Queue
	d := &diskSinkQueue{ready: make(chan struct{}), stat: p.diskStat(n), node: n}
	d.opts = diskqueue.Options{
		Dir: dir, MaxSize: int64(st.MaxSize), WhenFull: st.WhenFull,
		Sync: st.Sync, SyncInterval: st.SyncInterval,
		Logger:  n.log.With("sink", n.name),
		Dropped: n.m.Dropped,
		Fsync:   func(t time.Duration) { d.stat.fsync.Observe(t.Seconds()) },
	}
	return d
}

// diskStat returns the disk queue metrics of a sink, registering them the first time.
func (p *Pipeline) diskStat(n *sinkNode) *diskStat {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ds, ok := p.diskStats[n.name]; ok {
		return ds
	}
	ds := &diskStat{fsync: prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "flowpipe_sink_queue_fsync_seconds",
		Help:    "Duration of fsyncs of a sink's disk queue.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
	})}
	p.diskStats[n.name] = ds
	stat := func(f func(diskqueue.Stats) float64) func() float64 {
		return func() float64 {
			q := ds.q.Load()
			if q == nil {
				return 0
			}
			return f(q.Stats())
		}
	}
	// The disk queue's own reasons are published at 0, as the runtime's are.
	n.m.DropCounter("queue_corrupt")
	n.m.DropCounter("queue_error")
	reg := n.m.Registerer()
	for _, c := range []prometheus.Collector{
		ds.fsync,
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
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "flowpipe_sink_queue_disk_full", Help: "1 while a sink's disk queue cannot write because its disk is full (ENOSPC, EDQUOT or a failed fsync), else 0.",
		}, stat(func(s diskqueue.Stats) float64 {
			if s.DiskFull {
				return 1
			}
			return 0
		})),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "flowpipe_sink_queue_corrupt_bytes_total", Help: "Damaged bytes a sink's disk queue skipped (the events in them are counted in flowpipe_events_dropped_total{reason=\"queue_corrupt\"} when known).",
		}, stat(func(s diskqueue.Stats) float64 { return float64(s.CorruptBytes) })),
	} {
		if err := reg.Register(c); err != nil {
			n.log.Warn("disk queue metric not registered", "sink", n.name, "error", err)
		}
	}
	return ds
}

func (d *diskSinkQueue) open() error {
	q, err := diskqueue.Open(d.opts)
	if err != nil {
		d.err = err
		close(d.ready)
		return err
	}
	d.q.Store(q)
	d.stat.q.Store(q)
	close(d.ready)
	return nil
}

// wait waits for open: a reload that gives a sink a new queue in the directory of its old
// one opens it only once the old one is closed, and batches offered meanwhile wait.
func (d *diskSinkQueue) wait(ctx context.Context) (*diskqueue.Queue, error) {
	select {
	case <-d.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if d.err != nil {
		return nil, d.err
	}
	return d.q.Load(), nil
}

func (d *diskSinkQueue) offer(ctx context.Context, n *sinkNode, b *flow.Batch) error {
	// The reference is held until the record is durable (sync: batch), so that the source's
	// acknowledgement waits for the fsync while the source goes on producing.
	b.Retain()
	q, err := d.wait(ctx)
	if err != nil {
		if ctx.Err() != nil {
			n.undelivered.Add(int64(b.Len()))
			n.m.Dropped("shutdown", b.Len())
			b.Release(flow.ErrShutdown)
			return ctx.Err()
		}
		n.drop(b, "queue_error")
		return nil
	}
	durable := func(err error) {
		if err != nil {
			n.log.Error("disk queue fsync failed; batch not accepted", "sink", n.name, "events", b.Len(), "error", err)
			n.drop(b, "queue_error")
			return
		}
		b.Release(nil)
	}
	if enc := b.Encoded(); enc != nil {
		// The batch came in the codec the queue stores (undecoded from a source plugin, or
		// with its encoding kept): its bytes are written as they are.
		err = q.AppendEncodedAsync(ctx, enc, b.Len(), durable)
	} else {
		err = q.AppendAsync(ctx, b.Events, durable)
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, diskqueue.ErrFull):
		n.drop(b, "queue_full")
		return nil
	case errors.Is(err, diskqueue.ErrClosed) || ctx.Err() != nil:
		// Never accepted: the source learns it was not delivered.
		n.undelivered.Add(int64(b.Len()))
		n.m.Dropped("shutdown", b.Len())
		b.Release(flow.ErrShutdown)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return errStopping
	default:
		n.log.Error("disk queue write failed; batch dropped", "sink", n.name, "events", b.Len(), "error", err)
		n.drop(b, "queue_error")
		return nil
	}
}

// pop hands out the next record. A sink that takes encodings (component.EncodedWriter: a
// sink plugin) gets it undecoded (diskqueue.NextEncoded) and is sent the record's payload as
// it is on disk; any other sink gets it decoded by the queue (Next, into a reused slice of
// events, cheaper than the lazy decoding's new one). Either way a record that does not
// decode is skipped and counted by the queue as damaged (queue_corrupt), the same way. Should
// a reload swap the sink between pop and write, sinkNode.write decodes what it needs.
func (d *diskSinkQueue) pop(ctx context.Context) *flow.Batch {
	q, err := d.wait(ctx)
	if err != nil {
		return nil
	}
	if _, ok := d.node.component().(component.EncodedWriter); !ok {
		return q.Next(ctx)
	}
	b := q.NextEncoded(ctx)
	if b != nil {
		d.undecodedOnce.Do(func() {
			d.opts.Logger.Debug("disk queue: records read back go to the sink undecoded (a sink plugin is sent them as they are on disk)", "queue", d.opts.Dir)
		})
	}
	return b
}

func (d *diskSinkQueue) close(keep bool) {
	q := d.q.Load()
	if q == nil {
		return
	}
	if keep {
		q.Stop()
	} else {
		q.CloseWrites()
	}
}

func (d *diskSinkQueue) drainAll() []*flow.Batch { return nil }

func (d *diskSinkQueue) depth() (batches, events int) {
	q := d.q.Load()
	if q == nil {
		return 0, 0
	}
	r, e := q.Depth()
	return int(r), int(e)
}

func (d *diskSinkQueue) durable() bool { return true }

func (d *diskSinkQueue) shutdown() {
	if q := d.q.Load(); q != nil {
		q.Close()
		d.stat.q.CompareAndSwap(q, nil) // unless the sink has another queue now
	}
}
