// Package logcodec is how a batch of flow events is written to a distributed log (NATS
// JetStream, Kafka) and read back: the three message formats, the content type that names
// each, splitting a batch into messages under a size limit, and the message ID that lets the
// log recognise a resend.
//
// Formats (docs/scale-out.md has the schemas):
//
//	packed    application/vnd.flowpipe.packed: a uvarint event count, then internal/codec's
//	          encoding of those events. Every field of flow.Event; the fastest.
//	json      application/x-ndjson: one line per event, the JSON form of docs/schema.md.
//	protobuf  application/x-protobuf; proto=flow.FlowEvent; delimited=varint: each event a
//	          FlowEvent of proto/flow preceded by its length as a uvarint (the framing of
//	          Java's writeDelimitedTo and Go's protodelim). Fields that FlowEvent has no place
//	          for (start, end, community ID, source name, reconstructed) are not carried.
package logcodec

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
	"github.com/flowpipe/flowpipe/internal/flowwire"
)

// Format is a message format.
type Format string

const (
	Packed   Format = "packed"
	JSON     Format = "json"
	Protobuf Format = "protobuf"
)

// Formats lists the formats, for option help.
var Formats = []Format{Packed, JSON, Protobuf}

// Valid reports whether f is a known format.
func (f Format) Valid() bool { return f == Packed || f == JSON || f == Protobuf }

// ContentType is the content type that names f in a message header.
func (f Format) ContentType() string {
	switch f {
	case Packed:
		return "application/vnd.flowpipe.packed"
	case JSON:
		return "application/x-ndjson"
	case Protobuf:
		return "application/x-protobuf; proto=flow.FlowEvent; delimited=varint"
	}
	return ""
}

// FormatOf is the format a content type names; ok is false for an unknown one.
func FormatOf(contentType string) (f Format, ok bool) {
	mt, _, _ := strings.Cut(contentType, ";")
	switch strings.TrimSpace(strings.ToLower(mt)) {
	case "application/vnd.flowpipe.packed":
		return Packed, true
	case "application/x-ndjson", "application/jsonl", "application/json-lines":
		return JSON, true
	case "application/x-protobuf", "application/protobuf":
		return Protobuf, true
	}
	return "", false
}

// Header is the name of the content-type header.
const Header = "Content-Type"

// Chunk is one message of a batch: its payload and the events it carries.
type Chunk struct {
	Payload []byte
	Events  []flow.Event // a sub-slice of the batch
}

// Split encodes events as messages of format f, each at most max bytes, in order. The same
// events always make the same messages, so that a resent batch has the same message IDs.
func Split(f Format, events []flow.Event, max int) ([]Chunk, error) {
	var out []Chunk
	switch f {
	case Packed:
		// internal/codec has an upper bound per event: cut on it, then encode each chunk.
		start, size := 0, 1+binary.MaxVarintLen64
		for i := range events {
			n := codec.EventSize(&events[i])
			if 1+binary.MaxVarintLen64+n > max {
				return nil, fmt.Errorf("event %s needs up to %d bytes, over the message limit of %d", events[i].EventID, n, max)
			}
			if size+n > max {
				out = append(out, packChunk(events[start:i]))
				start, size = i, 1+binary.MaxVarintLen64
			}
			size += n
		}
		if start < len(events) {
			out = append(out, packChunk(events[start:]))
		}
		return out, nil
	case JSON, Protobuf:
		var enc flow.Encoder
		var buf []byte
		start := 0
		var one, ev []byte
		for i := range events {
			one = one[:0]
			if f == JSON {
				one = append(enc.AppendJSON(one, &events[i]), '\n')
			} else {
				ev = flowwire.AppendEvent(ev[:0], &events[i], nil)
				one = append(binary.AppendUvarint(one, uint64(len(ev))), ev...)
			}
			if len(one) > max {
				return nil, fmt.Errorf("event %s takes %d bytes, over the message limit of %d", events[i].EventID, len(one), max)
			}
			if len(buf)+len(one) > max {
				out = append(out, Chunk{Payload: buf, Events: events[start:i]})
				buf, start = nil, i
			}
			buf = append(buf, one...)
		}
		if start < len(events) {
			out = append(out, Chunk{Payload: buf, Events: events[start:]})
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown format %q", f)
}

func packChunk(events []flow.Event) Chunk {
	p := binary.AppendUvarint(make([]byte, 0, codec.Size(events)+binary.MaxVarintLen64), uint64(len(events)))
	return Chunk{Payload: codec.Append(p, events), Events: events}
}

// Encode is Split without a limit: one payload for every event.
func Encode(f Format, events []flow.Event) ([]byte, error) {
	cs, err := Split(f, events, int(^uint(0)>>1))
	if err != nil || len(cs) == 0 {
		if err == nil && f == Packed {
			return packChunk(nil).Payload, nil
		}
		return nil, err
	}
	return cs[0].Payload, nil
}

// ErrEmpty is the error of an empty message.
var ErrEmpty = errors.New("empty message")

// Decode appends the events of a message of format f to dst. An error means the message is
// not a whole batch of that format (wrong format, truncated, corrupt); nothing is appended.
func Decode(f Format, dst []flow.Event, payload []byte) ([]flow.Event, error) {
	if len(payload) == 0 {
		return dst, ErrEmpty
	}
	start := len(dst)
	switch f {
	case Packed:
		n, k := binary.Uvarint(payload)
		if k <= 0 || n > uint64(len(payload)) {
			return dst, errors.New("packed: bad event count")
		}
		out, err := codec.Decode(dst, payload[k:], int(n))
		if err != nil {
			return dst[:start], fmt.Errorf("packed: %w", err)
		}
		return out, nil
	case JSON:
		for line := 1; len(payload) > 0; line++ {
			l, rest, found := bytes.Cut(payload, []byte{'\n'})
			if !found {
				return dst[:start], fmt.Errorf("json: line %d has no newline (truncated message?)", line)
			}
			payload = rest
			dst = append(dst, flow.Event{})
			if err := flow.ParseJSON(l, &dst[len(dst)-1]); err != nil {
				return dst[:start], fmt.Errorf("json: line %d: %w", line, err)
			}
		}
		return dst, nil
	case Protobuf:
		var m flowwire.Message
		for i := 0; len(payload) > 0; i++ {
			n, k := binary.Uvarint(payload)
			if k <= 0 || n > uint64(len(payload)-k) {
				return dst[:start], fmt.Errorf("protobuf: event %d: bad or truncated length", i)
			}
			if err := flowwire.DecodeEvent(payload[k:k+int(n)], &m); err != nil {
				return dst[:start], fmt.Errorf("protobuf: event %d: %w", i, err)
			}
			if m.Initiator {
				return dst[:start], fmt.Errorf("protobuf: event %d: an initiator message, not an event", i)
			}
			dst = append(dst, m.Event)
			payload = payload[k+int(n):]
		}
		return dst, nil
	}
	return dst, fmt.Errorf("unknown format %q", f)
}

// MsgID identifies a message by the IDs of the events it carries (a SHA-256 of them, in
// hex, 32 characters): the same events make the same ID, so the log can drop a resend.
func MsgID(events []flow.Event) string {
	h := sha256.New()
	for i := range events {
		h.Write(events[i].EventID[:])
	}
	var sum [sha256.Size]byte
	return hex.EncodeToString(h.Sum(sum[:0])[:16])
}
