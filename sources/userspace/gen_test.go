package userspace

import (
	"os"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/sources/userspace/internal/synthpcap"
)

// synthetic writes a pcap of conns made-up connections between 10.1.0.0/16 hosts (local) and
// 10.2.0.0/16 servers, interleaved: TCP connections with a handshake, data both ways and a
// close; UDP request/response pairs; pings. It returns the number of packets written.
func synthetic(tb testing.TB, path string, conns int) int {
	return syntheticSnap(tb, path, conns, 0)
}

// syntheticSnap is synthetic with frames cut to snap bytes in the file (0: whole frames), as
// `tcpdump -s` does; the original length stays in each record. Of every 8 connections, 6
// are TCP, one a UDP exchange, one a ping; each wave of 256 starts 100 ms after the last.
func syntheticSnap(tb testing.TB, path string, conns, snap int) int {
	tb.Helper()
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	kind := func(c int) synthpcap.Kind {
		switch c % 8 {
		case 6:
			return synthpcap.UDPExchange
		case 7:
			return synthpcap.Ping
		}
		return synthpcap.TCP
	}
	n, err := synthpcap.Write(f, synthpcap.Options{Conns: conns, Kind: kind, Snap: snap, WaveGap: 100 * time.Millisecond})
	if err != nil {
		tb.Fatal(err)
	}
	if err := f.Close(); err != nil {
		tb.Fatal(err)
	}
	return n
}
