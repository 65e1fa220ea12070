// Command pcapgen writes a made-up packet capture for benchmarks (scripts/bench-replay.sh):
// -conns connections between 10.1.0.0/16 clients and 10.2.0.0/16 servers in -packets
// packets, the connections that get more than one packet being TCP connections with a
// handshake, data both ways and a close (12 packets), the others single UDP datagrams (a
// query that got no answer, a scan), interleaved 256 at a time as on a busy host, one packet
// every microsecond. Frames are cut to -snap bytes as `tcpdump -s` would.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

func main() {
	out := flag.String("o", "bench.pcap", "output file")
	conns := flag.Int("conns", 606000, "connections")
	packets := flag.Int("packets", 684000, "packets (at least conns)")
	snap := flag.Int("snap", 96, "bytes of each frame kept (0: all)")
	flag.Parse()
	if *packets < *conns {
		fmt.Fprintln(os.Stderr, "pcapgen: -packets must be at least -conns")
		os.Exit(2)
	}
	const tcpPackets = 12
	tcpConns := (*packets - *conns) / (tcpPackets - 1)
	n, err := write(*out, *conns, tcpConns, *snap)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pcapgen:", err)
		os.Exit(1)
	}
	fmt.Printf("%s: %d packets, %d connections (%d TCP, %d UDP)\n", *out, n, *conns, tcpConns, *conns-tcpConns)
}

type step struct {
	fromClient bool
	flags      uint8
	size       int
}

// script is a TCP connection: handshake, a request, a response in two segments, more data,
// the close.
var script = []step{
	{true, 0x02, 0}, {false, 0x12, 0}, {true, 0x10, 0},
	{true, 0x18, 200}, {false, 0x10, 1200}, {false, 0x18, 1200}, {true, 0x10, 0},
	{false, 0x18, 600}, {true, 0x10, 0},
	{true, 0x11, 0}, {false, 0x11, 0}, {true, 0x10, 0},
}

func write(path string, conns, tcpConns, snap int) (int, error) {
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	w := pcapgo.NewWriterNanos(bw)
	if err := w.WriteFileHeader(65535, layers.LinkTypeEthernet); err != nil {
		return 0, err
	}
	eth := []byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00}
	frame := make([]byte, 0, 2048)
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	payload := make([]byte, 1200)
	n := 0
	emit := func(ls ...gopacket.SerializableLayer) error {
		if err := gopacket.SerializeLayers(buf, opts, ls...); err != nil {
			return err
		}
		data := append(append(frame[:0], eth...), buf.Bytes()...)
		ci := gopacket.CaptureInfo{Timestamp: at, CaptureLength: len(data), Length: len(data)}
		if snap > 0 && len(data) > snap {
			data, ci.CaptureLength = data[:snap], snap
		}
		at = at.Add(time.Microsecond)
		n++
		return w.WritePacket(ci, data)
	}
	// Every conns/tcpConns-th connection is TCP, spread over the whole capture.
	every := conns + 1
	if tcpConns > 0 {
		every = conns / tcpConns
	}
	isTCP := func(c int) bool { return c%every == 0 && c/every < tcpConns }
	const wave = 256
	for base := 0; base < conns; base += wave {
		for s := range script {
			for c := base; c < min(base+wave, conns); c++ {
				cli := net.IP{10, 1, byte(c >> 8), byte(c)}
				srv := net.IP{10, 2, byte(c >> 16), byte(c >> 8)}
				if !isTCP(c) {
					if s > 0 {
						continue
					}
					ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: cli, DstIP: srv}
					udp := &layers.UDP{SrcPort: layers.UDPPort(20000 + c%40000), DstPort: 53}
					_ = udp.SetNetworkLayerForChecksum(ip)
					if err := emit(ip, udp, gopacket.Payload(payload[:40])); err != nil {
						return n, err
					}
					continue
				}
				st := script[s]
				ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: cli, DstIP: srv}
				tcp := &layers.TCP{SrcPort: layers.TCPPort(20000 + c%40000), DstPort: 443, Window: 65535}
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
				if err := emit(ip, tcp, gopacket.Payload(payload[:st.size])); err != nil {
					return n, err
				}
			}
		}
	}
	if err := bw.Flush(); err != nil {
		return n, err
	}
	return n, f.Close()
}
