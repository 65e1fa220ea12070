package flow

import (
	"errors"
	"sync/atomic"
)

// Batch is a group of events that moves through a pipeline as one unit, with the
// acknowledgement that reports to its producer when the pipeline is done with it.
//
// The producer (a source) creates a batch with NewBatch and gives up its reference by handing
// it to the pipeline. Every stage that keeps the batch beyond a call (a sink queue, an
// aggregating enricher) takes a reference with Retain and gives it back with Release. When the
// last reference is released the ack function runs exactly once, with nil when every stage
// released without error, else the first error reported.
//
// Sinks must treat Events as read-only: one batch is shared by every sink of a pipeline.
type Batch struct {
	Events []Event

	refs   atomic.Int32
	err    atomic.Pointer[error]
	ack    func(error)
	acked  atomic.Bool
	Source string // name of the source component that produced the batch

	// encoded is Events already encoded by whoever built the batch from an encoding, and
	// encodedN the number of events it holds (SetEncoded).
	encoded  []byte
	encodedN int
}

// SetEncoded keeps data, the encoding (opaque here: the plugin host's packed codec) that the
// batch's events were just decoded from, so that the batch can be passed on to where that
// same encoding is wanted (a sink in another process) without encoding it again. It holds
// while the events do not change: the runtime drops it before enrichers run, StampSource
// drops it when it names an event, and Encoded checks that the number of events is the same.
// Set it before the batch is shared; anything else that changes Events must DropEncoded.
func (b *Batch) SetEncoded(data []byte) { b.encoded, b.encodedN = data, len(b.Events) }

// Encoded is the encoding kept by SetEncoded, or nil.
func (b *Batch) Encoded() []byte {
	if b.encoded == nil || len(b.Events) != b.encodedN {
		return nil
	}
	return b.encoded
}

// DropEncoded forgets the kept encoding: the events are about to change.
func (b *Batch) DropEncoded() { b.encoded = nil }

// NewBatch makes a batch holding one reference, which belongs to the caller and is given up
// by Release (the pipeline's Emit does that for sources). ack may be nil.
func NewBatch(events []Event, ack func(err error)) *Batch {
	b := &Batch{Events: events, ack: ack}
	b.refs.Store(1)
	return b
}

// Observe chains fn before the batch's ack function: fn sees the result first. The runtime
// uses it to measure acknowledgement latency; call it before handing the batch on.
func (b *Batch) Observe(fn func(err error)) {
	next := b.ack
	b.ack = func(err error) {
		fn(err)
		if next != nil {
			next(err)
		}
	}
}

// Len is the number of events in the batch.
func (b *Batch) Len() int { return len(b.Events) }

// Retain takes a reference: the batch will not be acknowledged before a matching Release.
func (b *Batch) Retain() {
	if b.refs.Add(1) <= 1 {
		panic("flow: Retain on a batch that was already acknowledged")
	}
}

// Release gives back one reference; err, if not nil, is what this holder reports (a failed
// delivery, a drop). The last Release runs the ack function.
func (b *Batch) Release(err error) {
	if err != nil {
		b.err.CompareAndSwap(nil, &err)
	}
	n := b.refs.Add(-1)
	if n > 0 {
		return
	}
	if n < 0 || !b.acked.CompareAndSwap(false, true) {
		panic("flow: batch released more often than retained")
	}
	if b.ack != nil {
		b.ack(b.Err())
	}
}

// Err is the first error any holder released the batch with so far.
func (b *Batch) Err() error {
	if p := b.err.Load(); p != nil {
		return *p
	}
	return nil
}

// StampSource names the source component of the batch and of each of its events that does
// not name one yet. The runtime stamps every batch a source emits, in process and out, so
// that sources need not.
func (b *Batch) StampSource(name string) {
	if b.Source == "" {
		b.Source = name
	}
	for i := range b.Events {
		if b.Events[i].Source == "" {
			b.Events[i].Source = name
			b.encoded = nil
		}
	}
}

// Acked reports whether the batch has been acknowledged.
func (b *Batch) Acked() bool { return b.acked.Load() }

// ErrShutdown is the acknowledgement of a batch the pipeline stopped before it was delivered
// to every sink. A source that can redeliver (an upstream that resends) must not treat it as
// delivered.
var ErrShutdown = errors.New("pipeline stopped before the batch was delivered")

// DropError is the acknowledgement of a batch that a sink's queue policy or retry limit
// dropped. The drop is counted in metrics with the same reason; a source may treat it as
// final (the user chose to drop rather than block).
type DropError struct {
	Component string // the sink that dropped
	Reason    string // e.g. "queue_full", "retries_exhausted", "rejected"
	Message   string // for "rejected": what the sink said
}

func (e *DropError) Error() string {
	s := "dropped by sink " + e.Component + ": " + e.Reason
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// FatalError is a sink's error that no retry can cure and that makes the sink useless: the
// standard output it writes to was closed by its reader, say. The runtime does not retry;
// it stops the pipeline, as a Unix tool stops when its output goes away, and counts what
// was not delivered. Wrap with Fatal; test with IsFatal. It crosses the plugin boundary.
type FatalError struct{ Err error }

func (e *FatalError) Error() string { return e.Err.Error() }
func (e *FatalError) Unwrap() error { return e.Err }

// Fatal marks err as fatal for the component that returns it (nil stays nil).
func Fatal(err error) error {
	if err == nil {
		return nil
	}
	return &FatalError{Err: err}
}

// IsFatal reports whether err is, or wraps, a FatalError.
func IsFatal(err error) bool {
	var f *FatalError
	return errors.As(err, &f)
}

// IsDrop reports whether err (an acknowledgement) is a counted drop.
func IsDrop(err error) bool {
	var d *DropError
	return errors.As(err, &d)
}
