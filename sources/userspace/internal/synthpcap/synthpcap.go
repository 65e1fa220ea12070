// Package synthpcap writes made-up packet captures (pcap, Ethernet, nanosecond timestamps)
// for the userspace source's tests and benchmarks (sources/userspace/internal/pcapgen, the
// command scripts/bench-replay.sh uses): connections between 10.1.0.0/16 clients and
// 10.2.0.0/16 servers, run in waves of 256 so that the packets of different connections
// interleave as on a busy host, frames cut to a snap length as `tcpdump -s` would.
package synthpcap

import (
	"bufio"
	"io"
	"net"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// Kind is what a connection of the capture is.
type Kind int

const (
	// TCP is a connection with a handshake, a request, a response in two segments, more data
	// and the close: 12 packets (TCPPackets).
	TCP Kind = iota
	// UDPExchange is a UDP request (to port 53) and its response.
	UDPExchange
	// UDPQuery is a single UDP datagram that got no answer (a lost query, a scan).
	UDPQuery
	// Ping is an ICMP echo request and its reply.
	Ping
)

// TCPPackets is how many packets a TCP connection has.
const TCPPackets = 12

// Options say what capture Write makes.
type Options struct {
	Conns int
	// Kind says what connection c (0 ≤ c < Conns) is.
	Kind func(c int) Kind
	// Snap is the bytes of each frame kept in the file (0: whole frames); the original
	// length stays in each record.
	Snap int
	// WaveGap, when not zero, starts wave i (connections 256·i to 256·i+255) at i·WaveGap;
	// packets otherwise follow one another a microsecond apart.
	WaveGap time.Duration
}

type step struct {
	fromClient bool
	flags      uint8
	size       int
}

// script is a TCP connection.
var script = [TCPPackets]step{
	{true, 0x02, 0}, {false, 0x12, 0}, {true, 0x10, 0},
	{true, 0x18, 200}, {false, 0x10, 1200}, {false, 0x18, 1200}, {true, 0x10, 0},
	{false, 0x18, 600}, {true, 0x10, 0},
	{true, 0x11, 0}, {false, 0x11, 0}, {true, 0x10, 0},
}

// Write writes the capture to w and returns how many packets it holds.
func Write(w io.Writer, o Options) (int, error) {
	bw := bufio.NewWriterSize(w, 1<<20)
	pw := pcapgo.NewWriterNanos(bw)
	if err := pw.WriteFileHeader(65535, layers.LinkTypeEthernet); err != nil {
		return 0, err
	}
	// The Ethernet header is written by hand: gopacket's pads short frames to 60 bytes, which
	// a capture on a veth does not show, and tshark would count the padding.
	eth := []byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00}
	frame := make([]byte, 0, 2048)
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := t0
	payload := make([]byte, 1200)
	n := 0
	emit := func(ls ...gopacket.SerializableLayer) error {
		if err := gopacket.SerializeLayers(buf, opts, ls...); err != nil {
			return err
		}
		data := append(append(frame[:0], eth...), buf.Bytes()...)
		ci := gopacket.CaptureInfo{Timestamp: at, CaptureLength: len(data), Length: len(data)}
		if o.Snap > 0 && len(data) > o.Snap {
			data, ci.CaptureLength = data[:o.Snap], o.Snap
		}
		at = at.Add(time.Microsecond)
		n++
		return pw.WritePacket(ci, data)
	}
	const wave = 256
	for base := 0; base < o.Conns; base += wave {
		if o.WaveGap > 0 {
			at = t0.Add(time.Duration(base/wave) * o.WaveGap)
		}
		for s := range script {
			for c := base; c < min(base+wave, o.Conns); c++ {
				cli := net.IP{10, 1, byte(c >> 8), byte(c)}
				srv := net.IP{10, 2, byte(c >> 16), byte(c >> 8)}
				var err error
				switch kind := o.Kind(c); kind {
				case UDPExchange, UDPQuery:
					if s >= 2 || (kind == UDPQuery && s >= 1) {
						continue
					}
					ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: cli, DstIP: srv}
					udp := &layers.UDP{SrcPort: layers.UDPPort(20000 + c%40000), DstPort: 53}
					size := 80
					if kind == UDPQuery {
						size = 40
					}
					if s == 1 {
						ip.SrcIP, ip.DstIP = srv, cli
						udp.SrcPort, udp.DstPort = udp.DstPort, udp.SrcPort
					}
					_ = udp.SetNetworkLayerForChecksum(ip)
					err = emit(ip, udp, gopacket.Payload(payload[:size]))
				case Ping:
					if s >= 2 {
						continue
					}
					ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: cli, DstIP: srv}
					icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: uint16(c), Seq: 1}
					if s == 1 {
						ip.SrcIP, ip.DstIP = srv, cli
						icmp.TypeCode = layers.CreateICMPv4TypeCode(0, 0)
					}
					err = emit(ip, icmp, gopacket.Payload(payload[:56]))
				default:
					err = emit(tcpPacket(c, s, cli, srv, payload)...)
				}
				if err != nil {
					return n, err
				}
			}
		}
	}
	return n, bw.Flush()
}

// tcpPacket is step s of TCP connection c.
func tcpPacket(c, s int, cli, srv net.IP, payload []byte) []gopacket.SerializableLayer {
	st := script[s]
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: cli, DstIP: srv}
	tcp := &layers.TCP{SrcPort: layers.TCPPort(20000 + c%40000), DstPort: 443, Window: 65535}
	// Sequence numbers: count what each side sent before this step.
	cseq, sseq := uint32(1000), uint32(5000)
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
	return []gopacket.SerializableLayer{ip, tcp, gopacket.Payload(payload[:st.size])}
}
