// Command pcapgen writes a made-up packet capture for benchmarks (scripts/bench-replay.sh):
// -conns connections between 10.1.0.0/16 clients and 10.2.0.0/16 servers in -packets
// packets, the connections that get more than one packet being TCP connections with a
// handshake, data both ways and a close (12 packets), the others single UDP datagrams (a
// query that got no answer, a scan), interleaved 256 at a time as on a busy host, one packet
// every microsecond. Frames are cut to -snap bytes as `tcpdump -s` would. The capture is
// package synthpcap's, which the userspace source's tests use too.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/flowpipe/flowpipe/sources/userspace/internal/synthpcap"
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
	tcpConns := (*packets - *conns) / (synthpcap.TCPPackets - 1)
	n, err := write(*out, *conns, tcpConns, *snap)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pcapgen:", err)
		os.Exit(1)
	}
	fmt.Printf("%s: %d packets, %d connections (%d TCP, %d UDP)\n", *out, n, *conns, tcpConns, *conns-tcpConns)
}

func write(path string, conns, tcpConns, snap int) (int, error) {
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	// Every conns/tcpConns-th connection is TCP, spread over the whole capture.
	every := conns + 1
	if tcpConns > 0 {
		every = conns / tcpConns
	}
	kind := func(c int) synthpcap.Kind {
		if c%every == 0 && c/every < tcpConns {
			return synthpcap.TCP
		}
		return synthpcap.UDPQuery
	}
	n, err := synthpcap.Write(f, synthpcap.Options{Conns: conns, Kind: kind, Snap: snap})
	if err != nil {
		return n, err
	}
	return n, f.Close()
}
