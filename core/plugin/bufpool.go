package plugin

import (
	"fmt"
	"math/bits"
	"sync"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// noZeroPool is the gRPC buffer pool on both sides of the plugin connection. gRPC's default
// pool zeroes every buffer it hands out, which for batches of hundreds of kilobytes was the
// largest single cost of a plugin call; gRPC fills the buffers it asks for before reading
// them, and both ends of this connection are flowpipe's own, so the zeroing buys nothing.
type noZeroPool struct {
	tiers [29]sync.Pool // 1<<tier bytes; tiers below minTier are not pooled
}

const minTier = 12 // 4 KiB

var bufferPool = &noZeroPool{}

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

// pooledAnswers maps an Enrich answer to the pooled buffer its events are in, to be put back
// once the answer is marshalled.
var pooledAnswers sync.Map

// protoCodec is gRPC's proto codec with buffers from bufferPool (gRPC's own codec draws
// from its global, zeroing pool). It serves every service on the plugin connection,
// go-plugin's included; the wire format is plain protobuf.
type protoCodec struct{}

func (protoCodec) Name() string { return "proto" }

func (protoCodec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("marshal: %T is not a protobuf message", v)
	}
	size := proto.Size(m)
	buf := bufferPool.Get(size)
	out, err := proto.MarshalOptions{}.MarshalAppend((*buf)[:0], m)
	if pooled, ok := pooledAnswers.LoadAndDelete(v); ok {
		bufferPool.Put(pooled.(*[]byte))
	}
	if err != nil {
		bufferPool.Put(buf)
		return nil, err
	}
	*buf = out
	return mem.BufferSlice{mem.NewBuffer(buf, bufferPool)}, nil
}

func (protoCodec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("unmarshal: %T is not a protobuf message", v)
	}
	if len(data) == 1 {
		return proto.Unmarshal(data[0].ReadOnlyData(), m)
	}
	buf := data.MaterializeToBuffer(bufferPool)
	defer buf.Free()
	return proto.Unmarshal(buf.ReadOnlyData(), m)
}
