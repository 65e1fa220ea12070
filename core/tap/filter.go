// Package tap lets a user watch the events that pass a point of a running pipeline: after a
// source, after an enricher, into a sink. It holds the filters (one syntax shared by the
// CLI, the admin API and the page), the hub of each tap point (a bounded ring of recent
// events and subscribers with bounded buffers, so that a tap never blocks the pipeline), and
// the top-talkers aggregation behind `flowpipe top`.
package tap

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Filter selects events: an event matches when it matches every term of at least one group
// (AND within a group, OR across groups). The empty filter matches everything.
type Filter struct {
	Groups []Group
}

// Group is terms that must all match.
type Group []Term

// Term is one condition: a key and the values any of which may match, possibly negated.
type Term struct {
	Not    bool
	Key    string
	Values []string // as written, for String

	prefixes []netip.Prefix
	ports    []uint16
	protos   []uint8
	types    []flow.Type
	dirs     []flow.Direction
	strs     []string
}

// Keys are the filter keys, in the order the docs list them.
var Keys = []string{"ip", "src", "dst", "port", "src-port", "dst-port", "proto", "type", "direction", "rule", "resource", "src-resource", "dst-resource"}

// ParseGroup parses one group: whitespace-separated terms `[!]key=value[,value...]`, for
// example `src=10.0.0.0/8 !dst-port=53,853 proto=udp`. Values of one term are alternatives.
func ParseGroup(s string) (Group, error) {
	var g Group
	for _, f := range strings.Fields(s) {
		not := false
		if f == "!" || f == "not" {
			return nil, fmt.Errorf("%q: write the negation against its term, as !key=value", f)
		}
		if strings.HasPrefix(f, "!") {
			not, f = true, f[1:]
		}
		key, val, ok := strings.Cut(f, "=")
		if !ok || val == "" {
			return nil, fmt.Errorf("%q: want key=value (keys: %s)", f, strings.Join(Keys, ", "))
		}
		t, err := NewTerm(not, key, strings.Split(val, ","))
		if err != nil {
			return nil, err
		}
		g = append(g, t)
	}
	return g, nil
}

// ParseFilter parses groups written as ParseGroup's syntax, each string one group. Empty
// strings are ignored.
func ParseFilter(groups []string) (*Filter, error) {
	f := &Filter{}
	for _, s := range groups {
		g, err := ParseGroup(s)
		if err != nil {
			return nil, err
		}
		if len(g) > 0 {
			f.Groups = append(f.Groups, g)
		}
	}
	return f, nil
}

// NewTerm checks and compiles one term.
func NewTerm(not bool, key string, values []string) (Term, error) {
	t := Term{Not: not, Key: key}
	for _, v := range values {
		v = strings.TrimSpace(v)
		if v == "" {
			return t, fmt.Errorf("%s: empty value", key)
		}
		t.Values = append(t.Values, v)
		switch key {
		case "ip", "src", "dst":
			p, err := parsePrefix(v)
			if err != nil {
				return t, fmt.Errorf("%s=%s: want an IP address or CIDR prefix", key, v)
			}
			t.prefixes = append(t.prefixes, p)
		case "port", "src-port", "dst-port":
			n, err := strconv.ParseUint(v, 10, 16)
			if err != nil {
				return t, fmt.Errorf("%s=%s: want a port number 0-65535", key, v)
			}
			t.ports = append(t.ports, uint16(n))
		case "proto":
			p, ok := parseProto(v)
			if !ok {
				return t, fmt.Errorf("proto=%s: want tcp, udp, icmp, icmpv6, sctp or a protocol number", v)
			}
			t.protos = append(t.protos, p)
		case "type":
			ty, ok := flow.ParseType(v)
			if !ok || ty == flow.TypeUnknown {
				return t, fmt.Errorf("type=%s: want start, end, drop or aggregate", v)
			}
			t.types = append(t.types, ty)
		case "direction":
			d, ok := flow.ParseDirection(v)
			if !ok || d == flow.DirectionUnknown {
				return t, fmt.Errorf("direction=%s: want ingress or egress", v)
			}
			t.dirs = append(t.dirs, d)
		case "rule", "resource", "src-resource", "dst-resource":
			t.strs = append(t.strs, v)
		default:
			return t, fmt.Errorf("unknown filter key %q (keys: %s)", key, strings.Join(Keys, ", "))
		}
	}
	if len(t.Values) == 0 {
		return t, fmt.Errorf("%s: no value", key)
	}
	return t, nil
}

func parsePrefix(v string) (netip.Prefix, error) {
	if strings.Contains(v, "/") {
		p, err := netip.ParsePrefix(v)
		return p.Masked(), err
	}
	a, err := netip.ParseAddr(v)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a.Unmap(), a.BitLen()), nil
}

var protoNames = map[string]uint8{"tcp": flow.ProtoTCP, "udp": flow.ProtoUDP, "icmp": flow.ProtoICMP, "icmpv6": flow.ProtoICMPv6, "sctp": flow.ProtoSCTP}

func parseProto(v string) (uint8, bool) {
	if p, ok := protoNames[strings.ToLower(v)]; ok {
		return p, true
	}
	n, err := strconv.ParseUint(v, 10, 8)
	return uint8(n), err == nil
}

// ProtoName is the protocol's usual name, or its number.
func ProtoName(p uint8) string {
	for n, v := range protoNames {
		if v == p {
			return n
		}
	}
	return strconv.Itoa(int(p))
}

// Match reports whether e matches the filter.
func (f *Filter) Match(e *flow.Event) bool {
	if f == nil || len(f.Groups) == 0 {
		return true
	}
	for _, g := range f.Groups {
		if g.Match(e) {
			return true
		}
	}
	return false
}

// Match reports whether e matches every term of g.
func (g Group) Match(e *flow.Event) bool {
	for i := range g {
		if g[i].Match(e) == g[i].Not {
			return false
		}
	}
	return true
}

// Match reports whether e matches the term, ignoring Not.
func (t *Term) Match(e *flow.Event) bool {
	switch t.Key {
	case "ip":
		return inAny(t.prefixes, e.SrcAddr) || inAny(t.prefixes, e.DstAddr)
	case "src":
		return inAny(t.prefixes, e.SrcAddr)
	case "dst":
		return inAny(t.prefixes, e.DstAddr)
	case "port":
		return !flow.IsICMP(e.Protocol) && (hasPort(t.ports, e.SrcPort) || hasPort(t.ports, e.DstPort))
	case "src-port":
		return !flow.IsICMP(e.Protocol) && hasPort(t.ports, e.SrcPort)
	case "dst-port":
		return !flow.IsICMP(e.Protocol) && hasPort(t.ports, e.DstPort)
	case "proto":
		for _, p := range t.protos {
			if p == e.Protocol {
				return true
			}
		}
	case "type":
		for _, ty := range t.types {
			if ty == e.Type {
				return true
			}
		}
	case "direction":
		for _, d := range t.dirs {
			if d == e.Direction {
				return true
			}
		}
	case "rule":
		return hasString(t.strs, e.RuleID)
	case "resource":
		return hasString(t.strs, e.SrcResourceID) || hasString(t.strs, e.DstResourceID)
	case "src-resource":
		return hasString(t.strs, e.SrcResourceID)
	case "dst-resource":
		return hasString(t.strs, e.DstResourceID)
	}
	return false
}

func inAny(ps []netip.Prefix, a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func hasPort(ps []uint16, p uint16) bool {
	for _, q := range ps {
		if q == p {
			return true
		}
	}
	return false
}

func hasString(ss []string, s string) bool {
	for _, q := range ss {
		if q == s {
			return true
		}
	}
	return false
}

// String writes the term in ParseGroup's syntax.
func (t Term) String() string {
	s := t.Key + "=" + strings.Join(t.Values, ",")
	if t.Not {
		return "!" + s
	}
	return s
}

// String writes the group in ParseGroup's syntax.
func (g Group) String() string {
	parts := make([]string, len(g))
	for i, t := range g {
		parts[i] = t.String()
	}
	return strings.Join(parts, " ")
}

// Strings is the filter as groups in ParseGroup's syntax (the `filter` query parameters).
func (f *Filter) Strings() []string {
	if f == nil {
		return nil
	}
	out := make([]string, len(f.Groups))
	for i, g := range f.Groups {
		out[i] = g.String()
	}
	return out
}
