package userspace

import (
	"net"
	"os"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// synthetic writes a pcap of conns made-up connections between 10.1.0.0/16 hosts (local) and
// 10.2.0.0/16 servers, interleaved: TCP connections with a handshake, data both ways and a
// close; UDP request/response pairs; pings. It returns the number of packets written.
func synthetic(tb testing.TB, path string, conns int) int {
	return syntheticSnap(tb, path, conns, 0)
}

// syntheticSnap is synthetic with frames cut to snap bytes in the file (0: whole frames), as
// `tcpdump -s` does; the original length stays in each record.
func syntheticSnap(tb testing.TB, path string, conns, snap int) int {
	tb.Helper()
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	w := pcapgo.NewWriterNanos(f)
	if err := w.WriteFileHeader(65535, layers.LinkTypeEthernet); err != nil {
		tb.Fatal(err)
	}
	// The Ethernet header is written by hand: gopacket's pads short frames to 60 bytes, which
	// a capture on a veth does not show, and tshark would count the padding.
	eth := []byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00}
	frame := make([]byte, 0, 2048)
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	payload := make([]byte, 1200)
	write := func(at time.Duration, ls ...gopacket.SerializableLayer) {
		if err := gopacket.SerializeLayers(buf, opts, ls...); err != nil {
			tb.Fatal(err)
		}
		data := append(append(frame[:0], eth...), buf.Bytes()...)
		ci := gopacket.CaptureInfo{Timestamp: t0.Add(at), CaptureLength: len(data), Length: len(data)}
		if snap > 0 && len(data) > snap {
			data = data[:snap]
			ci.CaptureLength = snap
		}
		if err := w.WritePacket(ci, data); err != nil {
			tb.Fatal(err)
		}
		n++
	}
	// Connections run in waves of 256 at a time so that the packets of different connections
	// interleave, as on a busy host.
	const wave = 256
	for base := 0; base < conns; base += wave {
		type step struct {
			fromClient bool
			flags      uint8
			size       int
		}
		script := []step{
			{true, 0x02, 0}, {false, 0x12, 0}, {true, 0x10, 0},
			{true, 0x18, 200}, {false, 0x10, 1200}, {false, 0x18, 1200}, {true, 0x10, 0},
			{false, 0x18, 600}, {true, 0x10, 0},
			{true, 0x11, 0}, {false, 0x11, 0}, {true, 0x10, 0},
		}
		at := time.Duration(base/wave) * 100 * time.Millisecond
		for s := range script {
			for c := base; c < min(base+wave, conns); c++ {
				cli := net.IP{10, 1, byte(c >> 8), byte(c)}
				srv := net.IP{10, 2, byte(c >> 16), byte(c >> 8)}
				at += time.Microsecond
				switch c % 8 {
				case 6: // UDP: request and response
					if s >= 2 {
						continue
					}
					ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: cli, DstIP: srv}
					udp := &layers.UDP{SrcPort: layers.UDPPort(20000 + c%40000), DstPort: 53}
					if s == 1 {
						ip.SrcIP, ip.DstIP = srv, cli
						udp.SrcPort, udp.DstPort = udp.DstPort, udp.SrcPort
					}
					_ = udp.SetNetworkLayerForChecksum(ip)
					write(at, ip, udp, gopacket.Payload(payload[:80]))
				case 7: // ping and answer
					if s >= 2 {
						continue
					}
					ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: cli, DstIP: srv}
					icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: uint16(c), Seq: 1}
					if s == 1 {
						ip.SrcIP, ip.DstIP = srv, cli
						icmp.TypeCode = layers.CreateICMPv4TypeCode(0, 0)
					}
					write(at, ip, icmp, gopacket.Payload(payload[:56]))
				default:
					st := script[s]
					ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: cli, DstIP: srv}
					tcp := &layers.TCP{SrcPort: layers.TCPPort(20000 + c%40000), DstPort: 443, Window: 65535}
					cseq, sseq := uint32(1000), uint32(5000)
					// Sequence numbers: count what each side sent before this step.
					for _, prev := range script[:s] {
						adv := uint32(prev.size)
						if prev.flags&0x03 != 0 {
							adv++
						}
						if prev.fromClient {
							cseq += adv
						} else {
							sseq += adv
						}
					}
					tcp.SYN, tcp.ACK, tcp.FIN, tcp.PSH = st.flags&0x02 != 0, st.flags&0x10 != 0, st.flags&0x01 != 0, st.flags&0x08 != 0
					if st.fromClient {
						tcp.Seq, tcp.Ack = cseq, sseq
					} else {
						ip.SrcIP, ip.DstIP = srv, cli
						tcp.SrcPort, tcp.DstPort = tcp.DstPort, tcp.SrcPort
						tcp.Seq, tcp.Ack = sseq, cseq
					}
					if !tcp.ACK {
						tcp.Ack = 0
					}
					_ = tcp.SetNetworkLayerForChecksum(ip)
					write(at, ip, tcp, gopacket.Payload(payload[:st.size]))
				}
			}
		}
	}
	return n
}
