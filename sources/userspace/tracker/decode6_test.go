package tracker

import (
	"encoding/binary"
	"testing"
)

func ip6(next uint8, payload []byte) []byte {
	b := make([]byte, 40, 40+len(payload))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(len(payload)))
	b[6], b[7] = next, 64
	copy(b[8:], addrA6.AsSlice())
	copy(b[24:], addrB6.AsSlice())
	return append(b, payload...)
}

func TestDecodeIPv6(t *testing.T) {
	udp := []byte{0x13, 0x88, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4}
	var p Packet
	if err := DecodeIP(ip6(17, udp), &p); err != nil || !p.IPv6 || p.Proto != 17 || p.SrcPort != 5000 || p.DstPort != 53 || p.Length != 52 || p.SrcAddr() != addrA6 {
		t.Fatalf("udp: %v %+v", err, p)
	}
	// Behind a hop-by-hop and a destination options header.
	ext := append([]byte{60, 0, 0, 0, 0, 0, 0, 0}, append([]byte{17, 0, 0, 0, 0, 0, 0, 0}, udp...)...)
	if err := DecodeIP(ip6(0, ext), &p); err != nil || p.Proto != 17 || p.DstPort != 53 {
		t.Fatalf("extension headers: %v %+v", err, p)
	}
	// A first fragment (offset 0, more to come) decodes like a whole packet.
	if err := DecodeIP(ip6(44, append([]byte{17, 0, 0, 1, 0, 0, 0, 7}, udp...)), &p); err != nil || p.Fragment != FirstFragment ||
		p.FragID != 7 || !p.MoreFragments || p.DstPort != 53 || p.HdrLen != 48 || p.Length != 52 {
		t.Fatalf("first fragment: %v %+v", err, p)
	}
	// A later one (offset 1480) has no ports.
	if err := DecodeIP(ip6(44, append([]byte{17, 0, 0x05, 0xc8, 0, 0, 0, 7}, 1, 2, 3, 4)), &p); err != nil || p.Fragment != LaterFragment ||
		p.FragID != 7 || p.MoreFragments || p.Proto != 17 || p.DstPort != 0 || p.HdrLen != 48 || p.Length != 52 {
		t.Fatalf("later fragment: %v %+v", err, p)
	}
	// An atomic fragment (offset 0, no more) is a whole packet.
	if err := DecodeIP(ip6(44, append([]byte{17, 0, 0, 0, 0, 0, 0, 7}, udp...)), &p); err != nil || p.Fragment != NotFragment || p.DstPort != 53 {
		t.Fatalf("atomic fragment: %v %+v", err, p)
	}
	echo := []byte{128, 0, 0, 0, 0x12, 0x34, 0, 1}
	if err := DecodeIP(ip6(58, echo), &p); err != nil || p.ICMPType != 128 || p.SrcPort != 0x1234 || p.DstPort != 0x1234 {
		t.Fatalf("echo: %v %+v", err, p)
	}
	// Destination unreachable quoting the UDP datagram.
	quoted := ip6(17, udp)
	unreach := append([]byte{1, 4, 0, 0, 0, 0, 0, 0}, quoted...)
	if err := DecodeIP(ip6(58, unreach), &p); err != nil || !p.Quoted.Valid || p.Quoted.Proto != 17 || p.Quoted.SrcPort != 5000 ||
		p.Quoted.DstPort != 53 || p.Quoted.Src != addrA6.As16() {
		t.Fatalf("unreachable: %v %+v", err, p)
	}
}

func TestDecodeICMPv4Error(t *testing.T) {
	inner := buildTCP4(t)
	b := make([]byte, 20, 28+len(inner))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(28+len(inner)))
	b[9] = 1
	copy(b[12:], addrB.AsSlice())
	copy(b[16:], addrA.AsSlice())
	b = append(b, 3, 3, 0, 0, 0, 0, 0, 0)
	b = append(b, inner...)
	var p Packet
	if err := DecodeIP(b, &p); err != nil || p.ICMPType != 3 || !p.Quoted.Valid || p.Quoted.Proto != 6 ||
		p.Quoted.SrcPort != 40000 || p.Quoted.DstPort != 443 || p.Quoted.Src != addrA.As16() {
		t.Fatalf("%v %+v", err, p)
	}
}
