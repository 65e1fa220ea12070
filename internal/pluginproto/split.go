package pluginproto

import (
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
)

// SplitSize bounds the encoded events of one message, leaving room for the envelope under
// MaxMessageSize. It is a variable so that tests can make it small.
var SplitSize = 64 << 20

// SmallBatch events, strings aside, encode well under SplitSize/2 (EventSize without
// strings or zones is under 300 bytes). A variable for the same reason as SplitSize.
var SmallBatch = 50_000

// Split cuts events into parts whose encoding stays under SplitSize; both sides send a
// batch as its parts, in order.
func Split(events []flow.Event) [][]flow.Event {
	// Batches are almost always far below the limit: a bound that ignores strings, and a
	// check of the strings' total length only, avoid sizing event by event.
	if len(events) <= SmallBatch {
		strs := 0
		for i := range events {
			e := &events[i]
			strs += len(e.RuleID) + len(e.SrcResourceID) + len(e.DstResourceID) + len(e.CommunityID) + len(e.Source)
		}
		if strs < SplitSize/2 {
			return [][]flow.Event{events}
		}
	}
	var parts [][]flow.Event
	start, size := 0, 1
	for i := range events {
		n := codec.EventSize(&events[i])
		if size+n > SplitSize && i > start {
			parts = append(parts, events[start:i])
			start, size = i, 1
		}
		size += n
	}
	return append(parts, events[start:])
}

// EncodeBatch encodes events into a buffer from Buffers, as the Events of a Batch message.
// The caller puts buf back once the message is sent (an Enrich answer's goes back when the
// codec has marshalled it).
func EncodeBatch(events []flow.Event, source string) (buf *[]byte, msg *Batch) {
	buf = Buffers.Get(codec.Size(events))
	*buf = codec.Append((*buf)[:0], events)
	return buf, &Batch{Count: uint32(len(events)), Events: *buf, Source: source}
}
