package flow

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// AppendJSON appends the JSON form of e (docs/schema.md) to dst, without a trailing newline.
// It is written by hand, without reflection, because the file sink encodes every event. An
// Encoder does the same faster for many events.
func AppendJSON(dst []byte, e *Event) []byte {
	var enc Encoder
	return enc.AppendJSON(dst, e)
}

// Encoder appends events as JSON. It remembers the last two seconds it formatted, because
// the events of a batch mostly share them (an end event's start is often in another second
// than its timestamp and end); it is not safe for concurrent use.
type Encoder struct {
	secs [2]cachedSecond
	next uint8 // the slot the next new second replaces
}

// cachedSecond is a formatted second: "2006-01-02T15:04:05" of sec.
type cachedSecond struct {
	sec   int64
	buf   [19]byte
	valid bool
}

// AppendJSON is the package's AppendJSON.
func (enc *Encoder) AppendJSON(dst []byte, e *Event) []byte {
	dst = append(dst, `{"event_id":"`...)
	dst = appendUUID(dst, e.EventID)
	dst = append(dst, `","flow_id":"`...)
	dst = appendUUID(dst, e.FlowID)
	dst = append(dst, typeKeys[min(int(e.Type), len(typeKeys)-1)]...)
	dst = enc.appendTime(dst, e.Timestamp)
	dst = append(dst, '"')
	if e.Start != 0 {
		dst = append(dst, `,"start":"`...)
		dst = enc.appendTime(dst, e.Start)
		dst = append(dst, '"')
	}
	if e.End != 0 {
		dst = append(dst, `,"end":"`...)
		dst = enc.appendTime(dst, e.End)
		dst = append(dst, '"')
	}
	dst = append(dst, directionKeys[min(int(e.Direction), len(directionKeys)-1)]...)
	dst = appendUint(dst, uint64(e.Protocol))
	dst = append(dst, `,"src_ip":`...)
	dst = appendAddr(dst, e.SrcAddr)
	dst = append(dst, `,"dst_ip":`...)
	dst = appendAddr(dst, e.DstAddr)
	if IsICMP(e.Protocol) {
		dst = append(dst, `,"icmp_type":`...)
		dst = appendUint(dst, uint64(e.ICMPType))
		dst = append(dst, `,"icmp_code":`...)
		dst = appendUint(dst, uint64(e.ICMPCode))
	} else {
		dst = append(dst, `,"src_port":`...)
		dst = appendUint(dst, uint64(e.SrcPort))
		dst = append(dst, `,"dst_port":`...)
		dst = appendUint(dst, uint64(e.DstPort))
	}
	dst = append(dst, `,"rx_packets":`...)
	dst = appendUint(dst, e.RxPackets)
	dst = append(dst, `,"rx_bytes":`...)
	dst = appendUint(dst, e.RxBytes)
	dst = append(dst, `,"tx_packets":`...)
	dst = appendUint(dst, e.TxPackets)
	dst = append(dst, `,"tx_bytes":`...)
	dst = appendUint(dst, e.TxBytes)
	dst = append(dst, `,"rule_id":`...)
	dst = appendString(dst, e.RuleID)
	dst = append(dst, `,"src_resource_id":`...)
	dst = appendString(dst, e.SrcResourceID)
	dst = append(dst, `,"dst_resource_id":`...)
	dst = appendString(dst, e.DstResourceID)
	if e.CommunityID != "" {
		dst = append(dst, `,"community_id":`...)
		dst = appendString(dst, e.CommunityID)
	}
	dst = append(dst, `,"source":`...)
	dst = appendString(dst, e.Source)
	if e.Reconstructed {
		dst = append(dst, `,"reconstructed":true`...)
	}
	if e.Type == TypeAggregate {
		dst = append(dst, `,"window_start":"`...)
		dst = enc.appendTime(dst, e.WindowStart)
		dst = append(dst, `","window_end":"`...)
		dst = enc.appendTime(dst, e.WindowEnd)
		dst = append(dst, `","num_starts":`...)
		dst = appendUint(dst, e.NumStarts)
		dst = append(dst, `,"num_ends":`...)
		dst = appendUint(dst, e.NumEnds)
		dst = append(dst, `,"num_drops":`...)
		dst = appendUint(dst, e.NumDrops)
	}
	return append(dst, '}')
}

// typeKeys and directionKeys are the type and direction with the text around them; the last
// of each is what an out-of-range value writes ("unknown", as String does).
var (
	typeKeys      = [...]string{`","type":"unknown","timestamp":"`, `","type":"start","timestamp":"`, `","type":"end","timestamp":"`, `","type":"drop","timestamp":"`, `","type":"aggregate","timestamp":"`, `","type":"unknown","timestamp":"`}
	directionKeys = [...]string{`,"direction":"unknown","protocol":`, `,"direction":"ingress","protocol":`, `,"direction":"egress","protocol":`, `,"direction":"unknown","protocol":`}
)

// appendUint is strconv.AppendUint(dst, v, 10), with the small numbers that most counters,
// codes and protocols are written without the general path.
func appendUint(dst []byte, v uint64) []byte {
	switch {
	case v < 10:
		return append(dst, byte('0'+v))
	case v < 100:
		return append(dst, digits2[2*v], digits2[2*v+1])
	}
	return strconv.AppendUint(dst, v, 10)
}

// AppendUint appends v in decimal, as strconv.AppendUint(dst, v, 10).
func AppendUint(dst []byte, v uint64) []byte { return appendUint(dst, v) }

// AppendTime appends t as AppendJSON formats times (RFC 3339, UTC, nine fractional digits),
// reusing the second it formatted last.
func (enc *Encoder) AppendTime(dst []byte, t Time) []byte { return enc.appendTime(dst, t) }

// AppendJSONString appends s as a quoted JSON string; invalid UTF-8 becomes U+FFFD.
func AppendJSONString(dst []byte, s string) []byte { return appendString(dst, s) }

// AppendJSONAddr appends a as a quoted JSON string ("" when a is not valid), as
// netip.Addr.AppendTo writes it.
func AppendJSONAddr(dst []byte, a netip.Addr) []byte { return appendAddr(dst, a) }

// AppendUUID appends u in its canonical 36-character form, without quotes.
func AppendUUID(dst []byte, u uuid.UUID) []byte { return appendUUID(dst, u) }

const hexDigits = "0123456789abcdef"

func appendUUID(dst []byte, u uuid.UUID) []byte {
	var b [36]byte
	binary.BigEndian.PutUint64(b[0:], hex8(binary.BigEndian.Uint32(u[0:])))
	x := hex8(binary.BigEndian.Uint32(u[4:]))
	binary.BigEndian.PutUint32(b[9:], uint32(x>>32))
	binary.BigEndian.PutUint32(b[14:], uint32(x))
	x = hex8(binary.BigEndian.Uint32(u[8:]))
	binary.BigEndian.PutUint32(b[19:], uint32(x>>32))
	binary.BigEndian.PutUint64(b[28:], hex8(binary.BigEndian.Uint32(u[12:])))
	binary.BigEndian.PutUint32(b[24:], uint32(x))
	b[8], b[13], b[18], b[23] = '-', '-', '-', '-'
	return append(dst, b[:]...)
}

// hex8 is the eight lower-case hex digits of v, the first in the top byte: the nibbles are
// spread one to a byte, then each becomes '0'+n, or 'a'+n-10 where n+6 carries into bit 4.
func hex8(v uint32) uint64 {
	x := uint64(v)
	x = (x | x<<16) & 0x0000ffff0000ffff
	x = (x | x<<8) & 0x00ff00ff00ff00ff
	x = (x | x<<4) & 0x0f0f0f0f0f0f0f0f
	letters := (x + 0x0606060606060606) >> 4 & 0x0101010101010101
	return x + 0x3030303030303030 + letters*('a'-'0'-10)
}

// appendAddr appends a as a quoted string, as netip.Addr.AppendTo writes it (RFC 5952 for
// IPv6), with plain IPv4 and IPv6 formatted here in one append.
func appendAddr(dst []byte, a netip.Addr) []byte {
	switch {
	case !a.IsValid():
		return append(dst, `""`...)
	case a.Is4():
		var b [17]byte // "255.255.255.255"
		v := a.As4()
		b[0] = '"'
		n := appendDec(b[:], 1, v[0])
		for _, x := range v[1:] {
			b[n] = '.'
			n = appendDec(b[:], n+1, x)
		}
		b[n] = '"'
		return append(dst, b[:n+1]...)
	case a.Zone() != "" || a.Is4In6():
		dst = append(dst, '"')
		dst = a.AppendTo(dst)
		return append(dst, '"')
	}
	v := a.As16()
	var g [8]uint16
	for i := range g {
		g[i] = uint16(v[2*i])<<8 | uint16(v[2*i+1])
	}
	// The longest run of two or more zero groups becomes "::", the first of equal runs.
	zs, ze := 8, 8
	for i := 0; i < 8; {
		if g[i] != 0 {
			i++
			continue
		}
		j := i + 1
		for j < 8 && g[j] == 0 {
			j++
		}
		if j-i >= 2 && j-i > ze-zs {
			zs, ze = i, j
		}
		i = j
	}
	var b [41]byte // 39 + quotes
	b[0] = '"'
	n := 1
	for i := 0; i < 8; i++ {
		if i == zs {
			b[n], b[n+1] = ':', ':'
			n += 2
			i = ze - 1
			continue
		}
		if i > 0 && i != ze {
			b[n] = ':'
			n++
		}
		x := g[i]
		if x >= 0x1000 {
			b[n] = hexDigits[x>>12]
			n++
		}
		if x >= 0x100 {
			b[n] = hexDigits[x>>8&0xf]
			n++
		}
		if x >= 0x10 {
			b[n] = hexDigits[x>>4&0xf]
			n++
		}
		b[n] = hexDigits[x&0xf]
		n++
	}
	b[n] = '"'
	return append(dst, b[:n+1]...)
}

// appendDec writes x in decimal at b[n:] and returns the index after it.
func appendDec(b []byte, n int, x uint8) int {
	if x >= 100 {
		b[n] = byte('0' + x/100)
		n++
	}
	if x >= 10 {
		b[n] = byte('0' + x/10%10)
		n++
	}
	b[n] = byte('0' + x%10)
	return n + 1
}

// appendString appends s as a JSON string, escaping what JSON requires.
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && size == 1 {
				dst = append(dst, s[start:i]...)
				dst = append(dst, `\ufffd`...)
				i++
				start = i
				continue
			}
			i += size
			continue
		}
		dst = append(dst, s[start:i]...)
		switch c {
		case '"', '\\':
			dst = append(dst, '\\', c)
		case '\n':
			dst = append(dst, '\\', 'n')
		case '\r':
			dst = append(dst, '\\', 'r')
		case '\t':
			dst = append(dst, '\\', 't')
		default:
			dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
		}
		i++
		start = i
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// AppendTime appends t in RFC 3339 form, UTC, with exactly nine fractional digits
// (2006-01-02T15:04:05.000000000Z). The zero (unknown) Time is the Unix epoch.
func AppendTime(dst []byte, t Time) []byte {
	var enc Encoder
	return enc.appendTime(dst, t)
}

func (enc *Encoder) appendTime(dst []byte, t Time) []byte {
	ns := int64(t)
	if ns < 0 {
		return appendTimeSlow(dst, t)
	}
	sec, frac := ns/1e9, ns%1e9
	var c *cachedSecond
	switch {
	case enc.secs[0].valid && enc.secs[0].sec == sec:
		c = &enc.secs[0]
	case enc.secs[1].valid && enc.secs[1].sec == sec:
		c = &enc.secs[1]
	default:
		var tmp [32]byte
		full := appendTimeSlow(tmp[:0], t)
		if len(full) != 30 { // a year outside 0000-9999
			return append(dst, full...)
		}
		c = &enc.secs[enc.next&1]
		enc.next++
		copy(c.buf[:], full[:19])
		c.sec, c.valid = sec, true
	}
	var buf [30]byte
	copy(buf[:19], c.buf[:])
	buf[19], buf[29] = '.', 'Z'
	// Nine digits, two at a time.
	lo := uint32(frac)
	buf[28] = byte('0' + lo%10)
	lo /= 10
	for i := 26; i >= 20; i -= 2 {
		d := lo % 100
		lo /= 100
		buf[i], buf[i+1] = digits2[2*d], digits2[2*d+1]
	}
	return append(dst, buf[:]...)
}

// digits2 is "00" to "99".
const digits2 = "00010203040506070809" + "10111213141516171819" + "20212223242526272829" + "30313233343536373839" + "40414243444546474849" +
	"50515253545556575859" + "60616263646566676869" + "70717273747576777879" + "80818283848586878889" + "90919293949596979899"

// appendTimeSlow formats t from scratch.
func appendTimeSlow(dst []byte, t Time) []byte {
	ns := int64(t)
	sec := ns / 1e9
	frac := ns % 1e9
	if frac < 0 {
		frac += 1e9
		sec--
	}
	days := sec / 86400
	rem := sec % 86400
	if rem < 0 {
		rem += 86400
		days--
	}
	y, m, d := civil(days)
	if y < 0 || y > 9999 {
		return time.Unix(sec, frac).UTC().AppendFormat(dst, "2006-01-02T15:04:05.000000000Z07:00")
	}
	dst = append4(dst, int(y))
	dst = append(dst, '-')
	dst = append2(dst, int(m))
	dst = append(dst, '-')
	dst = append2(dst, int(d))
	dst = append(dst, 'T')
	dst = append2(dst, int(rem/3600))
	dst = append(dst, ':')
	dst = append2(dst, int(rem%3600/60))
	dst = append(dst, ':')
	dst = append2(dst, int(rem%60))
	dst = append(dst, '.')
	var buf [9]byte
	for i := 8; i >= 0; i-- {
		buf[i] = byte('0' + frac%10)
		frac /= 10
	}
	dst = append(dst, buf[:]...)
	return append(dst, 'Z')
}

// civil converts days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
// days_from_civil inverse).
func civil(days int64) (y, m, d int64) {
	z := days + 719468
	era := z / 146097
	if z < 0 && z%146097 != 0 {
		era--
	}
	doe := z - era*146097
	yoe := (doe - doe/1460 + doe/36524 - doe/146096) / 365
	y = yoe + era*400
	doy := doe - (365*yoe + yoe/4 - yoe/100)
	mp := (5*doy + 2) / 153
	d = doy - (153*mp+2)/5 + 1
	if mp < 10 {
		m = mp + 3
	} else {
		m = mp - 9
	}
	if m <= 2 {
		y++
	}
	return y, m, d
}

func append2(dst []byte, v int) []byte {
	return append(dst, byte('0'+v/10), byte('0'+v%10))
}

func append4(dst []byte, v int) []byte {
	return append(dst, byte('0'+v/1000), byte('0'+v/100%10), byte('0'+v/10%10), byte('0'+v%10))
}

// jsonEvent is the decoding form of an event line; pointers tell absent keys from zeros.
type jsonEvent struct {
	EventID       *string `json:"event_id"`
	FlowID        *string `json:"flow_id"`
	Type          *string `json:"type"`
	Timestamp     *string `json:"timestamp"`
	Start         string  `json:"start"`
	End           string  `json:"end"`
	Direction     string  `json:"direction"`
	Protocol      *uint8  `json:"protocol"`
	SrcIP         string  `json:"src_ip"`
	DstIP         string  `json:"dst_ip"`
	SrcPort       uint16  `json:"src_port"`
	DstPort       uint16  `json:"dst_port"`
	ICMPType      uint8   `json:"icmp_type"`
	ICMPCode      uint8   `json:"icmp_code"`
	RxPackets     uint64  `json:"rx_packets"`
	RxBytes       uint64  `json:"rx_bytes"`
	TxPackets     uint64  `json:"tx_packets"`
	TxBytes       uint64  `json:"tx_bytes"`
	RuleID        string  `json:"rule_id"`
	SrcResourceID string  `json:"src_resource_id"`
	DstResourceID string  `json:"dst_resource_id"`
	CommunityID   string  `json:"community_id"`
	Source        string  `json:"source"`
	Reconstructed bool    `json:"reconstructed"`
	WindowStart   string  `json:"window_start"`
	WindowEnd     string  `json:"window_end"`
	NumStarts     uint64  `json:"num_starts"`
	NumEnds       uint64  `json:"num_ends"`
	NumDrops      uint64  `json:"num_drops"`
}

// ParseJSON decodes one line in the form AppendJSON writes. Unknown keys, missing required
// keys (event_id, flow_id, type, timestamp, protocol) and malformed values are errors that
// name the key.
func ParseJSON(line []byte, e *Event) error {
	var j jsonEvent
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&j); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data after the JSON object")
	}
	*e = Event{}
	var err error
	for _, req := range []struct {
		name string
		v    any
	}{{"event_id", j.EventID}, {"flow_id", j.FlowID}, {"type", j.Type}, {"timestamp", j.Timestamp}, {"protocol", j.Protocol}} {
		switch p := req.v.(type) {
		case *string:
			if p == nil {
				return fmt.Errorf("missing key %q", req.name)
			}
		case *uint8:
			if p == nil {
				return fmt.Errorf("missing key %q", req.name)
			}
		}
	}
	if e.EventID, err = uuid.Parse(*j.EventID); err != nil {
		return fmt.Errorf("event_id: %w", err)
	}
	if e.FlowID, err = uuid.Parse(*j.FlowID); err != nil {
		return fmt.Errorf("flow_id: %w", err)
	}
	var ok bool
	if e.Type, ok = ParseType(*j.Type); !ok {
		return fmt.Errorf("type: unknown type %q (want start, end, drop or aggregate)", *j.Type)
	}
	if e.Timestamp, err = parseTime("timestamp", *j.Timestamp); err != nil {
		return err
	}
	if e.Start, err = parseTime("start", j.Start); err != nil {
		return err
	}
	if e.End, err = parseTime("end", j.End); err != nil {
		return err
	}
	if j.Direction != "" {
		if e.Direction, ok = ParseDirection(j.Direction); !ok {
			return fmt.Errorf("direction: unknown direction %q (want ingress, egress or unknown)", j.Direction)
		}
	}
	e.Protocol = *j.Protocol
	if e.SrcAddr, err = parseAddr("src_ip", j.SrcIP); err != nil {
		return err
	}
	if e.DstAddr, err = parseAddr("dst_ip", j.DstIP); err != nil {
		return err
	}
	e.SrcPort, e.DstPort = j.SrcPort, j.DstPort
	e.ICMPType, e.ICMPCode = j.ICMPType, j.ICMPCode
	e.RxPackets, e.RxBytes, e.TxPackets, e.TxBytes = j.RxPackets, j.RxBytes, j.TxPackets, j.TxBytes
	e.RuleID, e.SrcResourceID, e.DstResourceID = j.RuleID, j.SrcResourceID, j.DstResourceID
	e.CommunityID, e.Source = j.CommunityID, j.Source
	e.Reconstructed = j.Reconstructed
	if e.WindowStart, err = parseTime("window_start", j.WindowStart); err != nil {
		return err
	}
	if e.WindowEnd, err = parseTime("window_end", j.WindowEnd); err != nil {
		return err
	}
	e.NumStarts, e.NumEnds, e.NumDrops = j.NumStarts, j.NumEnds, j.NumDrops
	return nil
}

func parseTime(key, s string) (Time, error) {
	if s == "" {
		return 0, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return 0, fmt.Errorf("%s: %q is not an RFC 3339 time", key, s)
	}
	return TimeOf(t), nil
}

func parseAddr(key, s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s: %q is not an IP address", key, s)
	}
	return a, nil
}
