// Package streamwire is what the gRPC sink (sinks/grpc) and the gRPC receiver (sources/grpc)
// share about flowpipe's own batch stream, flowpipe.stream.v1.Collector/Stream
// (proto/stream): the Batch and BatchAck messages, encoded and decoded by hand so that a
// batch's events — already in the packed codec of internal/codec — are neither copied into a
// generated struct nor parsed twice. Decoding goes through flowwire.Codec, the codec both ends
// force on their gRPC connections, by the Unmarshal methods below. The encoding is tested
// against the generated code (proto/stream) in both directions and fuzzed.
package streamwire

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
)

// Field numbers of proto/stream/stream.proto.
const (
	fSeq    = 1
	fCount  = 2
	fEvents = 3

	ackSeq = 1
)

// BatchHeaderSize is an upper bound on AppendBatchHeader's output.
const BatchHeaderSize = 1 + 10 + 1 + 5 + 1 + 10

// AppendBatchHeader appends the fields of a Batch that come before its events bytes: a
// message is the header followed by exactly eventsLen bytes of packed events (codec.Version
// and then each event's codec.AppendEvent encoding). seq 0 with no events is the opening
// message (which encodes as nothing).
func AppendBatchHeader(dst []byte, seq uint64, count, eventsLen int) []byte {
	if seq != 0 {
		dst = protowire.AppendTag(dst, fSeq, protowire.VarintType)
		dst = protowire.AppendVarint(dst, seq)
	}
	if count != 0 {
		dst = protowire.AppendTag(dst, fCount, protowire.VarintType)
		dst = protowire.AppendVarint(dst, uint64(count))
	}
	if eventsLen != 0 {
		dst = protowire.AppendTag(dst, fEvents, protowire.BytesType)
		dst = protowire.AppendVarint(dst, uint64(eventsLen))
	}
	return dst
}

// AppendBatch appends a whole Batch message carrying events.
func AppendBatch(dst []byte, seq uint64, events []flow.Event) []byte {
	if len(events) == 0 {
		return AppendBatchHeader(dst, seq, 0, 0)
	}
	packed := codec.Append(nil, events)
	dst = AppendBatchHeader(dst, seq, len(events), len(packed))
	return append(dst, packed...)
}

// AppendAck appends a BatchAck for seq.
func AppendAck(dst []byte, seq uint64) []byte {
	if seq == 0 {
		return dst
	}
	dst = protowire.AppendTag(dst, ackSeq, protowire.VarintType)
	return protowire.AppendVarint(dst, seq)
}

// ErrMalformed wraps every error of decoding a Batch.
var ErrMalformed = errors.New("malformed Batch")

// Batch is a received Batch message, decoded by flowwire.Codec into Events.
type Batch struct {
	Seq    uint64
	Events []flow.Event // the batch's events; reused by the next Unmarshal
	Size   int          // the message's size on the wire
	// Invalid is set instead of failing Unmarshal (gRPC would turn an error into an opaque
	// status, and the receiver wants to say what was wrong and count it).
	Invalid error
}

// UnmarshalWire decodes b into m; the events are copied out of b (strings included), so b may
// be reused afterwards. It never fails: a malformed message sets m.Invalid.
func (m *Batch) UnmarshalWire(b []byte) error {
	m.Seq, m.Events, m.Size, m.Invalid = 0, m.Events[:0], len(b), nil
	var count uint64
	var events []byte
	haveEvents := false
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			m.Invalid = fmt.Errorf("%w: %v", ErrMalformed, protowire.ParseError(n))
			return nil
		}
		b = b[n:]
		switch {
		case num == fSeq && typ == protowire.VarintType:
			m.Seq, n = protowire.ConsumeVarint(b)
		case num == fCount && typ == protowire.VarintType:
			count, n = protowire.ConsumeVarint(b)
		case num == fEvents && typ == protowire.BytesType:
			events, n = protowire.ConsumeBytes(b)
			haveEvents = true
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			m.Invalid = fmt.Errorf("%w: field %d: %v", ErrMalformed, num, protowire.ParseError(n))
			return nil
		}
		b = b[n:]
	}
	switch {
	case count > 1<<31:
		m.Invalid = fmt.Errorf("%w: batch %d: count %d", ErrMalformed, m.Seq, count)
	case m.Seq == 0 && (count != 0 || haveEvents):
		m.Invalid = fmt.Errorf("%w: seq 0 is the opening message and carries no events", ErrMalformed)
	case count == 0 && len(events) > 0:
		m.Invalid = fmt.Errorf("%w: batch %d: events bytes but a count of 0", ErrMalformed, m.Seq)
	case count > 0:
		ev, err := codec.Decode(m.Events, events, int(count))
		if err != nil {
			m.Invalid = fmt.Errorf("%w: batch %d: %v", ErrMalformed, m.Seq, err)
			return nil
		}
		m.Events = ev
	}
	return nil
}

// Ack is a received BatchAck.
type Ack struct{ Seq uint64 }

// UnmarshalWire decodes a BatchAck.
func (a *Ack) UnmarshalWire(b []byte) error {
	a.Seq = 0
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("malformed BatchAck: %v", protowire.ParseError(n))
		}
		b = b[n:]
		if num == ackSeq && typ == protowire.VarintType {
			a.Seq, n = protowire.ConsumeVarint(b)
		} else {
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return fmt.Errorf("malformed BatchAck: field %d: %v", num, protowire.ParseError(n))
		}
		b = b[n:]
	}
	return nil
}
