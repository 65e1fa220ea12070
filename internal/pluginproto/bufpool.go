package pluginproto

import (
	"fmt"
	"math/bits"
	"sync"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// noZeroPool is the one buffer pool of the plugin connection, on both sides: gRPC's, the
// codec's, and the buffers batches are encoded into. It is the gRPC buffer pool on both sides of the plugin connection. gRPC's default
// pool zeroes every buffer it hands out, which for batches of hundreds of kilobytes was the
// largest single cost of a plugin call; gRPC fills the buffers it asks for before reading
// them, and both ends of this connection are flowpipe's own, so the zeroing buys nothing.
type noZeroPool struct {
	tiers [29]sync.Pool // 1<<tier bytes; tiers below minTier are not pooled
}

const minTier = 12 // 4 KiB

// Buffers is the pool; Get a buffer of a size, Put it back when done.
var Buffers = &noZeroPool{}

func tierOf(size int) int {
	if size <= 1<<minTier {
		return minTier
	}
	return bits.Len(uint(size - 1))
}

func (p *noZeroPool) Get(size int) *[]byte {
	t := tierOf(size)
	if t >= len(p.tiers) {
		b := make([]byte, size)
		return &b
	}
	if b, ok := p.tiers[t].Get().(*[]byte); ok {
		*b = (*b)[:size]
		return b
	}
	b := make([]byte, size, 1<<t)
	return &b
}

func (p *noZeroPool) Put(b *[]byte) {
	c := cap(*b)
	t := bits.Len(uint(c)) - 1
	if c != 1<<t || t < minTier || t >= len(p.tiers) {
		return // not one of ours
	}
	p.tiers[t].Put(b)
}

// Codec is gRPC's proto codec with buffers from Buffers (gRPC's own codec draws
// from its global, zeroing pool). It serves every service on the plugin connection,
// go-plugin's included; the wire format is plain protobuf.
type Codec struct{}

func (Codec) Name() string { return "proto" }

func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("marshal: %T is not a protobuf message", v)
	}
	size := proto.Size(m)
	buf := Buffers.Get(size)
	out, err := proto.MarshalOptions{}.MarshalAppend((*buf)[:0], m)
	if r, ok := v.(*EnrichResponse); ok && r.Batch != nil {
		// The plugin side encodes an Enrich answer's events into a buffer from Buffers
		// (EncodeBatch); once they are copied into the message, it goes back.
		events := r.Batch.Events
		r.Batch.Events = nil
		Buffers.Put(&events)
	}
	if err != nil {
		Buffers.Put(buf)
		return nil, err
	}
	*buf = out
	return mem.BufferSlice{mem.NewBuffer(buf, Buffers)}, nil
}

func (Codec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("unmarshal: %T is not a protobuf message", v)
	}
	if len(data) == 1 {
		return proto.Unmarshal(data[0].ReadOnlyData(), m)
	}
	buf := data.MaterializeToBuffer(Buffers)
	defer buf.Free()
	return proto.Unmarshal(buf.ReadOnlyData(), m)
}
