package communityid

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// TestAgainstWireshark checks the implementation against an independent one on real
// packets: traffic between two network namespaces (TCP, UDP, ICMP echo and the ICMP errors a
// closed UDP port provokes, ICMPv6 echo and neighbour discovery, over IPv4 and IPv6) is
// captured with tcpdump, and every packet's Community ID as computed by Wireshark (tshark's
// communityid dissector) must equal ours for the same tuple, with seed 0 and seed 4711.
func TestAgainstWireshark(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tool := range []string{"tcpdump", "tshark", "ping", "nc"} {
		_, err := exec.LookPath(tool)
		testenv.Require(t, err == nil, tool)
	}
	p := testenv.NewPair(t)
	pcap := filepath.Join(t.TempDir(), "cap.pcap")

	dump := p.Command(p.A, "tcpdump", "-i", p.IfA, "--immediate-mode", "-U", "-n", "-w", pcap)
	var dumpErr bytes.Buffer
	stderr, err := dump.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := dump.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dump.Process.Kill(); _ = dump.Wait() })
	listening := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			dumpErr.WriteString(sc.Text() + "\n")
			if strings.Contains(sc.Text(), "listening on") {
				close(listening)
			}
		}
	}()
	select {
	case <-listening:
	case <-time.After(30 * time.Second):
		t.Fatalf("tcpdump did not start: %s", dumpErr.String())
	}

	// TCP listeners in B (one per family), so the handshake completes.
	for _, fam := range []string{"-4", "-6"} {
		srv := p.Command(p.B, "nc", fam, "-l", "-k", "8080")
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = srv.Process.Kill(); _ = srv.Wait() })
	}
	p.Exec(t, p.A, "ping", "-c", "2", "-i", "0.2", p.B4)
	p.Exec(t, p.A, "ping", "-6", "-c", "2", "-i", "0.2", p.B6)
	for _, dst := range []string{p.B4, p.B6} {
		// TCP: retry until the listener is up (it is started asynchronously).
		deadline := time.Now().Add(20 * time.Second)
		for exec.Command("ip", "netns", "exec", p.A, "nc", "-z", "-w", "2", dst, "8080").Run() != nil {
			if time.Now().After(deadline) {
				t.Fatalf("TCP to %s never connected", dst)
			}
			time.Sleep(100 * time.Millisecond)
		}
		// UDP to a closed port: the datagram and an ICMP port-unreachable (one-way) back.
		udp := p.Command(p.A, "nc", "-u", "-w", "1", "-p", "40000", dst, "9999")
		udp.Stdin = strings.NewReader("hello\n")
		_ = udp.Run()
	}
	kinds := []string{"tcp4", "tcp6", "udp4", "udp6", "icmp-echo", "icmp-unreach", "icmpv6-echo", "icmpv6-unreach"}
	// Wait until tcpdump has written a packet of every kind (it writes each as it comes),
	// then stop it.
	deadline := time.Now().Add(30 * time.Second)
	for {
		seen := map[string]int{}
		for _, line := range tsharkLines(t, pcap, 0, false) {
			if _, kind, ok := tuple(strings.Split(line, "|")); ok {
				seen[kind]++
			}
		}
		missing := ""
		for _, k := range kinds {
			if seen[k] == 0 {
				missing += " " + k
			}
		}
		if missing == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the capture never showed:%s (saw %v)", missing, seen)
		}
		time.Sleep(100 * time.Millisecond)
	}
	_ = dump.Process.Signal(syscall.SIGINT)
	_ = dump.Wait()

	for _, seed := range []uint16{0, 4711} {
		seen := map[string]int{}
		for _, line := range tsharkLines(t, pcap, seed, true) {
			f := strings.Split(line, "|")
			if f[15] == "" {
				continue // not IP (ARP)
			}
			ev, kind, ok := tuple(f)
			if !ok {
				t.Errorf("frame %s: cannot read the tuple from %q", f[0], line)
				continue
			}
			seen[kind]++
			if got := ForEvent(seed, &ev); got != f[15] {
				t.Errorf("seed %d frame %s (%s %v -> %v ports %d/%d icmp %d/%d): got %s, Wireshark %s",
					seed, f[0], kind, ev.SrcAddr, ev.DstAddr, ev.SrcPort, ev.DstPort, ev.ICMPType, ev.ICMPCode, got, f[15])
			}
		}
		for _, kind := range kinds {
			if seen[kind] == 0 {
				t.Errorf("seed %d: the capture has no %s packet to compare (saw %v)", seed, kind, seen)
			}
		}
		t.Logf("seed %d: compared %v", seed, seen)
	}
}

// tsharkLines decodes a capture with tshark, one line of fields per packet (see tuple). A
// capture still being written may end in a partial packet, which tshark reports; strict
// fails the test on any tshark error.
func tsharkLines(t *testing.T, pcap string, seed uint16, strict bool) []string {
	t.Helper()
	cmd := exec.Command("tshark", "-r", pcap, "-n", "--enable-protocol", "communityid",
		"-o", fmt.Sprintf("communityid.seed:%d", seed),
		"-T", "fields", "-E", "separator=|", "-E", "occurrence=f",
		"-e", "frame.number", "-e", "ip.src", "-e", "ip.dst", "-e", "ipv6.src", "-e", "ipv6.dst",
		"-e", "ip.proto", "-e", "ipv6.nxt",
		"-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "udp.srcport", "-e", "udp.dstport",
		"-e", "icmp.type", "-e", "icmp.code", "-e", "icmpv6.type", "-e", "icmpv6.code",
		"-e", "communityid")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil && strict {
		t.Fatalf("tshark: %v\n%s", err, stderr.String())
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if strings.Count(l, "|") == 15 {
			lines = append(lines, l)
		}
	}
	return lines
}

// tuple reads one tshark line: frame|ip.src|ip.dst|ipv6.src|ipv6.dst|ip.proto|ipv6.nxt|
// tcp ports|udp ports|icmp type/code|icmpv6 type/code|communityid. Only the first (outer)
// occurrence of each field is taken, so an ICMP error's quoted packet does not count.
func tuple(f []string) (flow.Event, string, bool) {
	var ev flow.Event
	var proto string
	var err1, err2 error
	if f[1] != "" {
		ev.SrcAddr, err1 = netip.ParseAddr(f[1])
		ev.DstAddr, err2 = netip.ParseAddr(f[2])
		proto = f[5]
	} else {
		ev.SrcAddr, err1 = netip.ParseAddr(f[3])
		ev.DstAddr, err2 = netip.ParseAddr(f[4])
		proto = f[6]
	}
	if err1 != nil || err2 != nil {
		return ev, "", false
	}
	// The transport protocol is the one whose header tshark decoded first; the IPv6 next
	// header field names the first extension header instead (hop-by-hop in MLD reports).
	switch {
	case f[11] != "":
		ev.Protocol = flow.ProtoICMP
	case f[13] != "":
		ev.Protocol = flow.ProtoICMPv6
	case f[7] != "":
		ev.Protocol = flow.ProtoTCP
	case f[9] != "":
		ev.Protocol = flow.ProtoUDP
	default:
		n, err := strconv.Atoi(proto)
		if err != nil {
			return ev, "", false
		}
		ev.Protocol = uint8(n)
	}
	fam := "4"
	if ev.SrcAddr.Is6() {
		fam = "6"
	}
	num := func(s string) int { v, _ := strconv.Atoi(s); return v }
	switch ev.Protocol {
	case flow.ProtoTCP:
		ev.SrcPort, ev.DstPort = uint16(num(f[7])), uint16(num(f[8]))
		return ev, "tcp" + fam, true
	case flow.ProtoUDP:
		ev.SrcPort, ev.DstPort = uint16(num(f[9])), uint16(num(f[10]))
		return ev, "udp" + fam, true
	case flow.ProtoICMP:
		ev.ICMPType, ev.ICMPCode = uint8(num(f[11])), uint8(num(f[12]))
		switch ev.ICMPType {
		case 0, 8:
			return ev, "icmp-echo", true
		case 3:
			return ev, "icmp-unreach", true
		}
		return ev, fmt.Sprintf("icmp-%d", ev.ICMPType), true
	case flow.ProtoICMPv6:
		ev.ICMPType, ev.ICMPCode = uint8(num(f[13])), uint8(num(f[14]))
		switch ev.ICMPType {
		case 128, 129:
			return ev, "icmpv6-echo", true
		case 1:
			return ev, "icmpv6-unreach", true
		}
		return ev, fmt.Sprintf("icmpv6-%d", ev.ICMPType), true
	}
	return ev, "proto" + proto, true
}
