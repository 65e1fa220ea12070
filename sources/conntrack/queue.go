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
type queue struct {
	mu     sync.Mutex
	chunks []chunk
	size   int // events per chunk (batch_size)
	n      int // events queued
	max    int
	ready  chan struct{} // a chunk filled, or the first event arrived
}

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
		q.chunks = append(q.chunks, chunk{evs: make([]flow.Event, 0, q.size), born: time.Now()})
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
