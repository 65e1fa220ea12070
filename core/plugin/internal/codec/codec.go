// Package codec is the packed encoding of a batch of flow events that crosses the plugin
// boundary in one protobuf bytes field.
//
// Layout: a version byte (1), then each event in turn:
//
//	event_id, flow_id                 16 bytes each
//	type, direction, protocol,
//	icmp_type, icmp_code              1 byte each
//	timestamp, start, end             varint (zig-zag)
//	src_addr, dst_addr                1 byte tag (0 none, 4, 16, 17 = 16 with a zone) + bytes
//	                                  (+ uvarint length and zone for 17)
//	src_port, dst_port                uvarint
//	rx_packets, rx_bytes,
//	tx_packets, tx_bytes              uvarint
//	rule_id, src_resource_id,
//	dst_resource_id, community_id,
//	source                            uvarint length + bytes
//	window_start, window_end          varint (zig-zag)
//	num_starts, num_ends, num_drops   uvarint
//
// It is faster than one protobuf message per event (no per-event message, no field tags,
// no reflection) and decoding interns strings that repeat from one event to the next, which
// they mostly do (rule IDs, the source name). Decode checks every length, so a corrupt or
// hostile message is an error, never a panic.
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
const Version = 1

// Append appends the encoding of events to dst.
func Append(dst []byte, events []flow.Event) []byte {
	dst = append(dst, Version)
	for i := range events {
		dst = appendEvent(dst, &events[i])
	}
	return dst
}

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
	const fixed = 32 + 5 + 3*10 + 2*(1+16) + 2*3 + 4*10 + 5*10 + 2*10 + 3*10
	return fixed + 2*(10+len(e.SrcAddr.Zone())) + len(e.RuleID) + len(e.SrcResourceID) + len(e.DstResourceID) + len(e.CommunityID) + len(e.Source)
}

func appendEvent(dst []byte, e *flow.Event) []byte {
	dst = append(dst, e.EventID[:]...)
	dst = append(dst, e.FlowID[:]...)
	dst = append(dst, byte(e.Type), byte(e.Direction), e.Protocol, e.ICMPType, e.ICMPCode)
	dst = binary.AppendVarint(dst, int64(e.Timestamp))
	dst = binary.AppendVarint(dst, int64(e.Start))
	dst = binary.AppendVarint(dst, int64(e.End))
	dst = appendAddr(dst, e.SrcAddr)
	dst = appendAddr(dst, e.DstAddr)
	dst = binary.AppendUvarint(dst, uint64(e.SrcPort))
	dst = binary.AppendUvarint(dst, uint64(e.DstPort))
	dst = binary.AppendUvarint(dst, e.RxPackets)
	dst = binary.AppendUvarint(dst, e.RxBytes)
	dst = binary.AppendUvarint(dst, e.TxPackets)
	dst = binary.AppendUvarint(dst, e.TxBytes)
	dst = appendString(dst, e.RuleID)
	dst = appendString(dst, e.SrcResourceID)
	dst = appendString(dst, e.DstResourceID)
	dst = appendString(dst, e.CommunityID)
	dst = appendString(dst, e.Source)
	dst = binary.AppendVarint(dst, int64(e.WindowStart))
	dst = binary.AppendVarint(dst, int64(e.WindowEnd))
	dst = binary.AppendUvarint(dst, e.NumStarts)
	dst = binary.AppendUvarint(dst, e.NumEnds)
	dst = binary.AppendUvarint(dst, e.NumDrops)
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
	// Each event takes at least 32+5+3+2+2+4+5+2+3 bytes: reject impossible counts before
	// allocating for them.
	const minEvent = 58
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
	if len(d.buf) < 37 {
		return errShort
	}
	e.EventID = uuid.UUID(d.buf[0:16])
	e.FlowID = uuid.UUID(d.buf[16:32])
	e.Type = flow.Type(d.buf[32])
	e.Direction = flow.Direction(d.buf[33])
	e.Protocol, e.ICMPType, e.ICMPCode = d.buf[34], d.buf[35], d.buf[36]
	d.buf = d.buf[37:]
	e.Timestamp = flow.Time(d.varint())
	e.Start = flow.Time(d.varint())
	e.End = flow.Time(d.varint())
	e.SrcAddr = d.addr()
	e.DstAddr = d.addr()
	e.SrcPort = d.port()
	e.DstPort = d.port()
	e.RxPackets = d.uvarint()
	e.RxBytes = d.uvarint()
	e.TxPackets = d.uvarint()
	e.TxBytes = d.uvarint()
	e.RuleID = d.string(0)
	e.SrcResourceID = d.string(1)
	e.DstResourceID = d.string(2)
	e.CommunityID = d.string(3)
	e.Source = d.string(4)
	e.WindowStart = flow.Time(d.varint())
	e.WindowEnd = flow.Time(d.varint())
	e.NumStarts = d.uvarint()
	e.NumEnds = d.uvarint()
	e.NumDrops = d.uvarint()
	return d.err
}

func (d *decoder) fail(err error) {
	if d.err == nil {
		d.err = err
	}
	d.buf = nil
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.buf)
	if n <= 0 {
		d.fail(errors.New("bad varint"))
		return 0
	}
	d.buf = d.buf[n:]
	return v
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.buf)
	if n <= 0 {
		d.fail(errors.New("bad varint"))
		return 0
	}
	d.buf = d.buf[n:]
	return v
}

func (d *decoder) port() uint16 {
	v := d.uvarint()
	if v > 0xffff {
		d.fail(fmt.Errorf("port %d out of range", v))
		return 0
	}
	return uint16(v)
}

func (d *decoder) addr() netip.Addr {
	if len(d.buf) == 0 {
		d.fail(errShort)
		return netip.Addr{}
	}
	tag := d.buf[0]
	d.buf = d.buf[1:]
	switch tag {
	case 0:
		return netip.Addr{}
	case 4:
		if len(d.buf) < 4 {
			d.fail(errShort)
			return netip.Addr{}
		}
		a := netip.AddrFrom4([4]byte(d.buf[:4]))
		d.buf = d.buf[4:]
		return a
	case 16, 17:
		if len(d.buf) < 16 {
			d.fail(errShort)
			return netip.Addr{}
		}
		a := netip.AddrFrom16([16]byte(d.buf[:16]))
		d.buf = d.buf[16:]
		if tag == 17 {
			zone := d.string(5)
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

func (d *decoder) string(slot int) string {
	n := d.uvarint()
	if d.err != nil {
		return ""
	}
	if n > uint64(len(d.buf)) {
		d.fail(errShort)
		return ""
	}
	b := d.buf[:n]
	d.buf = d.buf[n:]
	if n == 0 {
		return ""
	}
	if p := d.prev[slot]; p == string(b) {
		return p
	}
	s := string(b)
	d.prev[slot] = s
	return s
}
