package syslog

import (
	"net/netip"
	"strconv"
	"unicode/utf8"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/schema"
)

// header holds the fixed parts of every message's header.
type header struct {
	pri    []byte // "<PRI>1 "
	middle []byte // " HOSTNAME APP-NAME PROCID "
	sdID   string
	json   bool
}

// appendMessage appends one RFC 5424 message (without framing):
// <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD [MSG]
// te formats times (it caches the second, which a batch's events mostly share).
func (h *header) appendMessage(dst []byte, enc *schema.Encoder, te *flow.Encoder, e *flow.Event) []byte {
	dst = append(dst, h.pri...)
	ts := e.Timestamp
	if ts == 0 {
		ts = flow.Now()
	}
	// RFC 5424 allows at most six fractional digits: cut flowpipe's nine to six.
	n := len(dst)
	dst = te.AppendTime(dst, ts)
	if len(dst)-n == len("2006-01-02T15:04:05.000000000Z") {
		dst = append(dst[:len(dst)-4], 'Z')
	}
	dst = append(dst, h.middle...)
	dst = append(dst, "flow-"...) // MSGID: flow-start, flow-end, flow-drop, flow-aggregate
	dst = append(dst, e.Type.String()...)
	if h.json {
		dst = append(dst, " - "...)
		return enc.Append(dst, e)
	}
	dst = append(dst, " ["...)
	dst = append(dst, h.sdID...)
	dst = appendSD(dst, te, e)
	dst = append(dst, "] "...)
	return appendText(dst, e)
}

// appendSD appends the event's SD-PARAMs: the keys of docs/schema.md, present when the JSON
// form has them.
func appendSD(dst []byte, te *flow.Encoder, e *flow.Event) []byte {
	dst = param(dst, "event_id", "")
	dst = flow.AppendUUID(dst, e.EventID)
	dst = param(append(dst, '"'), "flow_id", "")
	dst = flow.AppendUUID(dst, e.FlowID)
	dst = append(dst, '"')
	dst = param(dst, "type", e.Type.String())
	dst = append(dst, '"')
	for _, t := range []struct {
		k string
		v flow.Time
	}{{"timestamp", e.Timestamp}, {"start", e.Start}, {"end", e.End}} {
		if t.v != 0 || t.k == "timestamp" {
			dst = te.AppendTime(param(dst, t.k, ""), t.v)
			dst = append(dst, '"')
		}
	}
	dst = append(param(dst, "direction", e.Direction.String()), '"')
	dst = uintParam(dst, "protocol", uint64(e.Protocol))
	dst = addrParam(dst, "src_ip", e.SrcAddr.IsValid(), e)
	dst = addrParam(dst, "dst_ip", e.DstAddr.IsValid(), e)
	if flow.IsICMP(e.Protocol) {
		dst = uintParam(dst, "icmp_type", uint64(e.ICMPType))
		dst = uintParam(dst, "icmp_code", uint64(e.ICMPCode))
	} else {
		dst = uintParam(dst, "src_port", uint64(e.SrcPort))
		dst = uintParam(dst, "dst_port", uint64(e.DstPort))
	}
	dst = uintParam(dst, "rx_packets", e.RxPackets)
	dst = uintParam(dst, "rx_bytes", e.RxBytes)
	dst = uintParam(dst, "tx_packets", e.TxPackets)
	dst = uintParam(dst, "tx_bytes", e.TxBytes)
	dst = strParam(dst, "rule_id", e.RuleID)
	dst = strParam(dst, "src_resource_id", e.SrcResourceID)
	dst = strParam(dst, "dst_resource_id", e.DstResourceID)
	if e.CommunityID != "" {
		dst = strParam(dst, "community_id", e.CommunityID)
	}
	dst = strParam(dst, "source", e.Source)
	if e.Reconstructed {
		dst = append(param(dst, "reconstructed", "true"), '"')
	}
	if e.Type == flow.TypeAggregate {
		dst = append(te.AppendTime(param(dst, "window_start", ""), e.WindowStart), '"')
		dst = append(te.AppendTime(param(dst, "window_end", ""), e.WindowEnd), '"')
		dst = uintParam(dst, "num_starts", e.NumStarts)
		dst = uintParam(dst, "num_ends", e.NumEnds)
		dst = uintParam(dst, "num_drops", e.NumDrops)
	}
	return dst
}

// param appends ` name="` and v, escaped, leaving the value open for more.
func param(dst []byte, name, v string) []byte {
	dst = append(dst, ' ')
	dst = append(dst, name...)
	dst = append(dst, '=', '"')
	return appendEscaped(dst, v)
}

func strParam(dst []byte, name, v string) []byte { return append(param(dst, name, v), '"') }

func uintParam(dst []byte, name string, v uint64) []byte {
	return append(strconv.AppendUint(param(dst, name, ""), v, 10), '"')
}

func addrParam(dst []byte, name string, valid bool, e *flow.Event) []byte {
	dst = param(dst, name, "")
	if valid {
		if name == "src_ip" {
			dst = e.SrcAddr.AppendTo(dst)
		} else {
			dst = e.DstAddr.AppendTo(dst)
		}
	}
	return append(dst, '"')
}

// appendEscaped escapes '"', '\' and ']' as RFC 5424 section 6.3.3 requires; invalid UTF-8
// becomes U+FFFD (PARAM-VALUE is UTF-8).
func appendEscaped(dst []byte, s string) []byte {
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c == '"' || c == '\\' || c == ']' {
				dst = append(dst, '\\')
			}
			dst = append(dst, c)
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = utf8.AppendRune(dst, utf8.RuneError)
		} else {
			dst = append(dst, s[i:i+size]...)
		}
		i += size
	}
	return dst
}

// appendText is the short human-readable MSG beside the structured data, e.g.
// "end tcp 10.0.0.19:56872 -> 203.0.113.71:443 egress".
func appendText(dst []byte, e *flow.Event) []byte {
	dst = append(dst, e.Type.String()...)
	dst = append(dst, ' ')
	switch e.Protocol {
	case flow.ProtoTCP:
		dst = append(dst, "tcp"...)
	case flow.ProtoUDP:
		dst = append(dst, "udp"...)
	case flow.ProtoICMP:
		dst = append(dst, "icmp"...)
	case flow.ProtoICMPv6:
		dst = append(dst, "icmpv6"...)
	default:
		dst = append(dst, "proto "...)
		dst = strconv.AppendUint(dst, uint64(e.Protocol), 10)
	}
	dst = append(dst, ' ')
	icmp := flow.IsICMP(e.Protocol)
	dst = appendHostPort(dst, e.SrcAddr, e.SrcPort, icmp)
	dst = append(dst, " -> "...)
	dst = appendHostPort(dst, e.DstAddr, e.DstPort, icmp)
	dst = append(dst, ' ')
	return append(dst, e.Direction.String()...)
}

func appendHostPort(dst []byte, a netip.Addr, port uint16, icmp bool) []byte {
	if !a.IsValid() {
		dst = append(dst, '-')
	} else if icmp || !a.Is6() {
		dst = a.AppendTo(dst)
	} else {
		dst = append(dst, '[')
		dst = a.AppendTo(dst)
		dst = append(dst, ']')
	}
	if icmp {
		return dst
	}
	dst = append(dst, ':')
	return strconv.AppendUint(dst, uint64(port), 10)
}
