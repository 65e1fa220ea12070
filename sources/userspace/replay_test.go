package userspace

import (
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// TestReplaySyntheticMatchesTshark replays a generated capture and checks every TCP and UDP
// conversation against tshark's statistics of the same file.
func TestReplaySyntheticMatchesTshark(t *testing.T) {
	requireTool(t, "tshark")
	file := filepath.Join(t.TempDir(), "syn.pcap")
	synthetic(t, file, 600)
	evs := replayFile(t, file, netip.MustParsePrefix("10.1.0.0/16"))
	conns := connsOf(t, evs)
	n := compareWithTshark(t, file, conns, 14)
	// 600 connections: 75 pings, 75 UDP, 450 TCP.
	if n != 525 || len(conns) != 600 {
		t.Fatalf("tshark conversations %d, flows %d; want 525 and 600", n, len(conns))
	}
	for _, c := range conns {
		if c.direction != flow.Egress {
			t.Fatalf("flow %v → %v: direction %v, want egress", c.a, c.b, c.direction)
		}
		if c.proto == 1 && (c.aPkts != 1 || c.bPkts != 1 || c.icmpType != 8) {
			t.Fatalf("ping %v → %v: %d/%d packets, type %d", c.a, c.b, c.aPkts, c.bPkts, c.icmpType)
		}
	}
}
