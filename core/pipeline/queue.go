package pipeline

import (
	"context"
	"sync"

	"github.com/flowpipe/flowpipe/core/flow"
)

// sinkQueue is what stands between the sources and a sink's writers: the memory queue
// below, or a disk queue (diskqueue.go).
type sinkQueue interface {
	// offer queues b for sink n under the sink's full-queue policy, counting what it drops.
	// It returns an error only when ctx is done or the queue is closed; b is then
	// acknowledged with flow.ErrShutdown.
	offer(ctx context.Context, n *sinkNode, b *flow.Batch) error
	// pop takes the oldest batch, waiting for one; nil when the queue is closed and has
	// nothing more to hand out, or ctx is done.
	pop(ctx context.Context) *flow.Batch
	// close refuses new batches; pop hands out what is left, except that a durable queue
	// asked to keep what it holds stops handing out at once.
	close(keep bool)
	// drainAll removes what a non-durable queue still holds (lost at shutdown).
	drainAll() []*flow.Batch
	depth() (batches, events int)
	// durable reports whether what the queue holds survives the process.
	durable() bool
}

// queue is a sink's bounded FIFO of batches, limited both in batches and in events. A batch
// larger than the event limit is still admitted into an empty queue, so that it cannot block
// forever.
type queue struct {
	maxBatches, maxEvents int

	mu       sync.Mutex
	items    []*flow.Batch // FIFO from head
	head     int
	events   int
	closed   bool
	notEmpty chan struct{} // a token when something may be ready to pop
	notFull  chan struct{} // a token when there may be room
}

func newQueue(maxBatches, maxEvents int) *queue {
	return &queue{
		maxBatches: maxBatches,
		maxEvents:  maxEvents,
		notEmpty:   make(chan struct{}, 1),
		notFull:    make(chan struct{}, 1),
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (q *queue) lenLocked() int { return len(q.items) - q.head }

func (q *queue) roomLocked(n int) bool {
	if q.lenLocked() == 0 {
		return true
	}
	return q.lenLocked() < q.maxBatches && q.events+n <= q.maxEvents
}

func (q *queue) pushLocked(b *flow.Batch) {
	if q.head > 0 && q.head == len(q.items) {
		q.items, q.head = q.items[:0], 0
	}
	q.items = append(q.items, b)
	q.events += b.Len()
	signal(q.notEmpty)
}

// pushWait adds b, waiting for room. It returns false when ctx is done first or the queue
// is closed; b is then not queued.
func (q *queue) pushWait(ctx context.Context, b *flow.Batch) bool {
	for {
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			signal(q.notFull)
			return false
		}
		if q.roomLocked(b.Len()) {
			q.pushLocked(b)
			if q.roomLocked(1) {
				signal(q.notFull) // pass the wake-up on to another waiting producer
			}
			q.mu.Unlock()
			return true
		}
		q.mu.Unlock()
		select {
		case <-q.notFull:
		case <-ctx.Done():
			return false
		}
	}
}

// tryPush adds b if there is room now.
func (q *queue) tryPush(b *flow.Batch) (ok, closed bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return false, true
	}
	if !q.roomLocked(b.Len()) {
		return false, false
	}
	q.pushLocked(b)
	return true, false
}

// pushEvict adds b, evicting the oldest batches to make room; it returns the evicted ones.
func (q *queue) pushEvict(b *flow.Batch) (evicted []*flow.Batch, closed bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, true
	}
	for !q.roomLocked(b.Len()) {
		old := q.items[q.head]
		q.items[q.head] = nil
		q.head++
		q.events -= old.Len()
		evicted = append(evicted, old)
	}
	q.pushLocked(b)
	return evicted, false
}

// pop takes the oldest batch, waiting until there is one. It returns nil when the queue is
// closed and empty, or when ctx is done.
func (q *queue) pop(ctx context.Context) *flow.Batch {
	for {
		q.mu.Lock()
		if q.lenLocked() > 0 {
			b := q.items[q.head]
			q.items[q.head] = nil
			q.head++
			q.events -= b.Len()
			if q.lenLocked() > 0 {
				signal(q.notEmpty) // another worker may take the next one
			}
			q.mu.Unlock()
			signal(q.notFull)
			return b
		}
		closed := q.closed
		q.mu.Unlock()
		if closed {
			signal(q.notEmpty) // wake the next idle worker so it sees the close too
			return nil
		}
		select {
		case <-q.notEmpty:
		case <-ctx.Done():
			return nil
		}
	}
}

// offer applies the sink's full-queue policy. It takes a reference to b when the batch is
// queued; a dropped batch is counted and not retained.
func (q *queue) offer(ctx context.Context, n *sinkNode, b *flow.Batch) error {
	b.Retain()
	switch n.settings.Queue.WhenFull {
	case WhenFullBlock:
		if !q.pushWait(ctx, b) {
			n.giveUp(b)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return errStopping
		}
	case WhenFullDropNewest:
		ok, closed := q.tryPush(b)
		if closed {
			n.giveUp(b)
			return errStopping
		}
		if !ok {
			n.drop(b, "queue_full")
		}
	case WhenFullDropOldest:
		evicted, closed := q.pushEvict(b)
		if closed {
			n.giveUp(b)
			return errStopping
		}
		for _, old := range evicted {
			n.drop(old, "queue_full")
		}
	}
	return nil
}

func (q *queue) durable() bool { return false }

// close stops new pushes; pop drains what is left and then returns nil (a memory queue
// cannot keep anything, so keep does not apply).
func (q *queue) close(bool) {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	// Wake every waiter: closing channels would race with signal, so keep tokens flowing.
	signal(q.notEmpty)
	signal(q.notFull)
}

// drainAll removes and returns everything still queued.
func (q *queue) drainAll() []*flow.Batch {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := append([]*flow.Batch(nil), q.items[q.head:]...)
	for i := q.head; i < len(q.items); i++ {
		q.items[i] = nil
	}
	q.items, q.head, q.events = q.items[:0], 0, 0
	return out
}

func (q *queue) depth() (batches, events int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.lenLocked(), q.events
}

// pushFront puts batches back at the head of the queue, in order, beyond its limits: they
// were accepted already (a reload moves a replaced queue's batches here).
func (q *queue) pushFront(bs []*flow.Batch) {
	if len(bs) == 0 {
		return
	}
	q.mu.Lock()
	rest := q.items[q.head:]
	items := make([]*flow.Batch, 0, len(bs)+len(rest))
	items = append(items, bs...)
	items = append(items, rest...)
	for _, b := range bs {
		q.events += b.Len()
	}
	q.items, q.head = items, 0
	q.mu.Unlock()
	signal(q.notEmpty)
}

// unbound lifts the queue's limits: a reload that gives the sink a new queue lets the
// batches already on their way into this one in (as many as there are sources), instead of
// waiting for a sink that may not be writing, then moves them all.
func (q *queue) unbound() {
	q.mu.Lock()
	q.maxBatches, q.maxEvents = int(^uint(0)>>1), int(^uint(0)>>1)
	q.mu.Unlock()
	signal(q.notFull)
}
