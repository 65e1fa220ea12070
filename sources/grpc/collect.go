package grpcsource

import (
	"context"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/dedup"
)

// collector gathers the events of every stream into batches and remembers event IDs for
// de-duplication. One mutex covers both, so an event is checked and queued in one step.
//
// Every ID accepted is in the window (internal/dedup: one flat table, up to
// dedup.max_events IDs, whose every access is a cache miss) from the moment its event is
// accepted until it leaves the window; checking and entering it is one probe (Window.See),
// and its delivery touches the table no more (Window.Remember only appends to the window's
// FIFO). Which IDs are still in flight each batch knows itself, in a small table of its own
// that stays in cache (flight); only a duplicate asks. A duplicate of a delivered event is
// ACKed at once; a duplicate of an event in flight waits with that event's batch and is
// ACKed with the original (a client that resent after a lost ACK or a reconnect gets its ACK
// on the stream it is on now). When a batch fails (the pipeline stopped), its IDs are
// forgotten, so that the client's resend is accepted again.
type collector struct {
	r *Receiver

	mu      sync.Mutex
	win     *dedup.Window
	cur     *flight   // the IDs of the batch being built
	flying  []*flight // those of the batches taken and not yet finished
	spare   []*flight
	events  []flow.Event
	origins []origin
	first   time.Time // arrival of the batch's first event
	stopped bool
	ids     []uuid.UUID // finish's scratch

	ready chan *pendingBatch // full batches for the emitter
	free  chan []flow.Event  // recycled event slices
	freeO chan []origin      // recycled origin slices
	wg    sync.WaitGroup     // emitted batches not yet acknowledged
}

// flight is the de-duplication state of one batch in flight: its IDs, and the duplicates of
// them that arrived meanwhile and wait for its outcome.
type flight struct {
	ids     dedup.Table
	waiters []origin
}

// origin is where an event came from: its stream, and on a native stream its batch.
type origin struct {
	st  *stream
	id  uuid.UUID
	seq uint64
}

type pendingBatch struct {
	events  []flow.Event
	origins []origin
	fl      *flight // nil when de-duplication is off
}

func newCollector(r *Receiver) *collector {
	return &collector{
		r:     r,
		win:   dedup.NewWindow(r.conf().Dedup.Window, r.conf().Dedup.MaxEvents),
		ready: make(chan *pendingBatch, 1),
		free:  make(chan []flow.Event, 8),
		freeO: make(chan []origin, 8),
	}
}

func (c *collector) dedupOn() bool {
	return c.r.conf().Dedup.Window > 0 && c.r.conf().Dedup.MaxEvents > 0
}

// add takes events received on st (of its batch seq on a native stream; 0 on a NetBird
// stream), which has already counted them as unacknowledged; events is not kept. It blocks
// while the emitter is busy with the previous full batch (backpressure).
func (c *collector) add(st *stream, seq uint64, events []flow.Event) {
	var now []origin // duplicates of delivered events: ACKed at once
	dedupOn := c.dedupOn()
	c.mu.Lock()
	for i := range events {
		if c.stopped {
			c.mu.Unlock()
			st.fail(seq, len(events)-i)
			if len(now) > 0 {
				st.resolve(now, true)
			}
			return
		}
		e := &events[i]
		id := e.EventID
		if dedupOn {
			if c.win.See(id) {
				c.r.duplicates.Inc()
				if f := c.flightOf(id); f != nil {
					f.waiters = append(f.waiters, origin{st, id, seq})
				} else {
					now = append(now, origin{st, id, seq})
				}
				continue
			}
			if c.cur == nil {
				c.cur = c.newFlight()
			}
			c.cur.ids.Set(id, dedup.InFlight)
		}
		if len(c.events) == 0 {
			c.first = time.Now()
			if c.events == nil {
				c.events = c.newEvents()
			}
		}
		c.events = append(c.events, *e)
		c.origins = append(c.origins, origin{st, id, seq})
		if len(c.events) >= c.r.conf().BatchSize {
			full := c.take()
			c.mu.Unlock()
			select {
			case c.ready <- full:
			case <-c.r.stopping:
				c.finish(full, flow.ErrShutdown)
			}
			c.mu.Lock()
		}
	}
	c.mu.Unlock()
	if len(now) > 0 {
		st.resolve(now, true)
	}
}

// flightOf is the flight of the batch that holds id, nil when none does (id was delivered);
// called with c.mu held.
func (c *collector) flightOf(id uuid.UUID) *flight {
	if c.cur != nil && c.cur.ids.Get(id) != dedup.Absent {
		return c.cur
	}
	for _, f := range c.flying {
		if f.ids.Get(id) != dedup.Absent {
			return f
		}
	}
	return nil
}

func (c *collector) newFlight() *flight {
	if n := len(c.spare); n > 0 {
		f := c.spare[n-1]
		c.spare = c.spare[:n-1]
		return f
	}
	return &flight{}
}

func (c *collector) newEvents() []flow.Event {
	select {
	case ev := <-c.free:
		return ev[:0]
	default:
		return make([]flow.Event, 0, c.r.conf().BatchSize)
	}
}

// take removes the batch being built; called with c.mu held.
func (c *collector) take() *pendingBatch {
	b := &pendingBatch{events: c.events, origins: c.origins, fl: c.cur}
	if c.cur != nil {
		c.flying = append(c.flying, c.cur)
		c.cur = nil
	}
	c.events = nil
	select {
	case o := <-c.freeO:
		c.origins = o[:0]
	default:
		c.origins = make([]origin, 0, c.r.conf().BatchSize)
	}
	c.wg.Add(1)
	return b
}

// run emits batches until ctx ends: full ones as they come, partial ones batch_delay after
// their first event.
func (c *collector) run(ctx context.Context, out component.Emitter) {
	period := func() time.Duration { return max(c.r.conf().BatchDelay/2, time.Millisecond) }
	every := period()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case b := <-c.ready:
			c.emit(ctx, out, b)
		case <-tick.C:
			if p := period(); p != every { // a reload changed batch_delay
				every = p
				tick.Reset(every)
			}
			c.mu.Lock()
			var b *pendingBatch
			if len(c.events) > 0 && time.Since(c.first) >= c.r.conf().BatchDelay {
				b = c.take()
			}
			c.mu.Unlock()
			if b != nil {
				c.emit(ctx, out, b)
			}
		case <-ctx.Done():
			c.stop()
			return
		}
	}
}

func (c *collector) emit(ctx context.Context, out component.Emitter, pb *pendingBatch) {
	b := flow.NewBatch(pb.events, func(err error) { c.finish(pb, err) })
	// The runtime names the batch's source (flow.Batch.StampSource).
	// Emit acknowledges the batch in every case (ErrShutdown when it could not take it).
	_ = out.Emit(ctx, b)
}

// stop refuses further events and fails the batch being built and any full one not emitted.
func (c *collector) stop() {
	c.mu.Lock()
	c.stopped = true
	var b *pendingBatch
	if len(c.events) > 0 {
		b = c.take()
	}
	c.mu.Unlock()
	if b != nil {
		c.finish(b, flow.ErrShutdown)
	}
	for {
		select {
		case b := <-c.ready:
			c.finish(b, flow.ErrShutdown)
		default:
			return
		}
	}
}

// finish is a batch's acknowledgement: ACK its events to their clients when the sinks made
// them durable or the user's policy dropped them, else forget them so a resend is accepted.
func (c *collector) finish(pb *pendingBatch, err error) {
	defer c.wg.Done()
	ok := err == nil || flow.IsDrop(err)
	if flow.IsDrop(err) {
		c.r.ackedDropped.Add(float64(len(pb.origins)))
	}
	var extra []origin // duplicates that waited for these events
	if f := pb.fl; f != nil {
		c.mu.Lock()
		ids := c.ids[:0]
		for _, o := range pb.origins {
			ids = append(ids, o.id)
		}
		c.ids = ids
		var err error
		if ok {
			err = c.win.Remember(ids, time.Now())
		} else {
			c.win.Forget(ids)
		}
		extra = f.waiters
		f.waiters = nil
		f.ids.Reset()
		for i, g := range c.flying {
			if g == f {
				c.flying = append(c.flying[:i], c.flying[i+1:]...)
				break
			}
		}
		if len(c.spare) < 8 {
			c.spare = append(c.spare, f)
		}
		c.mu.Unlock()
		if err != nil {
			c.r.env.Metrics.Errors("dedup_state", 1)
			c.r.log.Error("dedup state not saved; a resend after a restart may be delivered twice", "err", err)
		}
	}
	// ACK per stream in runs, one lock per run.
	ackRuns(pb.origins, ok)
	ackRuns(extra, ok)
	if !ok {
		c.r.notAcked.Add(float64(len(pb.origins)))
	}
	// Not cleared: the next batch overwrites every event it uses, and the strings a recycled
	// slice still holds stay referenced only until then (clearing cost 2% of the collector).
	events := pb.events
	select {
	case c.free <- events:
	default:
	}
	clear(pb.origins)
	select {
	case c.freeO <- pb.origins[:0]:
	default:
	}
}

// ackRuns resolves origins per stream in runs, one lock per run.
func ackRuns(os []origin, ok bool) {
	for i := 0; i < len(os); {
		j := i + 1
		for j < len(os) && os[j].st == os[i].st {
			j++
		}
		os[i].st.resolve(os[i:j], ok)
		i = j
	}
}

// load restores delivered IDs from the state file; called before serving.
func (c *collector) load(path string) error {
	return c.win.Load(path, time.Now())
}
