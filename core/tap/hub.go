package tap

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Record is an event as a tap point saw it: a copy, and when it passed.
type Record struct {
	Seen  flow.Time
	Event flow.Event
}

// Hub is one tap point. The pipeline publishes every batch that passes the point; Publish
// never blocks on a subscriber and, when the ring is off and nobody subscribes, costs one
// atomic load.
type Hub struct {
	name, kind string
	active     atomic.Bool // ring enabled or subscribers present

	mu      sync.Mutex
	ring    []Record // a circular buffer of the last len(ring) events
	next    int      // where the next event goes
	full    bool
	subs    []*Sub
	removed bool // by Registry.Remove: no more subscribers

	// pending is what undecoded batches brought while nobody subscribed, for the ring: their
	// encodings, decoded into the ring only when it is read or a decoded batch follows
	// (PublishBatch). pendingN is their events; older ones that the newer fill the ring
	// without are forgotten.
	pending  []pendingEncoding
	pendingN int
}

type pendingEncoding struct {
	seen flow.Time
	enc  flow.Encoding
}

// ErrRemoved is what Sub.Next returns once its tap point's component was removed (by a
// reload) and the subscriber has taken what was buffered.
var ErrRemoved = errors.New("tap point removed")

// Name is the tap point's name (the component's name).
func (h *Hub) Name() string { return h.name }

// Kind is "source", "enricher" or "sink".
func (h *Hub) Kind() string { return h.kind }

// Publish offers events to the ring and to every subscriber. It copies what it keeps: the
// caller may reuse events when it returns.
func (h *Hub) Publish(events []flow.Event) {
	if !h.active.Load() || len(events) == 0 {
		return
	}
	now := flow.Now()
	h.mu.Lock()
	h.trimLocked(len(events))
	h.flushLocked()
	h.ringLocked(now, events)
	for _, s := range h.subs {
		s.offer(now, events)
	}
	h.mu.Unlock()
}

// PublishBatch is Publish of b's events. A batch still encoded (flow.Batch.Undecoded) is
// decoded only for a subscriber: for the ring alone, its encoding is kept, and decoded only
// when the ring is read (Last, a subscription's backlog), so that batches passing through
// with nobody watching are never decoded. A malformed encoding shows nothing: the sinks
// that need its events refuse the batch, counted.
func (h *Hub) PublishBatch(b *flow.Batch) {
	if !h.active.Load() || b.Len() == 0 {
		return
	}
	if b.Undecoded() {
		h.mu.Lock()
		if len(h.subs) == 0 && len(h.ring) > 0 {
			if enc, ok := b.EncodingCopy(); ok {
				h.keepLocked(flow.Now(), enc)
				h.mu.Unlock()
				return
			}
		}
		h.mu.Unlock()
		if b.Decode() != nil {
			return
		}
	}
	h.Publish(b.Events)
}

// keepLocked keeps an encoding for the ring.
func (h *Hub) keepLocked(seen flow.Time, enc flow.Encoding) {
	h.pending = append(h.pending, pendingEncoding{seen: seen, enc: enc})
	h.pendingN += enc.N
	h.trimLocked(0)
}

// trimLocked forgets the oldest kept encodings that the newer ones, and newer events about
// to go into the ring, fill the ring without: they would never be seen, so they are never
// decoded.
func (h *Hub) trimLocked(newer int) {
	for len(h.pending) > 0 && h.pendingN-h.pending[0].enc.N+newer >= len(h.ring) {
		h.pendingN -= h.pending[0].enc.N
		h.pending[0] = pendingEncoding{}
		h.pending = h.pending[1:]
	}
}

// flushLocked decodes the kept encodings into the ring, oldest first.
func (h *Hub) flushLocked() {
	for i, p := range h.pending {
		if evs, err := p.enc.Events(); err == nil {
			h.ringLocked(p.seen, evs)
		}
		h.pending[i] = pendingEncoding{}
	}
	h.pending, h.pendingN = h.pending[:0], 0
}

// ringLocked puts the last of events into the ring.
func (h *Hub) ringLocked(now flow.Time, events []flow.Event) {
	n := len(h.ring)
	if n == 0 {
		return
	}
	tail := events
	if len(tail) > n {
		tail = tail[len(tail)-n:]
	}
	for i := range tail {
		h.ring[h.next] = Record{Seen: now, Event: tail[i]}
		h.next++
		if h.next == n {
			h.next, h.full = 0, true
		}
	}
}

// last returns the ring's records matching f and seen at or after since, oldest first, at
// most n (0: all). h.mu must be held.
func (h *Hub) last(f *Filter, since flow.Time, n int) []Record {
	h.flushLocked()
	var out []Record
	walk := func(rs []Record) {
		for i := range rs {
			if rs[i].Seen >= since && f.Match(&rs[i].Event) {
				out = append(out, rs[i])
			}
		}
	}
	if h.full {
		walk(h.ring[h.next:])
	}
	walk(h.ring[:h.next])
	if n > 0 && len(out) > n {
		out = out[len(out)-n:]
	}
	return out
}

// Last returns the ring's records matching f, seen at or after since, the newest n (0: all).
func (h *Hub) Last(f *Filter, since flow.Time, n int) []Record {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.last(f, since, n)
}

// Subscribe starts a subscription to the events matching f, with room for buffer events
// that the subscriber has not taken yet (more are skipped and counted). With backlog, the
// ring's matching records (as Last with since and n) are returned too, with no gap and no
// overlap between them and what the subscription receives.
func (h *Hub) Subscribe(f *Filter, buffer int, backlog bool, since flow.Time, n int) (*Sub, []Record) {
	if buffer < 1 {
		buffer = 1
	}
	s := &Sub{hub: h, filter: f, max: buffer, notify: make(chan struct{}, 1)}
	h.mu.Lock()
	defer h.mu.Unlock()
	var recs []Record
	if backlog {
		recs = h.last(f, since, n)
	}
	if h.removed {
		s.removed = true
		return s, recs
	}
	h.subs = append(h.subs, s)
	h.active.Store(true)
	return s, recs
}

func (h *Hub) unsubscribe(s *Sub) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.subs = slices.DeleteFunc(h.subs, func(x *Sub) bool { return x == s })
	h.active.Store(!h.removed && (len(h.ring) > 0 || len(h.subs) > 0))
}

// Subscribers is the number of current subscriptions.
func (h *Hub) Subscribers() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.subs)
}

// Sub is one subscription to a hub.
type Sub struct {
	hub    *Hub
	filter *Filter
	max    int
	notify chan struct{}

	mu      sync.Mutex
	buf     []Record
	spare   []Record
	skipped uint64
	closed  bool
	removed bool // the hub's component is gone: Next ends once buf is taken
}

// offer is called with the hub's lock held; it never blocks.
func (s *Sub) offer(now flow.Time, events []flow.Event) {
	s.mu.Lock()
	added := false
	for i := range events {
		if !s.filter.Match(&events[i]) {
			continue
		}
		if len(s.buf) >= s.max {
			s.skipped++
			continue
		}
		s.buf = append(s.buf, Record{Seen: now, Event: events[i]})
		added = true
	}
	skipped := s.skipped > 0
	s.mu.Unlock()
	if added || skipped {
		select {
		case s.notify <- struct{}{}:
		default:
		}
	}
}

// Next waits for records and returns them with the number of matching events skipped since
// the last call because the buffer was full. The returned slice is valid until the next
// call. It returns ctx's error when ctx ends, and ErrRemoved once the tap point was removed
// and everything buffered was taken.
func (s *Sub) Next(ctx context.Context) ([]Record, uint64, error) {
	for {
		s.mu.Lock()
		if len(s.buf) > 0 || s.skipped > 0 {
			recs, skipped := s.buf, s.skipped
			s.buf, s.spare, s.skipped = s.spare[:0], recs, 0
			s.mu.Unlock()
			return recs, skipped, nil
		}
		removed := s.removed
		s.mu.Unlock()
		if removed {
			return nil, 0, ErrRemoved
		}
		select {
		case <-s.notify:
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
	}
}

// Close ends the subscription.
func (s *Sub) Close() {
	s.mu.Lock()
	closed := s.closed
	s.closed = true
	s.mu.Unlock()
	if !closed {
		s.hub.unsubscribe(s)
	}
}

// Registry is the tap points of a pipeline, by name. It outlives one pipeline: a reloaded
// pipeline takes the hubs of the components it keeps, so their subscribers go on.
type Registry struct {
	ring int

	mu   sync.Mutex
	hubs map[string]*Hub
}

// Fanout is the name of the tap point where batches are handed to the sinks (after the last
// enricher); it is the default of `flowpipe tap --at`. No component can have this name.
const Fanout = "(sinks)"

// NewRegistry makes a registry whose hubs each keep the last ring events (0: no ring).
func NewRegistry(ring int) *Registry {
	if ring < 0 {
		ring = 0
	}
	return &Registry{ring: ring, hubs: map[string]*Hub{}}
}

// Point returns the hub of a tap point, creating it. kind is "source", "enricher", "sink"
// or "fanout" (for Fanout).
func (r *Registry) Point(name, kind string) *Hub {
	r.mu.Lock()
	defer r.mu.Unlock()
	if h, ok := r.hubs[name]; ok {
		h.kind = kind
		return h
	}
	h := &Hub{name: name, kind: kind, ring: make([]Record, r.ring)}
	h.active.Store(r.ring > 0)
	r.hubs[name] = h
	return h
}

// Remove removes a tap point, whose component a reload removed: it is no longer listed nor
// found, and its subscribers end (Sub.Next returns ErrRemoved once they have taken what was
// buffered). A component added again under the name gets a new tap point.
func (r *Registry) Remove(name string) {
	r.mu.Lock()
	h, ok := r.hubs[name]
	delete(r.hubs, name)
	r.mu.Unlock()
	if !ok {
		return
	}
	h.mu.Lock()
	h.removed = true
	subs := h.subs
	h.subs = nil
	h.active.Store(false)
	h.mu.Unlock()
	for _, s := range subs {
		s.mu.Lock()
		s.removed = true
		s.mu.Unlock()
		select {
		case s.notify <- struct{}{}:
		default:
		}
	}
}

// Lookup returns the hub of a tap point.
func (r *Registry) Lookup(name string) (*Hub, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	h, ok := r.hubs[name]
	return h, ok
}

// Names lists the tap points, sorted.
func (r *Registry) Names() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, 0, len(r.hubs))
	for n := range r.hubs {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// RingSize is how many events each hub's ring keeps.
func (r *Registry) RingSize() int { return r.ring }
