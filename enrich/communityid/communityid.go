// Package communityid sets each event's community_id, the Community ID v1 flow hash
// (https://github.com/corelight/community-id-spec), so that flowpipe events can be joined with
// Zeek, Suricata, Elastic and Wireshark records of the same connection.
package communityid

import (
	"context"
	"crypto/sha1"
	"encoding/base64"
	"net/netip"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Config is the options of `type: community_id`.
type Config struct {
	// Seed separates ID domains; every tool that should produce matching IDs must use the
	// same seed. The spec's default is 0.
	Seed uint16 `yaml:"seed"`
	// Overwrite replaces a community_id the source already set; by default it is kept,
	// since a source that saw the packets knows the tuple at least as well.
	Overwrite bool `yaml:"overwrite"`
}

// Factory is the `type: community_id` enricher factory.
func Factory() component.Factory {
	return component.NewEnricherFactory("community_id",
		"sets community_id (Community ID v1 flow hash) for TCP, UDP, SCTP, ICMP and ICMPv6",
		func() *Config { return &Config{} },
		func(env component.Env, c *Config) (component.Enricher, error) {
			return &Enricher{seed: c.Seed, overwrite: c.Overwrite}, nil
		})
}

// Enricher computes community IDs; it keeps no state between batches and is safe for
// concurrent use.
type Enricher struct {
	seed      uint16
	overwrite bool
}

// Enrich sets CommunityID on every event that has addresses of one family and does not
// have an ID already (unless Overwrite).
func (e *Enricher) Enrich(_ context.Context, b *flow.Batch) error {
	for i := range b.Events {
		ev := &b.Events[i]
		if ev.CommunityID != "" && !e.overwrite {
			continue
		}
		ev.CommunityID = ForEvent(e.seed, ev)
	}
	return nil
}

// ForEvent is the Community ID of an event's flow, or "" when the event lacks the addresses
// to compute one (the spec allows an empty string for flows it does not cover).
func ForEvent(seed uint16, ev *flow.Event) string {
	if flow.IsICMP(ev.Protocol) {
		return ICMP(seed, ev.Protocol, ev.SrcAddr, ev.DstAddr, ev.ICMPType, ev.ICMPCode)
	}
	return V1(seed, ev.Protocol, ev.SrcAddr, ev.DstAddr, ev.SrcPort, ev.DstPort)
}

// hasPorts reports the protocols whose tuple includes ports, as in the spec: TCP, UDP and SCTP
// (ICMP is handled by ICMP, with its type and code standing in for ports).
func hasPorts(proto uint8) bool {
	return proto == flow.ProtoTCP || proto == flow.ProtoUDP || proto == flow.ProtoSCTP
}

// V1 is the Community ID v1 of a flow tuple. Ports are hashed for TCP, UDP and SCTP only;
// for any other protocol the ID covers the addresses and protocol. It returns "" when the
// addresses are invalid or of different families.
func V1(seed uint16, proto uint8, src, dst netip.Addr, sport, dport uint16) string {
	return hash(seed, proto, src, dst, sport, dport, hasPorts(proto), false)
}

// ICMP is the Community ID v1 of an ICMP (proto 1) or ICMPv6 (proto 58) flow: the type and a
// "counter-type" stand in for the ports, so that a request and its reply share the ID, while
// messages without a counterpart (errors, for example) keep their direction and use the code.
func ICMP(seed uint16, proto uint8, src, dst netip.Addr, typ, code uint8) string {
	sport, dport, oneWay := icmpPorts(proto, typ, code)
	return hash(seed, proto, src, dst, sport, dport, true, oneWay)
}

// icmpPorts maps an ICMP type and code to port equivalents the way Zeek does (and the spec
// follows): a request/reply type pairs with its counterpart; any other message is one way.
func icmpPorts(proto, typ, code uint8) (sport, dport uint16, oneWay bool) {
	var peer uint8
	var ok bool
	if proto == flow.ProtoICMP {
		peer, ok = icmp4Peer[typ]
	} else {
		peer, ok = icmp6Peer[typ]
	}
	if ok {
		return uint16(typ), uint16(peer), false
	}
	return uint16(typ), uint16(code), true
}

var icmp4Peer = map[uint8]uint8{
	8: 0, 0: 8, // echo request, echo reply
	13: 14, 14: 13, // timestamp
	15: 16, 16: 15, // information
	10: 9, 9: 10, // router solicitation, advertisement
	17: 18, 18: 17, // address mask
}

var icmp6Peer = map[uint8]uint8{
	128: 129, 129: 128, // echo request, echo reply
	130: 131, 131: 130, // multicast listener query, report
	133: 134, 134: 133, // router solicitation, advertisement
	135: 136, 136: 135, // neighbour solicitation, advertisement
	139: 140, 140: 139, // node information (who-are-you) query, reply
	144: 145, 145: 144, // home agent address discovery request, reply
}

func hash(seed uint16, proto uint8, src, dst netip.Addr, sport, dport uint16, ports, oneWay bool) string {
	if !src.IsValid() || !dst.IsValid() {
		return ""
	}
	// An IPv4-mapped IPv6 address is the IPv4 flow that Zeek and Suricata see.
	// Zones are local names, not part of the tuple on the wire.
	src, dst = src.Unmap().WithZone(""), dst.Unmap().WithZone("")
	if src.Is4() != dst.Is4() {
		return ""
	}
	if !oneWay {
		if c := src.Compare(dst); c > 0 || (c == 0 && ports && sport > dport) {
			src, dst = dst, src
			sport, dport = dport, sport
		}
	}
	// seed(2) saddr(4|16) daddr(4|16) proto(1) pad(1) sport(2) dport(2): at most 40 bytes,
	// kept on the stack.
	var buf [40]byte
	b := append(buf[:0], byte(seed>>8), byte(seed))
	b = appendAddr(b, src)
	b = appendAddr(b, dst)
	b = append(b, proto, 0)
	if ports {
		b = append(b, byte(sport>>8), byte(sport), byte(dport>>8), byte(dport))
	}
	sum := sha1.Sum(b)
	var out [2 + 28]byte
	out[0], out[1] = '1', ':'
	base64.StdEncoding.Encode(out[2:], sum[:])
	return string(out[:])
}

func appendAddr(b []byte, a netip.Addr) []byte {
	if a.Is4() {
		a4 := a.As4()
		return append(b, a4[:]...)
	}
	a16 := a.As16()
	return append(b, a16[:]...)
}
