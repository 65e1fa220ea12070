package flowwire

import (
	"fmt"
	"sync"

	"google.golang.org/grpc/encoding"
	protoenc "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
)

// Raw is a message that is already encoded (a FlowEvent from AppendEvent, a FlowEventAck from
// AppendAck): the codec sends its bytes as they are, so that encoding happens where the
// caller chooses (once per event, in the goroutine that has the batch) and a resend costs no
// encoding at all. gRPC writes the bytes to the connection after SendMsg returns: they must
// not change afterwards (give every message bytes of its own).
type Raw []byte

// Parts is a message already encoded in two pieces, sent one after the other without being
// joined: a header made for this send and a body shared by every send of the same content
// (a batch's events, sent again after a reconnect under a new header). Neither may change
// after SendMsg, as with Raw.
type Parts struct{ Head, Body []byte }

// AckMsg receives a decoded FlowEventAck.
type AckMsg struct {
	ID        [16]byte
	Initiator bool
}

// WireUnmarshaler is a message that decodes itself from its wire bytes (internal/streamwire's
// messages): the bytes are valid only during the call, so it copies what it keeps.
type WireUnmarshaler interface {
	UnmarshalWire(b []byte) error
}

// Codec is the gRPC codec of both ends. It is named "proto", so the content type on the wire
// stays application/grpc+proto and a NetBird peer sees nothing unusual; messages of other
// types (the generated structs) go through the standard protobuf codec.
type Codec struct{}

var protoCodec = encoding.GetCodecV2(protoenc.Name)

func (Codec) Name() string { return protoenc.Name }

func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	switch m := v.(type) {
	case Raw:
		// gRPC frees the buffer after writing it; a SliceBuffer's Free is a no-op, so the
		// caller's bytes are neither recycled nor copied.
		return mem.BufferSlice{mem.SliceBuffer(m)}, nil
	case *Raw:
		return mem.BufferSlice{mem.SliceBuffer(*m)}, nil
	case *Parts:
		return mem.BufferSlice{mem.SliceBuffer(m.Head), mem.SliceBuffer(m.Body)}, nil
	}
	return protoCodec.Marshal(v)
}

func (Codec) Unmarshal(data mem.BufferSlice, v any) error {
	switch m := v.(type) {
	case *Message:
		// A malformed event is reported in the message, not as an error: gRPC would turn an
		// error into an opaque Internal status, and the receiver wants to count it as what it is.
		if err := DecodeEvent(contiguous(data), m); err != nil {
			m.Invalid = err
		}
		m.Size = data.Len()
		return nil
	case *AckMsg:
		id, init, err := DecodeAck(contiguous(data))
		if err != nil {
			return err
		}
		m.ID, m.Initiator = id, init
		return nil
	case *Raw:
		*m = append((*m)[:0], contiguous(data)...)
		return nil
	case WireUnmarshaler:
		if len(data) == 1 {
			return m.UnmarshalWire(data[0].ReadOnlyData())
		}
		// A message of several transport frames (a batch of flowpipe's stream): joined in a
		// buffer of our own, reused, since UnmarshalWire keeps nothing of it.
		bp := joinPool.Get().(*[]byte)
		if cap(*bp) < data.Len() {
			*bp = make([]byte, data.Len())
		}
		b := (*bp)[:data.Len()]
		data.CopyTo(b)
		err := m.UnmarshalWire(b)
		joinPool.Put(bp)
		return err
	}
	if protoCodec == nil {
		return fmt.Errorf("flowwire: no protobuf codec registered for %T", v)
	}
	return protoCodec.Unmarshal(data, v)
}

var joinPool = sync.Pool{New: func() any { return new([]byte) }}

// contiguous returns the message bytes without copying when they are in one buffer, as they
// are for messages smaller than a transport frame. The result is valid until gRPC frees data,
// which is after Unmarshal returns: decoders copy what they keep.
func contiguous(data mem.BufferSlice) []byte {
	if len(data) == 1 {
		return data[0].ReadOnlyData()
	}
	return data.Materialize()
}
