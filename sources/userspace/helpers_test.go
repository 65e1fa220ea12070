package userspace

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
)

// collector and countingMetrics stand in for the runtime in these tests.
type (
	collector       = componenttest.Collector
	countingMetrics = componenttest.Metrics
)

func testEnv(t testing.TB) component.Env {
	return component.Env{Name: "us", Kind: component.KindSource, Type: "userspace",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Metrics: &countingMetrics{}}
}

// conn is one connection as the tests compare them: its 5-tuple from the initiator and its
// counters, from the initiator's (a) and the responder's (b) side.
type conn struct {
	proto            uint8
	a, b             netip.AddrPort
	aPkts, aBytes    uint64 // sent by a
	bPkts, bBytes    uint64 // sent by b
	starts, ends     int
	direction        flow.Direction
	icmpType         uint8
	flowIDs          map[[16]byte]bool
	startEv, endEvnt flow.Event
}

// canon is an order-independent key for a 5-tuple.
func canon(proto uint8, x, y netip.AddrPort) string {
	if x.Compare(y) > 0 {
		x, y = y, x
	}
	return fmt.Sprintf("%d %v %v", proto, x, y)
}

// connsOf folds events into connections keyed by canon; ICMP flows are keyed by addresses
// and ICMP type, port 0.
func connsOf(t testing.TB, evs []flow.Event) map[string]*conn {
	out := map[string]*conn{}
	for _, e := range evs {
		a := netip.AddrPortFrom(e.SrcAddr, e.SrcPort)
		b := netip.AddrPortFrom(e.DstAddr, e.DstPort)
		k := canon(e.Protocol, a, b)
		if flow.IsICMP(e.Protocol) {
			k = fmt.Sprintf("%s/%d/%v", k, e.ICMPType, e.FlowID)
		}
		c := out[k]
		if c == nil {
			c = &conn{proto: e.Protocol, a: a, b: b, flowIDs: map[[16]byte]bool{}}
			out[k] = c
		}
		c.flowIDs[e.FlowID] = true
		switch e.Type {
		case flow.TypeStart:
			c.starts++
			c.startEv = e
		case flow.TypeEnd:
			c.ends++
			c.endEvnt = e
			// Tx is what the host sent: the initiator's packets for egress, the responder's
			// for ingress.
			if e.Direction == flow.Ingress {
				c.aPkts, c.aBytes, c.bPkts, c.bBytes = e.RxPackets, e.RxBytes, e.TxPackets, e.TxBytes
			} else {
				c.aPkts, c.aBytes, c.bPkts, c.bBytes = e.TxPackets, e.TxBytes, e.RxPackets, e.RxBytes
			}
			c.direction = e.Direction
			c.icmpType = e.ICMPType
		default:
			t.Errorf("unexpected event type %v", e.Type)
		}
	}
	return out
}

// tsharkConv is one row of tshark's conversation statistics.
type tsharkConv struct {
	proto           uint8
	a, b            netip.AddrPort
	aFrames, aBytes uint64 // from a to b ("->")
	bFrames, bBytes uint64 // from b to a ("<-")
}

// tsharkConvs runs `tshark -r file -q -z conv,tcp -z conv,udp` and parses its tables. Byte
// counts must be exact ("N bytes"; tshark abbreviates from 10,000 on, which the tests avoid).
func tsharkConvs(t testing.TB, file string) []tsharkConv {
	t.Helper()
	cmd := exec.Command("tshark", "-r", file, "-q", "-z", "conv,tcp", "-z", "conv,udp")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("tshark: %v\n%s", err, errb.String())
	}
	var convs []tsharkConv
	var proto uint8
	sc := bufio.NewScanner(&out)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "TCP Conversations"):
			proto = 6
			continue
		case strings.HasPrefix(line, "UDP Conversations"):
			proto = 17
			continue
		}
		f := strings.Fields(line)
		if len(f) < 12 || f[1] != "<->" {
			continue
		}
		// a <-> b  bFrames bBytes "bytes"  aFrames aBytes "bytes"  total...
		if f[5] != "bytes" || f[8] != "bytes" {
			t.Fatalf("tshark abbreviated a byte count (keep test conversations under 10,000 bytes each way): %q", line)
		}
		c := tsharkConv{proto: proto, a: parseAddrPort(t, f[0]), b: parseAddrPort(t, f[2])}
		c.bFrames, c.bBytes = atou(t, f[3]), atou(t, f[4])
		c.aFrames, c.aBytes = atou(t, f[6]), atou(t, f[7])
		convs = append(convs, c)
	}
	return convs
}

func parseAddrPort(t testing.TB, s string) netip.AddrPort {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		t.Fatalf("tshark address %q has no port", s)
	}
	host := strings.Trim(s[:i], "[]")
	a, err := netip.ParseAddr(host)
	if err != nil {
		t.Fatalf("tshark address %q: %v", s, err)
	}
	return netip.AddrPortFrom(a, uint16(atou(t, s[i+1:])))
}

func atou(t testing.TB, s string) uint64 {
	n, err := strconv.ParseUint(strings.ReplaceAll(s, ",", ""), 10, 64)
	if err != nil {
		t.Fatalf("tshark number %q: %v", s, err)
	}
	return n
}

// replayFile runs the source over a pcap file and returns its events.
func replayFile(t testing.TB, file string, local ...netip.Prefix) []flow.Event {
	t.Helper()
	c := defaults()
	c.Pcap, c.LocalPrefixes, c.Progress = file, local, "off"
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := New(testEnv(t), c)
	if err != nil {
		t.Fatal(err)
	}
	var col collector
	if err := s.Run(context.Background(), &col); err != nil {
		t.Fatalf("replay %s: %v", file, err)
	}
	return col.Events()
}

// compareWithTshark checks that every conversation tshark sees is one connection with one
// start and one end whose packet counts equal tshark's and whose byte counts equal tshark's
// less linkHdr bytes per frame.
func compareWithTshark(t *testing.T, file string, conns map[string]*conn, linkHdr uint64) int {
	t.Helper()
	convs := tsharkConvs(t, file)
	for _, tc := range convs {
		c := conns[canon(tc.proto, tc.a, tc.b)]
		if c == nil {
			t.Errorf("tshark conversation %d %v <-> %v: no flow", tc.proto, tc.a, tc.b)
			continue
		}
		if c.starts != 1 || c.ends != 1 || len(c.flowIDs) != 1 {
			t.Errorf("%d %v <-> %v: %d starts, %d ends, %d flow IDs; want 1, 1, 1", tc.proto, tc.a, tc.b, c.starts, c.ends, len(c.flowIDs))
		}
		// Orient tshark's row like the flow: a is the initiator.
		aF, aB, bF, bB := tc.aFrames, tc.aBytes, tc.bFrames, tc.bBytes
		if c.a != tc.a {
			aF, aB, bF, bB = bF, bB, aF, aB
		}
		if c.aPkts != aF || c.bPkts != bF || c.aBytes != aB-linkHdr*aF || c.bBytes != bB-linkHdr*bF {
			t.Errorf("%d %v → %v: packets %d/%d bytes %d/%d; tshark packets %d/%d bytes %d/%d (less %d per frame: %d/%d)",
				tc.proto, c.a, c.b, c.aPkts, c.bPkts, c.aBytes, c.bBytes, aF, bF, aB, bB, linkHdr, aB-linkHdr*aF, bB-linkHdr*bF)
		}
	}
	return len(convs)
}
