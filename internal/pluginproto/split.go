package pluginproto

import (
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
)

// SplitSize bounds the encoded events of one message, leaving room for the envelope under
// MaxMessageSize. It is a variable so that tests can make it small.
var SplitSize = 64 << 20

// EncodeBatch encodes as many of events as fit in SplitSize (all of them, unless the batch is
// huge; at least one) into a buffer from Buffers, as the Events of a Batch message; n says how
// many. A sender sends a batch as such parts, in order, each encoded as it goes: the events
// are walked once. The caller puts buf back once the message is sent (an Enrich answer's
// goes back when the codec has marshalled it).
func EncodeBatch(events []flow.Event, source string) (buf *[]byte, msg *Batch, n int) {
	return encodePart(events, source, SplitSize)
}

// EncodeAll is EncodeBatch without a limit: an Enrich answer is one message.
func EncodeAll(events []flow.Event, source string) (buf *[]byte, msg *Batch) {
	buf, msg, _ = encodePart(events, source, -1)
	return buf, msg
}

func encodePart(events []flow.Event, source string, limit int) (buf *[]byte, msg *Batch, n int) {
	size := 1 + len(events)*codec.MaxFixed
	if limit >= 0 {
		size = min(size, limit)
	}
	buf = Buffers.Get(size)
	*buf, n = codec.AppendPart((*buf)[:0], events, limit)
	return buf, &Batch{Count: uint32(n), Events: *buf, Source: source}, n
}
