package userspace

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/flowpipe/flowpipe/core/flow"
)

// TestReplayCountsAndSkipsBadPackets replays a file mixing good packets with truncated,
// malformed, non-IP and untrackable ones (a FIN and a fragment with no connection), and
// checks each is counted under its reason while the good ones make their flow.
func TestReplayCountsAndSkipsBadPackets(t *testing.T) {
	file := filepath.Join(t.TempDir(), "bad.pcap")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	w := pcapgo.NewWriter(f)
	if err := w.WriteFileHeader(65535, layers.LinkTypeEthernet); err != nil {
		t.Fatal(err)
	}
	eth := []byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00}
	frame := func(ip []byte) []byte { return append(append([]byte(nil), eth...), ip...) }
	mod := func(fn func(b []byte)) []byte { b := append([]byte(nil), ipv4UDP...); fn(b); return frame(b) }
	frames := [][]byte{
		frame(ipv4UDP),                              // good: opens a flow
		frame(ipv4UDP[:24]),                         // truncated
		mod(func(b []byte) { b[0] = 0x43 }),         // malformed (IHL 3)
		mod(func(b []byte) { b[7] = 1 }),            // a later fragment whose first was never seen: untracked
		mod(func(b []byte) { b[9] = 47 }),           // unsupported (GRE)
		append(eth[:12:12], 0x08, 0x06, 0, 1, 8, 0), // ARP: not IP
		eth[:6],        // truncated link layer
		frame(ipv4UDP), // good again
	}
	// A TCP FIN with no connection: decodable but untracked.
	fin := []byte{0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
		0x13, 0x88, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x11, 0, 0, 0, 0, 0, 0}
	frames = append(frames, frame(fin))
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i, fr := range frames {
		ci := gopacket.CaptureInfo{Timestamp: at.Add(time.Duration(i) * time.Millisecond), CaptureLength: len(fr), Length: len(fr)}
		if err := w.WritePacket(ci, fr); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()

	reg := prometheus.NewRegistry()
	env := testEnv(t)
	env.Registerer = reg
	c := defaults()
	c.Pcap, c.Progress = file, "off"
	s, err := New(env, c)
	if err != nil {
		t.Fatal(err)
	}
	var col collector
	if err := s.Run(context.Background(), &col); err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{"tracked": 2, "untracked": 2, "truncated": 2, "malformed": 1, "unsupported": 1, "not_ip": 1}
	for r, n := range want {
		if got := testutil.ToFloat64(s.packets.WithLabelValues(r)); got != n {
			t.Errorf("packets{result=%q} = %v, want %v", r, got, n)
		}
	}
	evs := col.Events()
	if len(evs) != 2 || evs[0].Type != flow.TypeStart || evs[1].Type != flow.TypeEnd || evs[1].TxPackets != 2 {
		t.Fatalf("events %+v", evs)
	}
}

// TestReplayTruncatedFile replays a capture cut in the middle of a packet: what is complete
// is replayed and every flow still ends.
func TestReplayTruncatedFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "cut.pcap")
	synthetic(t, file, 40)
	st, _ := os.Stat(file)
	if err := os.Truncate(file, st.Size()-7); err != nil {
		t.Fatal(err)
	}
	conns := connsOf(t, replayFile(t, file))
	if len(conns) != 40 {
		t.Fatalf("%d flows, want 40", len(conns))
	}
	for _, c := range conns {
		if c.starts != 1 || c.ends != 1 {
			t.Fatalf("flow %v → %v: %d starts %d ends", c.a, c.b, c.starts, c.ends)
		}
	}
}

func TestReplayRejectsOtherFiles(t *testing.T) {
	file := filepath.Join(t.TempDir(), "notes.txt")
	_ = os.WriteFile(file, []byte("this is not a capture"), 0o644)
	c := defaults()
	c.Pcap = file
	s, _ := New(testEnv(t), c)
	err := s.Run(context.Background(), &collector{})
	if err == nil || !strings.Contains(err.Error(), file) || !strings.Contains(err.Error(), "pcap") {
		t.Fatalf("error %v", err)
	}
}

func TestProgress(t *testing.T) {
	var out bytes.Buffer
	p := newProgress("bar", time.Second, slog.Default(), "f.pcap", 1000)
	p.w = &out
	p.start = time.Now().Add(-time.Second)
	p.last = time.Time{}
	p.update(5000, 2_000_000, 500)
	p.done(10000, 4_000_000, 1000)
	got := out.String()
	if !strings.Contains(got, " 50%") || !strings.Contains(got, "5.0k pkts") || !strings.Contains(got, "100%") || !strings.HasSuffix(got, "\n") {
		t.Fatalf("bar output %q", got)
	}
	var logs bytes.Buffer
	p = newProgress("log", time.Millisecond, slog.New(slog.NewTextHandler(&logs, nil)), "f.pcap", 1000)
	p.last = time.Time{}
	p.update(10, 100, 250)
	if !strings.Contains(logs.String(), "percent=25") || !strings.Contains(logs.String(), "packets=10") {
		t.Fatalf("log output %q", logs.String())
	}
}
