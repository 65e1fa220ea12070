package conntrack

import (
	"sync"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
)

// queue decouples the netlink reader, which must never wait, from Emit, which waits while the
// pipeline applies backpressure. Events are appended to fixed-size chunks; a chunk becomes a
// batch as it is, without copying, once it is full or its first event has waited long enough.
// The total is bounded: past max events, push refuses and the reader counts the drop.
//
// A chunk whose batch the pipeline acknowledged comes back (recycle) and is filled again:
// once acknowledged, nothing holds a batch's events (flow.Batch), and a fresh chunk of
// batch_size events (half a megabyte at the default 2,048) is memory the kernel must fault
// in and zero, which under a burst cost more than decoding the events that fill it.
type queue struct {
	mu     sync.Mutex
	chunks []chunk
	size   int // events per chunk (batch_size)
	n      int // events queued
	max    int
	ready  chan struct{} // a chunk filled, or the first event arrived

	free      [][]flow.Event // acknowledged chunks, for reuse; at most maxFreeChunks
	freeUsed  bool           // a chunk was reused since the last trim
	freeQuiet int            // trims in a row that found no chunk reused
}

const (
	// maxFreeChunks bounds the acknowledged chunks kept for reuse: about what a burst has
	// in flight (the plugin emit window is four batches).
	maxFreeChunks = 8
	// freeTrims is how many trims in a row (about a second apart) must find no reuse before
	// the free chunks go: a burst that follows a few quiet seconds (connections opened, then
	// expiring together) still finds them.
	freeTrims = 10
)

type chunk struct {
	evs  []flow.Event
	born time.Time
}

func newQueue(size, max int) *queue {
	return &queue{size: size, max: max, ready: make(chan struct{}, 1)}
}

// push appends e, or reports false when the queue is full.
func (q *queue) push(e *flow.Event) bool {
	q.mu.Lock()
	if q.n >= q.max {
		q.mu.Unlock()
		return false
	}
	last := len(q.chunks) - 1
	if last < 0 || len(q.chunks[last].evs) >= q.size { // >=: batch_size may have shrunk
		q.chunks = append(q.chunks, chunk{evs: q.newChunk(), born: time.Now()})
		last++
	}
	q.chunks[last].evs = append(q.chunks[last].evs, *e)
	q.n++
	signal := q.n == 1 || len(q.chunks[last].evs) >= q.size
	q.mu.Unlock()
	if signal {
		select {
		case q.ready <- struct{}{}:
		default:
		}
	}
	return true
}

// newChunk is an empty chunk, reused if one is free; q.mu is held.
func (q *queue) newChunk() []flow.Event {
	if n := len(q.free); n > 0 {
		c := q.free[n-1]
		q.free[n-1] = nil
		q.free = q.free[:n-1]
		q.freeUsed = true
		return c[:0]
	}
	return make([]flow.Event, 0, q.size)
}

// recycle takes back the events of a batch once the pipeline has acknowledged it.
func (q *queue) recycle(evs []flow.Event) {
	q.mu.Lock()
	if cap(evs) == q.size && len(q.free) < maxFreeChunks {
		q.free = append(q.free, evs[:0])
	}
	q.mu.Unlock()
}

// trim lets the free chunks go once freeTrims trims in a row found none reused (the reader
// calls it about once a second): a quiet source does not keep a burst's memory.
func (q *queue) trim() {
	q.mu.Lock()
	if q.freeUsed {
		q.freeQuiet = 0
	} else if q.freeQuiet++; q.freeQuiet >= freeTrims {
		clear(q.free)
		q.free = q.free[:0]
	}
	q.freeUsed = false
	q.mu.Unlock()
}

// batch makes the batch of a popped chunk; its acknowledgement gives the chunk back.
func (q *queue) batch(evs []flow.Event) *flow.Batch {
	return flow.NewBatch(evs, func(error) { q.recycle(evs) })
}

// pop removes the first chunk when it is full, when it is older than linger, or when force
// is set. Otherwise it returns nil and how long until the first chunk is due (0: empty).
func (q *queue) pop(linger time.Duration, force bool) ([]flow.Event, time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.chunks) == 0 {
		return nil, 0
	}
	c := q.chunks[0]
	if !force && len(c.evs) < q.size {
		if wait := linger - time.Since(c.born); wait > 0 {
			return nil, wait
		}
	}
	q.chunks[0] = chunk{}
	q.chunks = q.chunks[1:]
	q.n -= len(c.evs)
	return c.evs, 0
}

// len is the number of events queued.
func (q *queue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.n
}

// reshape changes the batch size and the bound (Reconfigure); chunks already queued keep
// their size, and what is queued beyond a lower bound stays.
func (q *queue) reshape(size, max int) {
	q.mu.Lock()
	q.size, q.max = size, max
	q.mu.Unlock()
	select {
	case q.ready <- struct{}{}: // the emitter reconsiders what is due
	default:
	}
}
