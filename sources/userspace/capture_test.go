package userspace

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/netns"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// tcpdump captures on an interface inside a namespace until stop is called.
type tcpdump struct {
	cmd   *exec.Cmd
	done  chan error         // cmd.Wait's result, once its output is read to the end
	stats chan tcpdumpCounts // what it reports on SIGUSR1
}

// tcpdumpCounts are tcpdump's counts: packets written, packets the kernel handed it (its
// "received by filter"), packets the kernel dropped because its ring was full.
type tcpdumpCounts struct{ captured, received, dropped int }

var tcpdumpCountsLine = regexp.MustCompile(`^tcpdump: (\d+) packets? captured, (\d+) packets? received by filter, (\d+) packets? dropped by kernel`)

func startTcpdump(t *testing.T, p *testenv.Pair, ns, ifc, file string) *tcpdump {
	t.Helper()
	// Immediate mode: without it libpcap hands packets over a ring block at a time (up to a
	// second later), and the packets of the last block are lost when tcpdump is stopped. In
	// immediate mode each frame of the ring takes a whole snapshot length (256 KiB), so that
	// the default 2 MiB ring holds 8 packets, and a tcpdump that the scheduler holds back
	// for a moment loses some (CI lost that race at load 20): -B 32768 (KiB) holds more
	// than all the traffic of a test.
	cmd := p.Command(ns, "tcpdump", "-i", ifc, "-n", "-U", "--immediate-mode", "-B", "32768", "-s", "0", "-w", file, "ip or ip6")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start tcpdump: %v", err)
	}
	td := &tcpdump{cmd: cmd, done: make(chan error, 1), stats: make(chan tcpdumpCounts, 16)}
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		var all []string
		for sc.Scan() {
			all = append(all, sc.Text())
			if strings.Contains(sc.Text(), "listening on") {
				ready <- ""
			}
			if m := tcpdumpCountsLine.FindStringSubmatch(sc.Text()); m != nil {
				var c tcpdumpCounts
				c.captured, _ = strconv.Atoi(m[1])
				c.received, _ = strconv.Atoi(m[2])
				c.dropped, _ = strconv.Atoi(m[3])
				select {
				case td.stats <- c:
				default:
				}
			}
		}
		ready <- strings.Join(all, "\n")
		td.done <- cmd.Wait()
	}()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	if msg := <-ready; msg != "" {
		t.Fatalf("tcpdump did not start: %s", msg)
	}
	return td
}

// stop stops tcpdump once it has written every packet the kernel handed it: it reports its
// counts on SIGUSR1 (ip netns exec runs it in place), and stopped before it read the last
// packets of its ring it would lose them. A packet the kernel dropped fails the test: the
// file would not be the traffic.
func (td *tcpdump) stop(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		_ = td.cmd.Process.Signal(syscall.SIGUSR1)
		var c tcpdumpCounts
		select {
		case c = <-td.stats:
		case <-time.After(30 * time.Second):
			t.Fatal("tcpdump does not report its counts on SIGUSR1")
		}
		if c.dropped > 0 {
			t.Fatalf("tcpdump: the kernel dropped %d of %d packets (its ring was full)", c.dropped, c.received)
		}
		if c.captured == c.received {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tcpdump wrote %d of the %d packets it received in a minute", c.captured, c.received)
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = td.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-td.done:
	case <-time.After(10 * time.Second):
		t.Fatal("tcpdump did not stop")
	}
}

// waitTCPDone waits until no TCP connection is open or closing in namespace A or B (only
// TIME-WAIT may remain): the last FIN and ACK of every connection were received then, after
// they passed the captures on A's interface. It replaces a sleep that let "the last ACKs reach
// the captures".
func waitTCPDone(t *testing.T, p *testenv.Pair) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		var busy string
		for _, ns := range []string{p.A, p.B} {
			busy += p.Exec(t, ns, "ss", "-Htan", "state", "connected", "exclude", "time-wait")
		}
		if strings.TrimSpace(busy) == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("TCP connections still open or closing a minute after the traffic:\n%s", busy)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// trafficPlan is what the traffic generator made, for the assertions.
type trafficPlan struct {
	tcp, udp, icmp int
	egress         []netip.AddrPort // TCP/UDP servers reached from A
	ingress        []netip.AddrPort // reached from B
	reset          netip.AddrPort   // the server of the reset connection
	halfClosed     netip.AddrPort   // the server of the half-closed connection
}

// listen opens a listener inside namespace ns.
func listen(t *testing.T, ns, network, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := netns.Run(ns, func() (err error) { ln, err = net.Listen(network, addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func dial(t *testing.T, ns, network, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	if err := netns.Run(ns, func() (err error) { c, err = net.Dial(network, addr); return err }); err != nil {
		t.Fatal(err)
	}
	return c
}

// tcpExchange runs one TCP connection from namespace from to the server at addr in namespace
// to: the client sends up bytes, the server answers down bytes, then both close in the way
// mode says: "close" (orderly), "reset" (the client aborts with RST after the answer) or
// "half" (the client shuts its side first and the server answers after seeing EOF).
func tcpExchange(t *testing.T, from, to, addr string, up, down int, mode string) {
	t.Helper()
	ln := listen(t, to, "tcp", addr)
	srvErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srvErr <- err
			return
		}
		defer c.Close()
		buf := make([]byte, up)
		if mode == "half" {
			// Read to EOF: the client's FIN comes before the answer.
			b, err := io.ReadAll(c)
			if err != nil || len(b) != up {
				srvErr <- fmt.Errorf("server read %d bytes (%v), want %d then EOF", len(b), err, up)
				return
			}
		} else if _, err := io.ReadFull(c, buf); err != nil {
			srvErr <- fmt.Errorf("server read: %w", err)
			return
		}
		if _, err := c.Write(make([]byte, down)); err != nil {
			srvErr <- fmt.Errorf("server write: %w", err)
			return
		}
		if mode == "reset" {
			// Wait for the client's RST rather than close first.
			_, _ = io.Copy(io.Discard, c)
		}
		srvErr <- nil
	}()
	c := dial(t, from, "tcp", addr)
	if _, err := c.Write(make([]byte, up)); err != nil {
		t.Fatal(err)
	}
	switch mode {
	case "half":
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(c)
		if err != nil || len(b) != down {
			t.Fatalf("client read %d bytes (%v), want %d", len(b), err, down)
		}
		c.Close()
	case "reset":
		if _, err := io.ReadFull(c, make([]byte, down)); err != nil {
			t.Fatal(err)
		}
		_ = c.(*net.TCPConn).SetLinger(0)
		c.Close()
	default:
		if _, err := io.ReadFull(c, make([]byte, down)); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if err := <-srvErr; err != nil {
		t.Fatal(err)
	}
}

// udpExchange sends n datagrams of size bytes from namespace from and has the server echo
// each one.
func udpExchange(t *testing.T, from, to, addr string, n, size int) {
	t.Helper()
	var pc net.PacketConn
	if err := netns.Run(to, func() (err error) { pc, err = net.ListenPacket("udp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 65536)
		for range n {
			k, peer, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:k], peer)
		}
	}()
	c := dial(t, from, "udp", addr)
	defer c.Close()
	buf := make([]byte, 65536)
	for range n {
		if _, err := c.Write(make([]byte, size)); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if k, err := c.Read(buf); err != nil || k != size {
			t.Fatalf("udp echo: %d bytes, %v", k, err)
		}
	}
}

func hostPort(a string, port int) string { return net.JoinHostPort(a, fmt.Sprint(port)) }

// makeTraffic runs the test traffic between the pair: TCP connections with known byte counts
// (orderly, reset and half-closed; egress and ingress; IPv4 and IPv6), UDP exchanges and pings.
// Every byte count stays under 10,000 per direction so that tshark prints it exactly.
func makeTraffic(t *testing.T, p *testenv.Pair) trafficPlan {
	var plan trafficPlan
	ap := func(a string, port int) netip.AddrPort {
		return netip.AddrPortFrom(netip.MustParseAddr(a), uint16(port))
	}
	tcpEg := func(a string, port, up, down int, mode string) {
		tcpExchange(t, p.A, p.B, hostPort(a, port), up, down, mode)
		plan.tcp++
		plan.egress = append(plan.egress, ap(a, port))
	}
	tcpEg(p.B4, 7001, 1000, 3000, "close")
	tcpEg(p.B6, 7002, 2500, 100, "close")
	tcpEg(p.B4, 7003, 10, 2000, "reset")
	plan.reset = ap(p.B4, 7003)
	tcpEg(p.B6, 7004, 500, 6000, "half")
	plan.halfClosed = ap(p.B6, 7004)
	// Ingress: B connects to a server in A.
	tcpExchange(t, p.B, p.A, hostPort(p.A4, 7005), 700, 1500, "close")
	plan.tcp++
	plan.ingress = append(plan.ingress, ap(p.A4, 7005))

	udpExchange(t, p.A, p.B, hostPort(p.B4, 7101), 3, 100)
	udpExchange(t, p.A, p.B, hostPort(p.B6, 7102), 4, 333)
	plan.egress = append(plan.egress, ap(p.B4, 7101), ap(p.B6, 7102))
	udpExchange(t, p.B, p.A, hostPort(p.A6, 7103), 2, 50)
	plan.ingress = append(plan.ingress, ap(p.A6, 7103))
	plan.udp = 3

	p.Exec(t, p.A, "ping", "-c", "3", "-i", "0.2", "-W", "2", p.B4)
	p.Exec(t, p.A, "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", p.B6)
	plan.icmp = 2
	waitTCPDone(t, p)
	return plan
}

func localOfA(p *testenv.Pair) []netip.Prefix {
	return []netip.Prefix{netip.MustParsePrefix(p.A4 + "/32"), netip.MustParsePrefix(p.A6 + "/128")}
}

// checkPlan checks the connections of the traffic against what makeTraffic did.
func checkPlan(t *testing.T, conns map[string]*conn, plan trafficPlan) {
	t.Helper()
	var tcp, udp, icmp int
	servers := map[netip.AddrPort]*conn{}
	for _, c := range conns {
		switch c.proto {
		case 6:
			tcp++
		case 17:
			udp++
		case 1, 58:
			icmp++
			want := uint8(8)
			if c.proto == 58 {
				want = 128
			}
			if c.icmpType != want || c.aPkts != c.bPkts || c.aPkts < 2 || c.direction != flow.Egress {
				t.Errorf("ping %v → %v: type %d, %d requests, %d replies, %v", c.a.Addr(), c.b.Addr(), c.icmpType, c.aPkts, c.bPkts, c.direction)
			}
			continue
		}
		if c.starts != 1 || c.ends != 1 {
			t.Errorf("%d %v → %v: %d starts and %d ends, want one each", c.proto, c.a, c.b, c.starts, c.ends)
		}
		servers[c.b] = c
	}
	if tcp != plan.tcp || udp != plan.udp || icmp != plan.icmp {
		t.Errorf("flows: %d tcp, %d udp, %d icmp; want %d, %d, %d", tcp, udp, icmp, plan.tcp, plan.udp, plan.icmp)
	}
	for _, s := range plan.egress {
		if c := servers[s]; c == nil || c.direction != flow.Egress {
			t.Errorf("egress flow to %v: %+v", s, c)
		}
	}
	for _, s := range plan.ingress {
		if c := servers[s]; c == nil || c.direction != flow.Ingress {
			t.Errorf("ingress flow to %v: %+v", s, c)
		}
	}
	if c := servers[plan.halfClosed]; c == nil || c.bBytes < 6000 || c.aBytes < 500 {
		t.Errorf("half-closed connection: %+v", c)
	}
	if c := servers[plan.reset]; c == nil || c.bBytes < 2000 {
		t.Errorf("reset connection: %+v", c)
	}
}

// TestReplayOfRealTrafficMatchesTshark captures real traffic between two namespaces with
// tcpdump, replays the file, and compares every conversation with tshark's statistics.
func TestReplayOfRealTrafficMatchesTshark(t *testing.T) {
	testenv.RequireRoot(t)
	requireTool(t, "tcpdump")
	requireTool(t, "tshark")
	p := testenv.NewPair(t)
	file := filepath.Join(t.TempDir(), "traffic.pcap")
	td := startTcpdump(t, p, p.A, p.IfA, file)
	plan := makeTraffic(t, p)
	td.stop(t)

	conns := connsOf(t, replayFile(t, file, localOfA(p)...))
	if n := compareWithTshark(t, file, conns, 14); n != plan.tcp+plan.udp {
		t.Errorf("tshark sees %d conversations, the traffic made %d", n, plan.tcp+plan.udp)
	}
	checkPlan(t, conns, plan)
	for _, c := range conns {
		t.Logf("%3d %-28v → %-28v %-7v sent %d pkts %d bytes, answered %d pkts %d bytes",
			c.proto, c.a, c.b, c.direction, c.aPkts, c.aBytes, c.bPkts, c.bBytes)
	}

	// The same file as pcapng, as tcpdump and Wireshark also write it.
	ng := filepath.Join(t.TempDir(), "traffic.pcapng")
	testenv.MustRun(t, "tshark", "-r", file, "-F", "pcapng", "-w", ng)
	connsNg := connsOf(t, replayFile(t, ng, localOfA(p)...))
	compareWithTshark(t, ng, connsNg, 14)
	if len(connsNg) != len(conns) {
		t.Errorf("pcapng replay: %d flows, pcap %d", len(connsNg), len(conns))
	}
}

// TestLiveCaptureMatchesReplay captures the same traffic live with the source (AF_PACKET in
// namespace A) and with tcpdump, and checks that the live flows equal the replayed ones.
func TestLiveCaptureMatchesReplay(t *testing.T) {
	testenv.RequireRoot(t)
	requireTool(t, "tcpdump")
	p := testenv.NewPair(t)
	file := filepath.Join(t.TempDir(), "live.pcap")

	c := defaults()
	c.Interface, c.Netns = p.IfA, p.A
	c.FlushInterval = 100 * time.Millisecond
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := New(testEnv(t), c)
	if err != nil {
		t.Fatal(err)
	}
	s.started = make(chan struct{})
	var col collector
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	var runErr error
	go func() { defer wg.Done(); runErr = s.Run(ctx, &col) }()
	select {
	case <-s.started:
	case <-time.After(10 * time.Second):
		t.Fatal("live capture did not start")
	}
	td := startTcpdump(t, p, p.A, p.IfA, file)
	plan := makeTraffic(t, p)
	// Datagrams larger than the link's MTU leave in fragments: each must count as one packet
	// of its reassembled length, as the kernel counts it.
	udpExchange(t, p.A, p.B, hostPort(p.B4, 7301), 2, 3000)
	udpExchange(t, p.A, p.B, hostPort(p.B6, 7302), 1, 4000)
	plan.udp += 2
	td.stop(t) // the live source reads what its ring holds when it stops
	cancel()
	wg.Wait()
	if runErr != nil {
		t.Fatalf("live source: %v", runErr)
	}

	live := connsOf(t, col.Events())
	checkPlan(t, live, plan)
	for _, f := range []struct {
		server       netip.AddrPort
		n, size, hdr uint64
	}{
		{netip.AddrPortFrom(netip.MustParseAddr(p.B4), 7301), 2, 3000, 28},
		{netip.AddrPortFrom(netip.MustParseAddr(p.B6), 7302), 1, 4000, 48},
	} {
		var c *conn
		for _, x := range live {
			if x.b == f.server {
				c = x
			}
		}
		want := f.size + f.hdr // the reassembled datagram, as the kernel counts it
		if c == nil || c.aPkts != f.n || c.bPkts != f.n || c.aBytes != f.n*want || c.bBytes != f.n*want {
			t.Errorf("fragmented exchange with %v: %+v; want %d datagrams of %d bytes each way", f.server, c, f.n, want)
		}
	}
	// Without local_prefixes the live source takes the interface's addresses; the replay is
	// given A's addresses, so both must agree on direction too.
	replayed := connsOf(t, replayFile(t, file, localOfA(p)...))
	if len(live) != len(replayed) {
		t.Errorf("live %d flows, replay %d", len(live), len(replayed))
	}
	for k, r := range replayed {
		if flow.IsICMP(r.proto) {
			continue // keyed by flow ID; compared below by addresses
		}
		l := live[k]
		if l == nil {
			t.Errorf("replayed flow %s not seen live", k)
			continue
		}
		if l.aPkts != r.aPkts || l.bPkts != r.bPkts || l.aBytes != r.aBytes || l.bBytes != r.bBytes ||
			l.direction != r.direction || l.starts != r.starts || l.ends != r.ends || l.a != r.a {
			t.Errorf("flow %s: live %v→%v %d/%d pkts %d/%d bytes %v; replay %v→%v %d/%d pkts %d/%d bytes %v",
				k, l.a, l.b, l.aPkts, l.bPkts, l.aBytes, l.bBytes, l.direction, r.a, r.b, r.aPkts, r.bPkts, r.aBytes, r.bBytes, r.direction)
		}
	}
	pings := func(m map[string]*conn) map[string]string {
		out := map[string]string{}
		for _, c := range m {
			if flow.IsICMP(c.proto) {
				out[c.a.Addr().String()+">"+c.b.Addr().String()] = fmt.Sprint(c.aPkts, c.bPkts, c.aBytes, c.bBytes)
			}
		}
		return out
	}
	if l, r := pings(live), pings(replayed); fmt.Sprint(l) != fmt.Sprint(r) {
		t.Errorf("pings live %v, replay %v", l, r)
	}
}

// TestLiveRereadsInterfaceAddresses adds an address to the captured interface after the
// capture started: connections from it must come out as egress, which they can only if the
// source picked the new address up.
func TestLiveRereadsInterfaceAddresses(t *testing.T) {
	testenv.RequireRoot(t)
	p := testenv.NewPair(t)
	c := defaults()
	c.Interface, c.Netns = p.IfA, p.A
	c.FlushInterval = 100 * time.Millisecond
	s, err := New(testEnv(t), c)
	if err != nil {
		t.Fatal(err)
	}
	s.started = make(chan struct{})
	s.addrRefresh = 100 * time.Millisecond
	s.addrsChanged = make(chan []netip.Prefix, 4)
	var col collector
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, &col) }()
	<-s.started

	// A second subnet on the link, one address at each end.
	a2, b2 := "192.168.77.1", "192.168.77.2"
	testenv.MustRun(t, "ip", "-n", p.A, "addr", "add", a2+"/24", "dev", p.IfA)
	testenv.MustRun(t, "ip", "-n", p.B, "addr", "add", b2+"/24", "dev", p.IfB)
	want := netip.MustParsePrefix(a2 + "/32")
	for found := false; !found; {
		select {
		case local := <-s.addrsChanged:
			for _, pf := range local {
				found = found || pf == want
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the source did not pick up the new address")
		}
	}
	udpExchange(t, p.A, p.B, hostPort(b2, 7200), 1, 10)
	cancel() // the echo came back: both datagrams are in the ring, which the source reads when it stops
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var seen bool
	for _, e := range col.Events() {
		if e.Type == flow.TypeEnd && e.DstAddr == netip.MustParseAddr(b2) && e.DstPort == 7200 {
			seen = true
			if e.Direction != flow.Egress || e.SrcAddr != netip.MustParseAddr(a2) || e.TxPackets != 1 || e.RxPackets != 1 {
				t.Fatalf("flow from the new address: %+v", e)
			}
		}
	}
	if !seen {
		t.Fatal("no flow from the new address")
	}
}
