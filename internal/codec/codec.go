// Package codec is the packed encoding of a batch of flow events that crosses the plugin
// boundary in one protobuf bytes field.
//
// Layout: a version byte (3), then each event in turn:
//
//	event_id, flow_id                 16 bytes each
//	type, direction, protocol,
//	icmp_type, icmp_code              1 byte each
//	present                           4 bytes (little endian): which optional fields follow,
//	                                  and the reconstructed flag
//	timestamp                         8 bytes (little endian, unix nanoseconds)
//	src_port, dst_port                2 bytes each
//	src_addr, dst_addr                1 byte tag (0 none, 4, 16, 17 = 16 with a zone) + bytes
//	                                  (+ uvarint length and zone for 17)
//	then, each only when its bit in present is set, in this order:
//	start, end                        8 bytes
//	rx_packets, rx_bytes,
//	tx_packets, tx_bytes              uvarint
//	rule_id, src_resource_id,
//	dst_resource_id, community_id,
//	source                            uvarint length + bytes
//	window_start, window_end          8 bytes
//	num_starts, num_ends, num_drops   uvarint
//
// Times are fixed-width because they are large (a nanosecond timestamp is a 9-byte varint);
// absent fields cost one bit. Measured against one protobuf message per event it is several
// times faster to encode and decode (no per-event message, no field tags, no reflection), and
// decoding shares strings that repeat from one event to the next, which they mostly do (rule
// IDs, the source name). Decode checks every length, so a corrupt or hostile message is an
// error, never a panic.
package codec

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Version is the first byte of an encoded batch.
const Version = 3

// Bits of the present field.
const (
	hasStart = 1 << iota
	hasEnd
	hasRxPackets
	hasRxBytes
	hasTxPackets
	hasTxBytes
	hasRuleID
	hasSrcResourceID
	hasDstResourceID
	hasCommunityID
	hasSource
	hasWindowStart
	hasWindowEnd
	hasNumStarts
	hasNumEnds
	hasNumDrops
	isReconstructed // a flag, not a field: nothing follows for it
)

// fixedSize is the part of every event before the addresses.
const fixedSize = 32 + 5 + 4 + 8 + 4

// Append appends the encoding of events to dst.
func Append(dst []byte, events []flow.Event) []byte {
	dst, _ = AppendPart(dst, events, -1)
	return dst
}

// AppendPart appends the encoding of the longest prefix of events whose encoding (its
// version byte included) takes at most limit bytes, and at least one event; n says how many
// it encoded. A negative limit encodes them all. It walks the events once: a part that grows
// past the limit is cut back to the event before, so a sender can split a batch too large
// for one message without sizing it first (a pass over events that are rarely in the cache
// any more when they are sent).
func AppendPart(dst []byte, events []flow.Event, limit int) (_ []byte, n int) {
	if cap(dst)-len(dst) < 1+len(events)*maxFixed {
		// Not room for every event without strings: size exactly, so that nothing grows.
		dst = slices.Grow(dst, Size(events))
	}
	start := len(dst)
	dst = append(dst, Version)
	for i := range events {
		end := len(dst)
		dst = appendEvent(dst, &events[i])
		if limit >= 0 && len(dst)-start > limit && i > 0 {
			return dst[:end], i
		}
	}
	return dst, len(events)
}

// MaxFixed bounds the encoded size of an event without its strings and zones: a buffer of
// 1 + MaxFixed × events usually holds a batch (strings are rare and short).
const MaxFixed = maxFixed

const maxFixed = fixedSize + 2*(1+16+10) + 2*8 + 4*10 + 5*10 + 2*8 + 3*10

// Size is an upper bound on the encoded size of events, to size buffers and to split
// batches that would exceed a message size limit.
func Size(events []flow.Event) int {
	n := 1
	for i := range events {
		n += EventSize(&events[i])
	}
	return n
}

// EventSize is an upper bound on the encoded size of one event.
func EventSize(e *flow.Event) int {
	return maxFixed + len(e.SrcAddr.Zone()) + len(e.DstAddr.Zone()) + len(e.RuleID) + len(e.SrcResourceID) + len(e.DstResourceID) + len(e.CommunityID) + len(e.Source)
}

// AppendEvent appends the encoding of one event, without the version byte: Version followed
// by the AppendEvent encodings of events is their Append encoding. It lets a sender encode
// each event once and put runs of them together into batches later (sinks/grpc).
func AppendEvent(dst []byte, e *flow.Event) []byte { return appendEvent(dst, e) }

func appendEvent(dst []byte, e *flow.Event) []byte {
	var present uint32
	if e.Reconstructed {
		present |= isReconstructed
	}
	if e.Start != 0 {
		present |= hasStart
	}
	if e.End != 0 {
		present |= hasEnd
	}
	if e.RxPackets != 0 {
		present |= hasRxPackets
	}
	if e.RxBytes != 0 {
		present |= hasRxBytes
	}
	if e.TxPackets != 0 {
		present |= hasTxPackets
	}
	if e.TxBytes != 0 {
		present |= hasTxBytes
	}
	if e.RuleID != "" {
		present |= hasRuleID
	}
	if e.SrcResourceID != "" {
		present |= hasSrcResourceID
	}
	if e.DstResourceID != "" {
		present |= hasDstResourceID
	}
	if e.CommunityID != "" {
		present |= hasCommunityID
	}
	if e.Source != "" {
		present |= hasSource
	}
	if e.WindowStart != 0 {
		present |= hasWindowStart
	}
	if e.WindowEnd != 0 {
		present |= hasWindowEnd
	}
	if e.NumStarts != 0 {
		present |= hasNumStarts
	}
	if e.NumEnds != 0 {
		present |= hasNumEnds
	}
	if e.NumDrops != 0 {
		present |= hasNumDrops
	}

	n := len(dst)
	dst = slices.Grow(dst, fixedSize)[:n+fixedSize]
	b := dst[n:]
	copy(b[0:16], e.EventID[:])
	copy(b[16:32], e.FlowID[:])
	b[32], b[33], b[34], b[35], b[36] = byte(e.Type), byte(e.Direction), e.Protocol, e.ICMPType, e.ICMPCode
	binary.LittleEndian.PutUint32(b[37:41], present)
	binary.LittleEndian.PutUint64(b[41:49], uint64(e.Timestamp))
	binary.LittleEndian.PutUint16(b[49:51], e.SrcPort)
	binary.LittleEndian.PutUint16(b[51:53], e.DstPort)
	dst = appendAddr(dst, e.SrcAddr)
	dst = appendAddr(dst, e.DstAddr)
	if present&^isReconstructed == 0 {
		return dst
	}
	if present&hasStart != 0 {
		dst = binary.LittleEndian.AppendUint64(dst, uint64(e.Start))
	}
	if present&hasEnd != 0 {
		dst = binary.LittleEndian.AppendUint64(dst, uint64(e.End))
	}
	if present&hasRxPackets != 0 {
		dst = binary.AppendUvarint(dst, e.RxPackets)
	}
	if present&hasRxBytes != 0 {
		dst = binary.AppendUvarint(dst, e.RxBytes)
	}
	if present&hasTxPackets != 0 {
		dst = binary.AppendUvarint(dst, e.TxPackets)
	}
	if present&hasTxBytes != 0 {
		dst = binary.AppendUvarint(dst, e.TxBytes)
	}
	if present&hasRuleID != 0 {
		dst = appendString(dst, e.RuleID)
	}
	if present&hasSrcResourceID != 0 {
		dst = appendString(dst, e.SrcResourceID)
	}
	if present&hasDstResourceID != 0 {
		dst = appendString(dst, e.DstResourceID)
	}
	if present&hasCommunityID != 0 {
		dst = appendString(dst, e.CommunityID)
	}
	if present&hasSource != 0 {
		dst = appendString(dst, e.Source)
	}
	if present&hasWindowStart != 0 {
		dst = binary.LittleEndian.AppendUint64(dst, uint64(e.WindowStart))
	}
	if present&hasWindowEnd != 0 {
		dst = binary.LittleEndian.AppendUint64(dst, uint64(e.WindowEnd))
	}
	if present&hasNumStarts != 0 {
		dst = binary.AppendUvarint(dst, e.NumStarts)
	}
	if present&hasNumEnds != 0 {
		dst = binary.AppendUvarint(dst, e.NumEnds)
	}
	if present&hasNumDrops != 0 {
		dst = binary.AppendUvarint(dst, e.NumDrops)
	}
	return dst
}

func appendAddr(dst []byte, a netip.Addr) []byte {
	switch {
	case !a.IsValid():
		return append(dst, 0)
	case a.Is4():
		b := a.As4()
		return append(append(dst, 4), b[:]...)
	case a.Zone() == "":
		b := a.As16()
		return append(append(dst, 16), b[:]...)
	default:
		b := a.As16()
		dst = append(append(dst, 17), b[:]...)
		return appendString(dst, a.Zone())
	}
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

var errShort = errors.New("truncated")

// Decode appends the count events encoded in data to dst. It fails when data is not exactly
// count events of a known version.
func Decode(dst []flow.Event, data []byte, count int) ([]flow.Event, error) {
	if len(data) == 0 {
		return dst, errors.New("codec: empty batch encoding")
	}
	if data[0] != Version {
		return dst, fmt.Errorf("codec: unknown batch encoding version %d (this build knows %d)", data[0], Version)
	}
	// Each event takes at least fixedSize bytes and two address tags: reject impossible
	// counts before allocating for them.
	const minEvent = fixedSize + 2
	if count < 0 || count > (len(data)-1)/minEvent {
		return dst, fmt.Errorf("codec: %d events cannot fit in %d bytes", count, len(data))
	}
	d := decoder{buf: data[1:]}
	start := len(dst)
	// Grow without zeroing twice: event assigns every field of each event.
	dst = slices.Grow(dst, count)[:start+count]
	for i := start; i < len(dst); i++ {
		if err := d.event(&dst[i]); err != nil {
			return dst[:start], fmt.Errorf("codec: event %d: %w", i-start, err)
		}
	}
	if len(d.buf) != 0 {
		return dst[:start], fmt.Errorf("codec: %d bytes after the last of %d events", len(d.buf), count)
	}
	return dst, nil
}

type decoder struct {
	buf  []byte
	err  error
	prev [6]string // the previous event's strings, reused when they repeat
}

// event decodes one event, assigning every field of *e (it may hold a previous event).
func (d *decoder) event(e *flow.Event) error {
	b := d.buf
	if len(b) < fixedSize {
		return errShort
	}
	e.EventID = uuid.UUID(b[0:16])
	e.FlowID = uuid.UUID(b[16:32])
	e.Type = flow.Type(b[32])
	e.Direction = flow.Direction(b[33])
	e.Protocol, e.ICMPType, e.ICMPCode = b[34], b[35], b[36]
	present := binary.LittleEndian.Uint32(b[37:41])
	e.Reconstructed = present&isReconstructed != 0
	e.Timestamp = flow.Time(binary.LittleEndian.Uint64(b[41:49]))
	e.SrcPort = binary.LittleEndian.Uint16(b[49:51])
	e.DstPort = binary.LittleEndian.Uint16(b[51:53])
	d.buf = b[fixedSize:]
	e.SrcAddr = d.addr()
	e.DstAddr = d.addr()
	e.Start, e.End = d.time(present, hasStart), d.time(present, hasEnd)
	e.RxPackets, e.RxBytes = d.uvarint(present, hasRxPackets), d.uvarint(present, hasRxBytes)
	e.TxPackets, e.TxBytes = d.uvarint(present, hasTxPackets), d.uvarint(present, hasTxBytes)
	e.RuleID = d.string(present, hasRuleID, 0)
	e.SrcResourceID = d.string(present, hasSrcResourceID, 1)
	e.DstResourceID = d.string(present, hasDstResourceID, 2)
	e.CommunityID = d.string(present, hasCommunityID, 3)
	e.Source = d.string(present, hasSource, 4)
	e.WindowStart, e.WindowEnd = d.time(present, hasWindowStart), d.time(present, hasWindowEnd)
	e.NumStarts = d.uvarint(present, hasNumStarts)
	e.NumEnds = d.uvarint(present, hasNumEnds)
	e.NumDrops = d.uvarint(present, hasNumDrops)
	return d.err
}

func (d *decoder) fail(err error) {
	if d.err == nil {
		d.err = err
	}
	d.buf = nil
}

func (d *decoder) time(present, bit uint32) flow.Time {
	if present&bit == 0 {
		return 0
	}
	if len(d.buf) < 8 {
		d.fail(errShort)
		return 0
	}
	v := binary.LittleEndian.Uint64(d.buf)
	d.buf = d.buf[8:]
	return flow.Time(v)
}

func (d *decoder) uvarint(present, bit uint32) uint64 {
	if present&bit == 0 {
		return 0
	}
	return d.rawUvarint()
}

func (d *decoder) rawUvarint() uint64 {
	if len(d.buf) > 0 && d.buf[0] < 0x80 {
		v := uint64(d.buf[0])
		d.buf = d.buf[1:]
		return v
	}
	v, n := binary.Uvarint(d.buf)
	if n <= 0 {
		d.fail(errors.New("bad varint"))
		return 0
	}
	d.buf = d.buf[n:]
	return v
}

func (d *decoder) addr() netip.Addr {
	if len(d.buf) == 0 {
		d.fail(errShort)
		return netip.Addr{}
	}
	tag := d.buf[0]
	switch tag {
	case 0:
		d.buf = d.buf[1:]
		return netip.Addr{}
	case 4:
		if len(d.buf) < 5 {
			d.fail(errShort)
			return netip.Addr{}
		}
		a := netip.AddrFrom4([4]byte(d.buf[1:5]))
		d.buf = d.buf[5:]
		return a
	case 16, 17:
		if len(d.buf) < 17 {
			d.fail(errShort)
			return netip.Addr{}
		}
		a := netip.AddrFrom16([16]byte(d.buf[1:17]))
		d.buf = d.buf[17:]
		if tag == 17 {
			zone := d.string(1, 1, 5)
			if zone == "" {
				d.fail(errors.New("empty zone"))
				return netip.Addr{}
			}
			a = a.WithZone(zone)
		}
		return a
	}
	d.fail(fmt.Errorf("bad address tag %d", tag))
	return netip.Addr{}
}

func (d *decoder) string(present, bit uint32, slot int) string {
	if present&bit == 0 {
		return ""
	}
	n := d.rawUvarint()
	if d.err != nil {
		return ""
	}
	if n > uint64(len(d.buf)) {
		d.fail(errShort)
		return ""
	}
	b := d.buf[:n]
	d.buf = d.buf[n:]
	if p := d.prev[slot]; p == string(b) {
		return p
	}
	s := string(b)
	d.prev[slot] = s
	return s
}

// Validate checks, without decoding or allocating, that data is exactly count events of
// this version: it makes every check Decode makes, and no other, so that data passes
// Validate exactly when Decode would succeed, with the same error otherwise (FuzzValidate).
// sourced reports whether every event names its source (a non-empty source field). It lets
// the plugin host pass a source plugin's batch on undecoded (flow.NewEncodedBatch) and still
// refuse a malformed one to its source.
func Validate(data []byte, count int) (sourced bool, err error) {
	if len(data) == 0 {
		return false, errors.New("codec: empty batch encoding")
	}
	if data[0] != Version {
		return false, fmt.Errorf("codec: unknown batch encoding version %d (this build knows %d)", data[0], Version)
	}
	const minEvent = fixedSize + 2
	if count < 0 || count > (len(data)-1)/minEvent {
		return false, fmt.Errorf("codec: %d events cannot fit in %d bytes", count, len(data))
	}
	b, at, sourced := data[1:], 0, true
	for i := range count {
		var named bool
		if at, named, err = skipEvent(b, at); err != nil {
			return false, fmt.Errorf("codec: event %d: %w", i, err)
		}
		sourced = sourced && named
	}
	if at != len(b) {
		return false, fmt.Errorf("codec: %d bytes after the last of %d events", len(b)-at, count)
	}
	return sourced, nil
}

// skipEvent is decoder.event without the event, for the event at b[at:]: the offset after
// it, and whether it names its source. It walks an offset rather than reslicing, and reads
// one-byte varints (most are) in line: it is on the plugin host's path for every event of a
// source plugin.
func skipEvent(b []byte, at int) (next int, sourced bool, err error) {
	if len(b)-at < fixedSize {
		return 0, false, errShort
	}
	present := binary.LittleEndian.Uint32(b[at+37 : at+41])
	i := at + fixedSize
	for range 2 { // the addresses
		if i >= len(b) {
			return 0, false, errShort
		}
		switch tag := b[i]; tag {
		case 0:
			i++
		case 4:
			i += 5
		case 16, 17:
			i += 17
			if tag == 17 && i <= len(b) {
				var n uint64
				if n, i, err = varintAt(b, i); err != nil {
					return 0, false, err
				}
				if n > uint64(len(b)-i) {
					return 0, false, errShort
				}
				if n == 0 {
					return 0, false, errors.New("empty zone")
				}
				i += int(n)
			}
		default:
			return 0, false, fmt.Errorf("bad address tag %d", tag)
		}
		if i > len(b) {
			return 0, false, errShort
		}
	}
	// The optional fields in their order: times, counters, strings, times, counters.
	if present&hasStart != 0 {
		if i += 8; i > len(b) {
			return 0, false, errShort
		}
	}
	if present&hasEnd != 0 {
		if i += 8; i > len(b) {
			return 0, false, errShort
		}
	}
	for bit := uint32(hasRxPackets); bit <= hasTxBytes; bit <<= 1 {
		if present&bit != 0 {
			if i < len(b) && b[i] < 0x80 {
				i++
			} else if _, i, err = varintAt(b, i); err != nil {
				return 0, false, err
			}
		}
	}
	if present&(hasRuleID|hasSrcResourceID|hasDstResourceID|hasCommunityID|hasSource) != 0 {
		for bit := uint32(hasRuleID); bit <= hasSource; bit <<= 1 {
			if present&bit == 0 {
				continue
			}
			var n uint64
			if i < len(b) && b[i] < 0x80 {
				n, i = uint64(b[i]), i+1
			} else if n, i, err = varintAt(b, i); err != nil {
				return 0, false, err
			}
			if n > uint64(len(b)-i) {
				return 0, false, errShort
			}
			i += int(n)
			if bit == hasSource {
				sourced = n > 0
			}
		}
	}
	if present&hasWindowStart != 0 {
		if i += 8; i > len(b) {
			return 0, false, errShort
		}
	}
	if present&hasWindowEnd != 0 {
		if i += 8; i > len(b) {
			return 0, false, errShort
		}
	}
	if present&(hasNumStarts|hasNumEnds|hasNumDrops) != 0 {
		for bit := uint32(hasNumStarts); bit <= hasNumDrops; bit <<= 1 {
			if present&bit != 0 {
				if i < len(b) && b[i] < 0x80 {
					i++
				} else if _, i, err = varintAt(b, i); err != nil {
					return 0, false, err
				}
			}
		}
	}
	return i, sourced, nil
}

// varintAt reads the uvarint at b[i:]: its value and the offset after it.
func varintAt(b []byte, i int) (uint64, int, error) {
	v, n := binary.Uvarint(b[i:])
	if n <= 0 {
		return 0, 0, errors.New("bad varint")
	}
	return v, i + n, nil
}
