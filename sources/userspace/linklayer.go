package userspace

import (
	"encoding/binary"
	"errors"

	"github.com/gopacket/gopacket/layers"

	"github.com/flowpipe/flowpipe/sources/userspace/tracker"
)

// errNotIP is a frame that carries no IP packet (ARP, LLDP…) or has a link type this source
// does not read.
var errNotIP = errors.New("not an IP packet")

// reason is the metric label of a decoding failure.
func reason(err error) string {
	if err == errNotIP {
		return "not_ip"
	}
	return tracker.ReasonOf(err)
}

// decodeFrame finds the IP packet in a captured frame of the given link type and decodes it.
func decodeFrame(link layers.LinkType, b []byte, p *tracker.Packet) error {
	var etype uint16
	switch link {
	case layers.LinkTypeEthernet:
		if len(b) < 14 {
			return tracker.ErrTruncated
		}
		etype, b = binary.BigEndian.Uint16(b[12:14]), b[14:]
		for etype == 0x8100 || etype == 0x88a8 { // 802.1Q and 802.1ad VLAN tags
			if len(b) < 4 {
				return tracker.ErrTruncated
			}
			etype, b = binary.BigEndian.Uint16(b[2:4]), b[4:]
		}
	case layers.LinkTypeLinuxSLL:
		if len(b) < 16 {
			return tracker.ErrTruncated
		}
		etype, b = binary.BigEndian.Uint16(b[14:16]), b[16:]
	case layers.LinkTypeLinuxSLL2:
		if len(b) < 20 {
			return tracker.ErrTruncated
		}
		etype, b = binary.BigEndian.Uint16(b[0:2]), b[20:]
	case layers.LinkTypeRaw, layers.LinkTypeIPv4, layers.LinkTypeIPv6, 12: // 12: DLT_RAW on some systems
		return tracker.DecodeIP(b, p)
	case layers.LinkTypeNull, layers.LinkTypeLoop:
		if len(b) < 4 {
			return tracker.ErrTruncated
		}
		// The BSD loopback family is a 4-byte word in the capturing host's byte order (Null)
		// or network order (Loop); its value is small, so it is in the first or last byte.
		// IPv4 is 2 and IPv6 is 24, 28 or 30 depending on the system.
		switch b[0] | b[3] {
		case 2, 24, 28, 30:
			return tracker.DecodeIP(b[4:], p)
		}
		return errNotIP
	default:
		return errNotIP
	}
	switch etype {
	case 0x0800, 0x86dd:
		return tracker.DecodeIP(b, p)
	}
	return errNotIP
}
