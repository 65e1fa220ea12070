package flow

import (
	"errors"
	"fmt"
	"sync"
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
//
// A batch made by NewEncodedBatch holds only its encoding and its count until something
// needs the events: Events is nil until Decode. Components never see such a batch undecoded:
// the runtime decodes it before any enricher, tap subscriber or sink, except a sink that takes
// encoded batches (component.EncodedWriter: a sink plugin, which is sent the encoding as it
// is) and the disk queue, which stores the same encoding. Len is right in both states.
type Batch struct {
	Events []Event

	refs   atomic.Int32
	err    atomic.Pointer[error]
	ack    func(error)
	acked  atomic.Bool
	Source string // name of the source component that produced the batch

	// encoded is Events already encoded by whoever built the batch from an encoding, and
	// encodedN the number of events it holds (SetEncoded, NewEncodedBatch).
	encoded  []byte
	encodedN int

	// lazy is set, once, by NewEncodedBatch: Events are decoded from encoded on first need.
	lazy *lazyEvents
}

// lazyEvents is the decoding of a batch made by NewEncodedBatch: once, whoever asks first,
// while other sinks may ask at the same time.
type lazyEvents struct {
	decode  Decoder
	sourced bool // every event names its source
	once    sync.Once
	done    atomic.Bool // decoded (Events set) or failed (err set)
	err     error

	copyOnce sync.Once
	copy     Encoding
}

// Decoder appends to dst the n events encoded in data, or fails when data is not exactly n
// valid events (the plugin host's packed codec, which core/flow does not import).
type Decoder func(dst []Event, data []byte, n int) ([]Event, error)

// Encoding is a batch's events, still encoded: N events in Data, and how to decode them.
type Encoding struct {
	Data   []byte
	N      int
	Decode Decoder
}

// Events decodes the encoding.
func (e Encoding) Events() ([]Event, error) { return e.Decode(nil, e.Data, e.N) }

// NewEncodedBatch makes a batch of the n events encoded in data, which are decoded (by
// decode) only when something needs them (Decode): a batch that only passes through, from a
// source plugin to sink plugins or to a disk queue, is never decoded. data must be valid
// (its producer checked it): a batch whose decoding fails is refused by the sinks that need
// its events, as a malformed batch (flow.Permanent). sourced says that every event names its
// source, so that StampSource need not decode to look. data must stay unchanged until the
// batch is acknowledged (the ack may recycle it). The batch holds one reference, as from
// NewBatch. The pipeline runtime takes such batches (component.EncodedEmitter); the other
// Emitters of this module (a source plugin's, the test collectors) decode them first.
func NewEncodedBatch(data []byte, n int, sourced bool, decode Decoder, ack func(err error)) *Batch {
	b := &Batch{ack: ack, encoded: data, encodedN: n, lazy: &lazyEvents{decode: decode, sourced: sourced}}
	b.refs.Store(1)
	return b
}

// Undecoded reports whether the batch holds only its encoding so far (NewEncodedBatch, and
// Decode not called yet): its Events are nil, and Len is its count.
func (b *Batch) Undecoded() bool { return b.lazy != nil && !b.lazy.done.Load() }

// Decode makes Events hold the batch's events, decoding them if the batch was made by
// NewEncodedBatch and nothing decoded it yet; for any other batch it does nothing. It is
// safe to call from several goroutines at once (the sinks of one batch): the events are
// decoded once, and every caller returns after that. An error means the encoding is not
// valid: Events stays nil, and every later call returns the same error.
func (b *Batch) Decode() error {
	l := b.lazy
	if l == nil {
		return nil
	}
	if l.done.Load() {
		return l.err
	}
	l.once.Do(func() {
		evs, err := l.decode(nil, b.encoded, b.encodedN)
		if err != nil {
			l.err = fmt.Errorf("malformed batch of %d events: %w", b.encodedN, err)
		} else {
			b.Events = evs
		}
		l.done.Store(true)
	})
	return l.err
}

// EncodingCopy returns the undecoded batch's encoding in memory of its own, copied once
// however often it is asked for (a tap point's ring keeps it past the batch's ack, which may
// recycle the batch's). ok is false when the batch is not undecoded.
func (b *Batch) EncodingCopy() (_ Encoding, ok bool) {
	l := b.lazy
	if l == nil || l.done.Load() {
		return Encoding{}, false
	}
	l.copyOnce.Do(func() {
		l.copy = Encoding{Data: append([]byte(nil), b.encoded...), N: b.encodedN, Decode: l.decode}
	})
	return l.copy, true
}

// SetEncoded keeps data, the encoding (opaque here: the plugin host's packed codec) that the
// batch's events were just decoded from, so that the batch can be passed on to where that
// same encoding is wanted (a sink in another process) without encoding it again. It holds
// while the events do not change: the runtime drops it before enrichers run, StampSource
// drops it when it names an event, and Encoded checks that the number of events is the same.
// Set it before the batch is shared; anything else that changes Events must DropEncoded.
func (b *Batch) SetEncoded(data []byte) { b.encoded, b.encodedN = data, len(b.Events) }

// Encoded is the encoding of the batch's events kept by SetEncoded, or of an undecoded
// batch (NewEncodedBatch), or nil.
func (b *Batch) Encoded() []byte {
	if b.encoded == nil {
		return nil
	}
	if b.Undecoded() {
		return b.encoded
	}
	if b.lazy != nil && b.lazy.err != nil {
		return nil // a malformed encoding is not passed on
	}
	if len(b.Events) != b.encodedN {
		return nil
	}
	return b.encoded
}

// DropEncoded forgets the kept encoding: the events are about to change. The batch must be
// decoded (Decode) first: dropping the only form an undecoded batch has would lose its
// events, so DropEncoded panics instead.
func (b *Batch) DropEncoded() {
	if b.Undecoded() {
		panic("flow: DropEncoded on an undecoded batch (call Decode first)")
	}
	b.encoded = nil
}

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

// Len is the number of events in the batch, decoded or not.
func (b *Batch) Len() int {
	if l := b.lazy; l != nil && (!l.done.Load() || l.err != nil) {
		return b.encodedN
	}
	return len(b.Events)
}

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
// that sources need not. An undecoded batch whose events all name their source stays
// undecoded; one whose events may not is decoded to stamp them (and loses its encoding if an
// event was stamped).
func (b *Batch) StampSource(name string) {
	if b.Source == "" {
		b.Source = name
	}
	if b.lazy != nil {
		if b.Undecoded() && b.lazy.sourced {
			return
		}
		if b.Decode() != nil {
			return // no events to name: the sinks that need them refuse the batch
		}
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
