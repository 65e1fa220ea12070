package userspace

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// discard is an Emitter that counts events and acknowledges at once.
type discard struct{ events, batches int }

func (d *discard) Emit(_ context.Context, b *flow.Batch) error {
	d.events += len(b.Events)
	d.batches++
	b.Release(nil)
	return nil
}

// BenchmarkReplay replays a generated capture of about a million packets (105,000
// connections: TCP with handshake, data and close, UDP exchanges, pings; frames cut to 96
// bytes as `tcpdump -s 96` would) from file to events, per whole file.
func BenchmarkReplay(b *testing.B) {
	file := filepath.Join(b.TempDir(), "replay.pcap")
	pkts := syntheticSnap(b, file, 105000, 96)
	st, _ := os.Stat(file)
	c := defaults()
	c.Pcap, c.Progress, c.MaxEntries = file, "off", 1<<20
	s, err := New(testEnv(b), c)
	if err != nil {
		b.Fatal(err)
	}
	var d discard
	b.SetBytes(st.Size())
	b.ReportAllocs()
	b.ResetTimer()
	cpu := testenv.CPUNanos()
	for b.Loop() {
		if err := s.Run(context.Background(), &d); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	perFile := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	b.ReportMetric(perFile/float64(pkts), "ns/packet")
	b.ReportMetric(float64(testenv.CPUNanos()-cpu)/float64(b.N)/float64(pkts), "cpu-ns/packet")
	b.ReportMetric(float64(pkts)/(perFile/1e9), "packets/s")
	b.ReportMetric(float64(d.events)/float64(b.N), "events/file")
}
