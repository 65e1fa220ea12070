package codec

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/flow"
)

// The changes encoding is an enricher's answer as what it changed in the batch it was sent,
// for a receiver that still holds that batch (the plugin host). Most enrichers set one or
// two fields of each event (a community ID, a rule ID, resource IDs) and some drop events
// (filters): the answer then costs a few bytes per event instead of the whole batch, and
// the receiver decodes nothing it already has.
//
// Layout: a version byte (ChangesVersion), uvarint sent (the events of the request),
// uvarint kept (the events of the answer), then for each event of the answer, in order:
//
//	skip                              uvarint: request events dropped before this one
//	mask                              uvarint: which fields differ from the request event
//	                                  (bits below: the strings, then the other fields in
//	                                  the order of flow.Event)
//	the new value of each field in mask, in bit order: strings uvarint length + bytes
//	(length 0: the field is cleared); event and flow IDs 16 bytes; times
//	8 bytes (little endian); addresses as in a batch (tag + bytes, zone); ports 2 bytes;
//	type, direction, protocol, ICMP type and code, reconstructed (0 or 1) 1 byte;
//	counters uvarint
//
// The request events after the last one kept are dropped. An answer that is not a subset
// with more events than the request (an enricher that adds events, such as an aggregate)
// cannot be put as changes: it goes as a whole batch (AppendChanges says so).

// ChangesVersion is the first byte of a changes encoding; it is not a batch Version, so
// that one is never taken for the other.
const ChangesVersion = 0xC1

// Bits of a change's mask. What enrichers set comes first (the strings), so that the mask
// of a typical change is a one-byte varint.
const (
	chRuleID = 1 << iota
	chSrcResourceID
	chDstResourceID
	chCommunityID
	chSource
	chEventID
	chFlowID
	chTimestamp
	chStart
	chEnd
	chSrcAddr
	chDstAddr
	chSrcPort
	chDstPort
	chType
	chDirection
	chProtocol
	chICMPType
	chICMPCode
	chReconstructed
	chRxPackets
	chRxBytes
	chTxPackets
	chTxBytes
	chWindowStart
	chWindowEnd
	chNumStarts
	chNumEnds
	chNumDrops
	chAll = chNumDrops<<1 - 1
)

// ChangesSize is an upper bound on the changes encoding of an answer of got events.
func ChangesSize(got []flow.Event) int {
	n := 1 + 2*binary.MaxVarintLen64
	for i := range got {
		n += EventSize(&got[i]) + changeOverhead
	}
	return n
}

// changeOverhead bounds what a change costs beyond EventSize: its skip and mask, against
// the present field and fixed-size ports and numbers of a batch.
const changeOverhead = 16

// AppendChanges appends to dst the changes that turn sent (the events of a request) into
// got (the events an enricher made of them). ok is false when got has more events than
// sent (an enricher that adds events, such as an aggregate): the answer must then be the
// whole batch, and dst is returned as it was.
func AppendChanges(dst []byte, sent, got []flow.Event) (_ []byte, ok bool) {
	if len(got) > len(sent) {
		return dst, false
	}
	dst = append(dst, ChangesVersion)
	dst = binary.AppendUvarint(dst, uint64(len(sent)))
	dst = binary.AppendUvarint(dst, uint64(len(got)))
	head := len(dst)
	if len(got) < len(sent) {
		// A filter keeps events in their order: the next request event with the same ID is
		// an answer event's origin. Any origin gives an exact answer (every field that
		// differs is sent); the right one gives the shortest.
		if out, ok := appendFiltered(dst, sent, got); ok {
			return out, true
		}
		dst = dst[:head]
	}
	// Event i answers request event i, and the request events after the last are dropped:
	// exact too, for an enricher that reorders or rewrites events.
	for j := range got {
		dst = append(dst, 0)
		dst = appendChange(dst, &sent[j], &got[j])
	}
	return dst, true
}

// appendFiltered matches each answer event with the next request event of its ID; ok is
// false when one has none.
func appendFiltered(dst []byte, sent, got []flow.Event) (_ []byte, ok bool) {
	i := 0
	for j := range got {
		g := &got[j]
		skip := 0
		for i+skip < len(sent) && sent[i+skip].EventID != g.EventID {
			skip++
		}
		// There must stay a request event for each answer event still to come.
		if len(sent)-(i+skip) < len(got)-j {
			return dst, false
		}
		i += skip
		dst = binary.AppendUvarint(dst, uint64(skip))
		dst = appendChange(dst, &sent[i], g)
		i++
	}
	return dst, true
}

func appendChange(dst []byte, s, g *flow.Event) []byte {
	var mask uint32
	if s.EventID != g.EventID {
		mask |= chEventID
	}
	if s.FlowID != g.FlowID {
		mask |= chFlowID
	}
	if s.Timestamp != g.Timestamp {
		mask |= chTimestamp
	}
	if s.Start != g.Start {
		mask |= chStart
	}
	if s.End != g.End {
		mask |= chEnd
	}
	if s.SrcAddr != g.SrcAddr {
		mask |= chSrcAddr
	}
	if s.DstAddr != g.DstAddr {
		mask |= chDstAddr
	}
	if s.SrcPort != g.SrcPort {
		mask |= chSrcPort
	}
	if s.DstPort != g.DstPort {
		mask |= chDstPort
	}
	if s.Type != g.Type {
		mask |= chType
	}
	if s.Direction != g.Direction {
		mask |= chDirection
	}
	if s.Protocol != g.Protocol {
		mask |= chProtocol
	}
	if s.ICMPType != g.ICMPType {
		mask |= chICMPType
	}
	if s.ICMPCode != g.ICMPCode {
		mask |= chICMPCode
	}
	if s.Reconstructed != g.Reconstructed {
		mask |= chReconstructed
	}
	if s.RxPackets != g.RxPackets {
		mask |= chRxPackets
	}
	if s.RxBytes != g.RxBytes {
		mask |= chRxBytes
	}
	if s.TxPackets != g.TxPackets {
		mask |= chTxPackets
	}
	if s.TxBytes != g.TxBytes {
		mask |= chTxBytes
	}
	if s.RuleID != g.RuleID {
		mask |= chRuleID
	}
	if s.SrcResourceID != g.SrcResourceID {
		mask |= chSrcResourceID
	}
	if s.DstResourceID != g.DstResourceID {
		mask |= chDstResourceID
	}
	if s.CommunityID != g.CommunityID {
		mask |= chCommunityID
	}
	if s.Source != g.Source {
		mask |= chSource
	}
	if s.WindowStart != g.WindowStart {
		mask |= chWindowStart
	}
	if s.WindowEnd != g.WindowEnd {
		mask |= chWindowEnd
	}
	if s.NumStarts != g.NumStarts {
		mask |= chNumStarts
	}
	if s.NumEnds != g.NumEnds {
		mask |= chNumEnds
	}
	if s.NumDrops != g.NumDrops {
		mask |= chNumDrops
	}
	dst = binary.AppendUvarint(dst, uint64(mask))
	if mask == 0 {
		return dst
	}
	if mask&chRuleID != 0 {
		dst = appendString(dst, g.RuleID)
	}
	if mask&chSrcResourceID != 0 {
		dst = appendString(dst, g.SrcResourceID)
	}
	if mask&chDstResourceID != 0 {
		dst = appendString(dst, g.DstResourceID)
	}
	if mask&chCommunityID != 0 {
		dst = appendString(dst, g.CommunityID)
	}
	if mask&chSource != 0 {
		dst = appendString(dst, g.Source)
	}
	if mask&chEventID != 0 {
		dst = append(dst, g.EventID[:]...)
	}
	if mask&chFlowID != 0 {
		dst = append(dst, g.FlowID[:]...)
	}
	if mask&chTimestamp != 0 {
		dst = binary.LittleEndian.AppendUint64(dst, uint64(g.Timestamp))
	}
	if mask&chStart != 0 {
		dst = binary.LittleEndian.AppendUint64(dst, uint64(g.Start))
	}
	if mask&chEnd != 0 {
		dst = binary.LittleEndian.AppendUint64(dst, uint64(g.End))
	}
	if mask&chSrcAddr != 0 {
		dst = appendAddr(dst, g.SrcAddr)
	}
	if mask&chDstAddr != 0 {
		dst = appendAddr(dst, g.DstAddr)
	}
	if mask&chSrcPort != 0 {
		dst = binary.LittleEndian.AppendUint16(dst, g.SrcPort)
	}
	if mask&chDstPort != 0 {
		dst = binary.LittleEndian.AppendUint16(dst, g.DstPort)
	}
	if mask&chType != 0 {
		dst = append(dst, byte(g.Type))
	}
	if mask&chDirection != 0 {
		dst = append(dst, byte(g.Direction))
	}
	if mask&chProtocol != 0 {
		dst = append(dst, g.Protocol)
	}
	if mask&chICMPType != 0 {
		dst = append(dst, g.ICMPType)
	}
	if mask&chICMPCode != 0 {
		dst = append(dst, g.ICMPCode)
	}
	if mask&chReconstructed != 0 {
		var v byte
		if g.Reconstructed {
			v = 1
		}
		dst = append(dst, v)
	}
	if mask&chRxPackets != 0 {
		dst = binary.AppendUvarint(dst, g.RxPackets)
	}
	if mask&chRxBytes != 0 {
		dst = binary.AppendUvarint(dst, g.RxBytes)
	}
	if mask&chTxPackets != 0 {
		dst = binary.AppendUvarint(dst, g.TxPackets)
	}
	if mask&chTxBytes != 0 {
		dst = binary.AppendUvarint(dst, g.TxBytes)
	}
	if mask&chWindowStart != 0 {
		dst = binary.LittleEndian.AppendUint64(dst, uint64(g.WindowStart))
	}
	if mask&chWindowEnd != 0 {
		dst = binary.LittleEndian.AppendUint64(dst, uint64(g.WindowEnd))
	}
	if mask&chNumStarts != 0 {
		dst = binary.AppendUvarint(dst, g.NumStarts)
	}
	if mask&chNumEnds != 0 {
		dst = binary.AppendUvarint(dst, g.NumEnds)
	}
	if mask&chNumDrops != 0 {
		dst = binary.AppendUvarint(dst, g.NumDrops)
	}
	return dst
}

// ApplyChanges appends to dst the events that the changes in data (AppendChanges) make of
// sent, the events of the request; count is the number of events the answer says it has.
// It checks the whole encoding before it writes anything, so an answer that is corrupt (or
// hostile) is an error and leaves dst and sent as they were. dst may be sent[:0]: every
// event is then changed where it is, and the kept ones move down over the dropped ones.
func ApplyChanges(dst, sent []flow.Event, data []byte, count int) ([]flow.Event, error) {
	if err := walkChanges(nil, sent, data, count); err != nil {
		return dst, fmt.Errorf("codec: changes: %w", err)
	}
	out := &dst
	if err := walkChanges(out, sent, data, count); err != nil {
		// Unreachable: the same walk just passed.
		return dst, fmt.Errorf("codec: changes: %w", err)
	}
	return *out, nil
}

var errBadChanges = errors.New("not a changes encoding")

// walkChanges reads the changes in data; with out nil it only checks them, otherwise it
// appends the changed events to *out.
func walkChanges(out *[]flow.Event, sent []flow.Event, data []byte, count int) error {
	if len(data) == 0 || data[0] != ChangesVersion {
		return errBadChanges
	}
	d := changeReader{decoder: decoder{buf: data[1:]}, apply: out != nil}
	n, kept := d.rawUvarint(), d.rawUvarint()
	if d.err != nil {
		return d.err
	}
	if n != uint64(len(sent)) {
		return fmt.Errorf("answer to %d events, the request had %d", n, len(sent))
	}
	if kept != uint64(count) || kept > n {
		return fmt.Errorf("%d events kept of %d, the answer says %d", kept, n, count)
	}
	var o []flow.Event
	if out != nil {
		o = *out
	}
	i := 0
	for j := 0; j < int(kept); j++ {
		// skip and mask are most often one byte each: read here, without a call.
		var skip, mask uint64
		if b := d.buf; len(b) >= 2 && b[0] < 0x80 && b[1] < 0x80 {
			skip, mask = uint64(b[0]), uint64(b[1])
			d.buf = b[2:]
		} else {
			skip = d.rawUvarint()
			mask = d.rawUvarint()
			if d.err != nil {
				return fmt.Errorf("event %d: %w", j, d.err)
			}
		}
		// Each event still to come needs a request event of its own.
		if skip > uint64(len(sent)-i-(int(kept)-j)) {
			return fmt.Errorf("event %d: skips %d events, past the request's end", j, skip)
		}
		if mask&^chAll != 0 {
			return fmt.Errorf("event %d: unknown field bits %#x", j, mask&^chAll)
		}
		i += int(skip)
		var e *flow.Event
		if d.apply {
			if len(o) < cap(o) && &o[:len(o)+1][len(o)] == &sent[i] {
				o = o[:len(o)+1] // applied in place, nothing dropped before it
			} else {
				o = append(o, sent[i])
			}
			e = &o[len(o)-1]
		} else {
			e = &d.scratch
		}
		for m := uint32(mask); m != 0; m &= m - 1 {
			d.field(e, uint32(1)<<bits.TrailingZeros32(m))
		}
		if d.err != nil {
			return fmt.Errorf("event %d: %w", j, d.err)
		}
		i++
	}
	if len(d.buf) != 0 {
		return fmt.Errorf("%d bytes after the last of %d events", len(d.buf), kept)
	}
	if out != nil {
		*out = o
	}
	return nil
}

type changeReader struct {
	decoder
	apply   bool
	scratch flow.Event // where a check writes
}

func (d *changeReader) bytes(n int) []byte {
	if len(d.buf) < n {
		d.fail(errShort)
		return nil
	}
	b := d.buf[:n]
	d.buf = d.buf[n:]
	return b
}

func (d *changeReader) u64() uint64 {
	if b := d.bytes(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

func (d *changeReader) u16() uint16 {
	if b := d.bytes(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}

func (d *changeReader) u8() uint8 {
	if b := d.bytes(1); b != nil {
		return b[0]
	}
	return 0
}

func (d *changeReader) id() uuid.UUID {
	if b := d.bytes(16); b != nil {
		return uuid.UUID(b)
	}
	return uuid.UUID{}
}

// str reads a string; a check does not copy it.
func (d *changeReader) str(slot int) string {
	if d.apply {
		return d.string(1, 1, slot)
	}
	n := d.rawUvarint()
	if d.err == nil {
		d.bytes(int(min(n, uint64(len(d.buf)+1))))
	}
	return ""
}

func (d *changeReader) field(e *flow.Event, bit uint32) {
	switch bit {
	case chEventID:
		e.EventID = d.id()
	case chFlowID:
		e.FlowID = d.id()
	case chTimestamp:
		e.Timestamp = flow.Time(d.u64())
	case chStart:
		e.Start = flow.Time(d.u64())
	case chEnd:
		e.End = flow.Time(d.u64())
	case chSrcAddr:
		e.SrcAddr = d.addr()
	case chDstAddr:
		e.DstAddr = d.addr()
	case chSrcPort:
		e.SrcPort = d.u16()
	case chDstPort:
		e.DstPort = d.u16()
	case chType:
		e.Type = flow.Type(d.u8())
	case chDirection:
		e.Direction = flow.Direction(d.u8())
	case chProtocol:
		e.Protocol = d.u8()
	case chICMPType:
		e.ICMPType = d.u8()
	case chICMPCode:
		e.ICMPCode = d.u8()
	case chReconstructed:
		switch v := d.u8(); v {
		case 0, 1:
			e.Reconstructed = v == 1
		default:
			d.fail(fmt.Errorf("reconstructed is %d, not 0 or 1", v))
		}
	case chRxPackets:
		e.RxPackets = d.rawUvarint()
	case chRxBytes:
		e.RxBytes = d.rawUvarint()
	case chTxPackets:
		e.TxPackets = d.rawUvarint()
	case chTxBytes:
		e.TxBytes = d.rawUvarint()
	case chRuleID:
		e.RuleID = d.str(0)
	case chSrcResourceID:
		e.SrcResourceID = d.str(1)
	case chDstResourceID:
		e.DstResourceID = d.str(2)
	case chCommunityID:
		e.CommunityID = d.str(3)
	case chSource:
		e.Source = d.str(4)
	case chWindowStart:
		e.WindowStart = flow.Time(d.u64())
	case chWindowEnd:
		e.WindowEnd = flow.Time(d.u64())
	case chNumStarts:
		e.NumStarts = d.rawUvarint()
	case chNumEnds:
		e.NumEnds = d.rawUvarint()
	case chNumDrops:
		e.NumDrops = d.rawUvarint()
	}
}
