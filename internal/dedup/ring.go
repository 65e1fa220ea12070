package dedup

// Ring is a FIFO of delivered IDs that grows up to the window's size and then wraps, so the
// steady state moves no memory.
type Ring struct {
	buf  []Rec
	head int // oldest
	n    int
}

// Push appends d; the ring grows up to limit records.
func (r *Ring) Push(d Rec, limit int) {
	if r.n == len(r.buf) {
		grown := make([]Rec, min(max(2*len(r.buf), 1024), limit))
		for i := range r.n {
			grown[i] = r.buf[(r.head+i)%len(r.buf)]
		}
		r.buf, r.head = grown, 0
	}
	r.buf[(r.head+r.n)%len(r.buf)] = d
	r.n++
}

// Oldest is the oldest record; the ring must not be empty.
func (r *Ring) Oldest() Rec { return r.buf[r.head] }

// Pop removes and returns the oldest record.
func (r *Ring) Pop() Rec {
	d := r.buf[r.head]
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	return d
}

// All returns the records oldest first.
func (r *Ring) All() []Rec {
	out := make([]Rec, r.n)
	for i := range r.n {
		out[i] = r.buf[(r.head+i)%len(r.buf)]
	}
	return out
}

// Len is the number of records.
func (r *Ring) Len() int { return r.n }
