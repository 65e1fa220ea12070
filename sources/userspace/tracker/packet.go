package tracker

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

// TCP flags as they appear in the TCP header.
const (
	FlagFIN uint8 = 0x01
	FlagSYN uint8 = 0x02
	FlagRST uint8 = 0x04
	FlagPSH uint8 = 0x08
	FlagACK uint8 = 0x10
)

// Packet is what the tracker needs to know about one IP packet. Addresses are 16 bytes, IPv4
// in its IPv4-mapped IPv6 form (::ffff:a.b.c.d), so that a packet is a plain value that a
// decoder fills without allocating.
type Packet struct {
	Src, Dst [16]byte
	IPv6     bool
	Proto    uint8 // IANA protocol number of the transport header (after IPv6 extensions)

	// TCP and UDP ports. For ICMP and ICMPv6 queries (echo and the like) both hold the
	// query identifier, so that a request and its reply share a connection.
	SrcPort, DstPort uint16

	TCPFlags   uint8
	Seq, Ack   uint32
	PayloadLen uint32 // TCP segment data length, from the headers (not the captured length)

	ICMPType, ICMPCode uint8

	// Length is the IP packet length from its header (IPv4 total length; IPv6 payload length
	// plus the 40-byte header): what the packet counts for in byte counters. For the first
	// fragment of an IPv6 datagram it leaves out the fragment header, which reassembly drops.
	Length uint32

	// Quoted is the packet an ICMP or ICMPv6 error quotes, as its original sender sent it.
	Quoted Quoted

	// Fragment says whether the packet is a fragment of a larger datagram. Only the first
	// fragment carries the transport header; the tracker attributes the later ones to the
	// first one's connection by FragID and counts the datagram once, with its reassembled
	// length, as the kernel counts it after reassembly.
	Fragment      FragmentKind
	FragID        uint32 // IPv4 identification or IPv6 fragment identification
	MoreFragments bool
	HdrLen        uint16 // bytes of IP header before the fragment's data (IPv6: up to and with the fragment header)
}

// FragmentKind tells whole packets from fragments.
type FragmentKind uint8

const (
	NotFragment   FragmentKind = iota
	FirstFragment              // offset 0, more to come: carries the transport header
	LaterFragment              // offset > 0: data only
)

// Quoted is the header of the packet quoted by an ICMP error.
type Quoted struct {
	Valid            bool
	Src, Dst         [16]byte
	Proto            uint8
	SrcPort, DstPort uint16 // for a quoted ICMP query, its identifier in both
}

// SrcAddr is the source address as a netip.Addr (IPv4 unmapped).
func (p *Packet) SrcAddr() netip.Addr { return addrOf(p.Src, p.IPv6) }

// DstAddr is the destination address as a netip.Addr (IPv4 unmapped).
func (p *Packet) DstAddr() netip.Addr { return addrOf(p.Dst, p.IPv6) }

// SetAddrs sets Src, Dst and IPv6 from netip addresses of the same family; for embedders
// that build packets from already-parsed headers.
func (p *Packet) SetAddrs(src, dst netip.Addr) {
	p.Src, p.Dst = src.As16(), dst.As16()
	p.IPv6 = src.Is6() && !src.Is4In6()
}

func addrOf(a [16]byte, v6 bool) netip.Addr {
	ad := netip.AddrFrom16(a)
	if !v6 {
		return ad.Unmap()
	}
	return ad
}

// Decoding errors. Each is a distinct reason to count; ReasonOf gives its metric label.
var (
	ErrTruncated   = errors.New("truncated packet")
	ErrMalformed   = errors.New("malformed packet")
	ErrUnsupported = errors.New("unsupported protocol")
)

// ReasonOf is the short, stable label of a decoding error, for metrics and logs.
func ReasonOf(err error) string {
	switch err {
	case nil:
		return ""
	case ErrTruncated:
		return "truncated"
	case ErrMalformed:
		return "malformed"
	case ErrUnsupported:
		return "unsupported"
	}
	return "other"
}

// IANA numbers of the IPv6 extension headers that DecodeIP steps over.
const (
	ip6HopByHop = 0
	ip6Routing  = 43
	ip6Fragment = 44
	ip6ESP      = 50
	ip6AH       = 51
	ip6NoNext   = 59
	ip6DestOpts = 60
	ip6Mobility = 135
)

// DecodeIP fills p from an IPv4 or IPv6 packet that starts at b[0]. b may be cut short by a
// capture's snap length: only the IP and transport headers (and for an ICMP error, the quoted
// headers) must be present, and lengths come from the headers. It never allocates and never
// reads outside b.
//
// Fragments decode without error: a first fragment like a whole packet, a later one with
// its addresses, protocol and fragment identification only (Packet.Fragment). Protocols other
// than TCP, UDP, ICMP and ICMPv6 are ErrUnsupported.
func DecodeIP(b []byte, p *Packet) error {
	*p = Packet{}
	if len(b) < 1 {
		return ErrTruncated
	}
	switch b[0] >> 4 {
	case 4:
		return decode4(b, p)
	case 6:
		return decode6(b, p)
	}
	return ErrMalformed
}

// v4InV6Prefix is the first 12 bytes of an IPv4-mapped IPv6 address.
var v4InV6Prefix = [12]byte{10: 0xff, 11: 0xff}

func decode4(b []byte, p *Packet) error {
	if len(b) < 20 {
		return ErrTruncated
	}
	ihl := int(b[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(b[2:4]))
	if ihl < 20 || total < ihl {
		return ErrMalformed
	}
	if len(b) < ihl {
		return ErrTruncated
	}
	p.Length = uint32(total)
	p.Proto = b[9]
	copy(p.Src[:12], v4InV6Prefix[:])
	copy(p.Src[12:], b[12:16])
	copy(p.Dst[:12], v4InV6Prefix[:])
	copy(p.Dst[12:], b[16:20])
	p.HdrLen = uint16(ihl)
	if frag := binary.BigEndian.Uint16(b[6:8]); frag&0x3fff != 0 { // MF set or offset > 0
		p.FragID = uint32(binary.BigEndian.Uint16(b[4:6]))
		p.MoreFragments = frag&0x2000 != 0
		if frag&0x1fff != 0 {
			p.Fragment = LaterFragment
			return trackable(p.Proto)
		}
		p.Fragment = FirstFragment
	}
	l4 := b[ihl:]
	l4len := total - ihl
	if len(l4) > l4len {
		l4 = l4[:l4len] // drop link-layer padding
	}
	return decodeL4(l4, l4len, p)
}

func decode6(b []byte, p *Packet) error {
	if len(b) < 40 {
		return ErrTruncated
	}
	payload := int(binary.BigEndian.Uint16(b[4:6]))
	if payload == 0 {
		return ErrUnsupported // a jumbogram, whose length is in a hop-by-hop option
	}
	p.IPv6 = true
	p.Length = uint32(payload) + 40
	copy(p.Src[:], b[8:24])
	copy(p.Dst[:], b[24:40])
	next := b[6]
	rest := b[40:]
	if len(rest) > payload {
		rest = rest[:payload]
	}
	l4len := payload
	hdr := 40
	for {
		switch next {
		case ip6HopByHop, ip6Routing, ip6DestOpts, ip6Mobility:
			if len(rest) < 8 {
				return ErrTruncated
			}
			n := (int(rest[1]) + 1) * 8
			if n > l4len {
				return ErrMalformed
			}
			if len(rest) < n {
				return ErrTruncated
			}
			next, rest, l4len, hdr = rest[0], rest[n:], l4len-n, hdr+n
		case ip6AH:
			if len(rest) < 8 {
				return ErrTruncated
			}
			n := (int(rest[1]) + 2) * 4
			if n > l4len {
				return ErrMalformed
			}
			if len(rest) < n {
				return ErrTruncated
			}
			next, rest, l4len, hdr = rest[0], rest[n:], l4len-n, hdr+n
		case ip6Fragment:
			if l4len < 8 {
				return ErrMalformed
			}
			if len(rest) < 8 {
				return ErrTruncated
			}
			off := binary.BigEndian.Uint16(rest[2:4])
			next, hdr = rest[0], hdr+8
			if off&0xfff9 != 0 { // an offset or more fragments: a real fragment
				p.FragID = binary.BigEndian.Uint32(rest[4:8])
				p.MoreFragments = off&1 != 0
				if off>>3 != 0 {
					p.Fragment, p.Proto, p.HdrLen = LaterFragment, next, uint16(hdr)
					return trackable(next)
				}
				p.Fragment = FirstFragment
				// Reassembly drops the fragment header: the datagram counts without it.
				p.Length -= 8
			}
			// A first fragment (or an atomic one, RFC 6946) goes on to its headers.
			rest, l4len = rest[8:], l4len-8
		default:
			p.Proto, p.HdrLen = next, uint16(hdr)
			return decodeL4(rest, l4len, p)
		}
	}
}

// trackable is the error for a later fragment of a protocol the tracker does not follow.
func trackable(proto uint8) error {
	switch proto {
	case 6, 17, 1, 58:
		return nil
	}
	return ErrUnsupported
}

// decodeL4 decodes the transport header in b (captured bytes) of a segment whose length
// per the IP header is l4len.
func decodeL4(b []byte, l4len int, p *Packet) error {
	switch p.Proto {
	case 6: // TCP
		if l4len < 20 {
			return ErrMalformed
		}
		if len(b) < 20 {
			return ErrTruncated
		}
		off := int(b[12]>>4) * 4
		if off < 20 || off > l4len {
			return ErrMalformed
		}
		p.SrcPort = binary.BigEndian.Uint16(b[0:2])
		p.DstPort = binary.BigEndian.Uint16(b[2:4])
		p.Seq = binary.BigEndian.Uint32(b[4:8])
		p.Ack = binary.BigEndian.Uint32(b[8:12])
		p.TCPFlags = b[13] & 0x3f
		p.PayloadLen = uint32(l4len - off)
		return nil
	case 17: // UDP
		if l4len < 8 {
			return ErrMalformed
		}
		if len(b) < 8 {
			return ErrTruncated
		}
		p.SrcPort = binary.BigEndian.Uint16(b[0:2])
		p.DstPort = binary.BigEndian.Uint16(b[2:4])
		return nil
	case 1:
		return decodeICMP(b, l4len, p, false)
	case 58:
		return decodeICMP(b, l4len, p, true)
	}
	return ErrUnsupported
}

func decodeICMP(b []byte, l4len int, p *Packet, v6 bool) error {
	if l4len < 8 {
		return ErrMalformed
	}
	if len(b) < 8 {
		return ErrTruncated
	}
	p.ICMPType, p.ICMPCode = b[0], b[1]
	if _, ok := icmpQuery(p.ICMPType, v6); ok {
		id := binary.BigEndian.Uint16(b[4:6])
		p.SrcPort, p.DstPort = id, id
		return nil
	}
	if icmpError(p.ICMPType, v6) {
		// An error quotes the offending packet; failing to read the quote leaves the error
		// unattributed, which is not a reason to drop the packet itself.
		decodeQuoted(b[8:], &p.Quoted, v6)
	}
	return nil
}

// decodeQuoted reads the IP header and the first 8 bytes of the transport header that an ICMP
// error quotes.
func decodeQuoted(b []byte, q *Quoted, v6 bool) {
	var l4 []byte
	if !v6 {
		if len(b) < 20 || b[0]>>4 != 4 {
			return
		}
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 || len(b) < ihl {
			return
		}
		if binary.BigEndian.Uint16(b[6:8])&0x1fff != 0 {
			return // a non-first fragment quotes no ports
		}
		q.Proto = b[9]
		copy(q.Src[:12], v4InV6Prefix[:])
		copy(q.Src[12:], b[12:16])
		copy(q.Dst[:12], v4InV6Prefix[:])
		copy(q.Dst[12:], b[16:20])
		l4 = b[ihl:]
	} else {
		if len(b) < 40 || b[0]>>4 != 6 {
			return
		}
		copy(q.Src[:], b[8:24])
		copy(q.Dst[:], b[24:40])
		next, rest := b[6], b[40:]
	ext:
		for {
			switch next {
			case ip6HopByHop, ip6Routing, ip6DestOpts, ip6Mobility:
				if len(rest) < 8 || len(rest) < (int(rest[1])+1)*8 {
					return
				}
				next, rest = rest[0], rest[(int(rest[1])+1)*8:]
			default:
				break ext
			}
		}
		q.Proto, l4 = next, rest
	}
	switch q.Proto {
	case 6, 17:
		if len(l4) < 4 {
			return
		}
		q.SrcPort = binary.BigEndian.Uint16(l4[0:2])
		q.DstPort = binary.BigEndian.Uint16(l4[2:4])
	case 1, 58:
		if len(l4) < 8 {
			return
		}
		if _, ok := icmpQuery(l4[0], q.Proto == 58); !ok {
			return
		}
		id := binary.BigEndian.Uint16(l4[4:6])
		q.SrcPort, q.DstPort = id, id
	default:
		return
	}
	q.Valid = true
}

// icmpQuery reports whether typ is a query or an answer that the tracker follows by
// identifier, and the type of the request it belongs with.
func icmpQuery(typ uint8, v6 bool) (request uint8, ok bool) {
	if v6 {
		switch typ {
		case 128, 129: // echo request, reply
			return 128, true
		case 139, 140: // node information query, response
			return 139, true
		}
		return 0, false
	}
	switch typ {
	case 8, 0: // echo
		return 8, true
	case 13, 14: // timestamp
		return 13, true
	case 15, 16: // information
		return 15, true
	case 17, 18: // address mask
		return 17, true
	}
	return 0, false
}

// icmpIsRequest reports whether typ opens an ICMP query connection.
func icmpIsRequest(typ uint8, v6 bool) bool {
	r, ok := icmpQuery(typ, v6)
	return ok && r == typ
}

func icmpError(typ uint8, v6 bool) bool {
	if v6 {
		return typ >= 1 && typ <= 4 // unreachable, too big, time exceeded, parameter problem
	}
	switch typ {
	case 3, 4, 5, 11, 12: // unreachable, source quench, redirect, time exceeded, parameter problem
		return true
	}
	return false
}
