package main

import (
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// Export rates of the sinks that feed existing collectors, next to the file sink, through the
// real runtime (generate → sink, 1,024-event batches, in process). The collector is a loopback
// listener in the same process that reads and discards, so cpu-µs/event counts generating,
// encoding, writing and reading back. docs/benchmarks.md has the figures.

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func benchExport(b *testing.B, sinkYAML string) {
	cpu0 := cpuTime()
	benchPipeline(b, sinkYAML)
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N)/1e3, "cpu-µs/event")
}

// drainTCP accepts connections and discards what they send.
func drainTCP(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

// drainUDP reads and discards datagrams.
func drainUDP(b *testing.B) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	return pc.LocalAddr().String()
}

func BenchmarkExportFileNoSync(b *testing.B) {
	benchExport(b, "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none}")
}

func BenchmarkExportFileECSNoSync(b *testing.B) {
	benchExport(b, "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none, format: ecs}")
}

func BenchmarkExportIPFIXUDP(b *testing.B) {
	benchExport(b, fmt.Sprintf("{type: ipfix, isolation: inproc, address: %q, events: 'start,end,aggregate'}", drainUDP(b)))
}

func BenchmarkExportIPFIXTCP(b *testing.B) {
	benchExport(b, fmt.Sprintf("{type: ipfix, isolation: inproc, transport: tcp, address: %q, events: 'start,end,aggregate', enterprise_number: 64999}", drainTCP(b)))
}

func BenchmarkExportSyslogTCP(b *testing.B) {
	benchExport(b, fmt.Sprintf("{type: syslog, isolation: inproc, address: %q}", drainTCP(b)))
}

func BenchmarkExportSyslogTCPJSONECS(b *testing.B) {
	benchExport(b, fmt.Sprintf("{type: syslog, isolation: inproc, address: %q, body: json, format: ecs}", drainTCP(b)))
}

func BenchmarkExportSyslogUDP(b *testing.B) {
	benchExport(b, fmt.Sprintf("{type: syslog, isolation: inproc, transport: udp, address: %q}", drainUDP(b)))
}
