package testenv

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// A test that starts a server on a port of its choosing and waits for it has two traps, both
// lost by CI runs: a probe that binds the port to see whether it is taken holds it at the
// instant the server binds (the server then exits), and a probe that connects to it cannot
// tell the server from any other process that got the port after the test chose it (another
// test package, a listener on port 0, a TCP connection's own local port): the server exits
// with "address already in use" while the probe succeeds, and whatever talks to it next waits
// forever. The helpers here read the kernel's socket tables (/proc/<pid>/net/{tcp,tcp6,udp,
// udp6}) and the socket descriptors of the server's process tree instead: they touch no port,
// and they say whether the socket on the port is the server's.

// FreeTCPAddr returns 127.0.0.1:port for a TCP port free at this instant. Nothing reserves
// it: a test that starts a server on it waits with WaitListening, which tells whether that
// server got it, and notices the server exiting when another process was faster (freePort
// chooses where that is least likely). It never returns a port it returned before in this
// process: the kernel hands a port just closed to the next bind to port 0 as readily as any
// other, so two calls in a row (a server's client and cluster ports) got the same one once,
// and the server exited at once.
func FreeTCPAddr(t testing.TB) string {
	t.Helper()
	return fmt.Sprintf("127.0.0.1:%d", freePort(t, "tcp"))
}

// FreeTCPPort is FreeTCPAddr's port.
func FreeTCPPort(t testing.TB) int {
	t.Helper()
	return freePort(t, "tcp")
}

// FreeUDPPort is a UDP port on 127.0.0.1 free at this instant (what FreeTCPAddr says holds
// for it too: wait with WaitListening).
func FreeUDPPort(t testing.TB) int {
	t.Helper()
	return freePort(t, "udp")
}

var (
	handedOutMu sync.Mutex
	handedOut   = map[string]map[int]bool{"tcp": {}, "udp": {}}
)

// freePort returns a port that binds on 127.0.0.1 now and that this process has not handed
// out before. It picks below the kernel's ephemeral range (ip_local_port_range), where the
// kernel never puts a connection's local port or a bind to port 0 of another process on the
// machine (other test packages run in parallel and make thousands of connections): the port
// can then be lost only to another process choosing the same one the same way. It falls back
// to the kernel's choice of port 0 when no such port is found.
func freePort(t testing.TB, network string) int {
	t.Helper()
	handedOutMu.Lock()
	defer handedOutMu.Unlock()
	lo, hi := 10000, ephemeralLow()
	for range 1000 {
		port := 0
		if hi > lo {
			port = lo + rand.IntN(hi-lo)
		}
		got, ok := tryBind(network, port)
		if ok && !handedOut[network][got] {
			handedOut[network][got] = true
			return got
		}
	}
	t.Fatalf("no %s port on 127.0.0.1 that binds and that this process has not already handed out, in 1000 tries", network)
	return 0
}

// tryBind binds 127.0.0.1:port (0: the kernel's choice), closes it and returns its port.
func tryBind(network string, port int) (int, bool) {
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if network == "tcp" {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return 0, false
		}
		defer l.Close()
		return l.Addr().(*net.TCPAddr).Port, true
	}
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return 0, false
	}
	defer pc.Close()
	return pc.LocalAddr().(*net.UDPAddr).Port, true
}

// ephemeralLow is the low end of the kernel's ephemeral port range (32768 if unreadable).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return 32768
	}
	n, err := strconv.Atoi(f[0])
	if err != nil {
		return 32768
	}
	return n
}

// Port is the port of a host:port address.
func Port(t testing.TB, addr string) int {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return int(ap.Port())
}

// procSocket is one line of /proc/net/{tcp,tcp6,udp,udp6}.
type procSocket struct {
	local   netip.AddrPort
	state   int // TCP_LISTEN is 0x0A; UDP sockets are 0x07 (TCP_CLOSE) bound or connected
	unread  int // rx_queue, bytes
	inode   uint64
	context string // file and line, for errors
}

const tcpListen = 0x0A

// procSockets reads a socket table: /proc/<pid>/net/<table> (pid 0: this process's).
func procSockets(pid int, table string) ([]procSocket, error) {
	path := "/proc/net/" + table
	if pid != 0 {
		path = fmt.Sprintf("/proc/%d/net/%s", pid, table)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []procSocket
	for i, line := range strings.Split(string(data), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 10 {
			continue
		}
		s := procSocket{context: fmt.Sprintf("%s:%d", path, i+2)}
		if s.local, err = parseProcAddr(f[1]); err != nil {
			return nil, fmt.Errorf("%s: local address %q: %v", s.context, f[1], err)
		}
		st, err := strconv.ParseUint(f[3], 16, 8)
		if err != nil {
			return nil, fmt.Errorf("%s: state %q: %v", s.context, f[3], err)
		}
		s.state = int(st)
		_, rx, _ := strings.Cut(f[4], ":") // tx_queue:rx_queue, hexadecimal
		n, err := strconv.ParseInt(rx, 16, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: rx_queue %q: %v", s.context, rx, err)
		}
		s.unread = int(n)
		if s.inode, err = strconv.ParseUint(f[9], 10, 64); err != nil {
			return nil, fmt.Errorf("%s: inode %q: %v", s.context, f[9], err)
		}
		out = append(out, s)
	}
	return out, nil
}

// parseProcAddr decodes ADDR:PORT of a socket table: the address is 4 (IPv4) or 16 (IPv6)
// bytes in hexadecimal, each 32-bit word in the machine's byte order; the port is big-endian.
func parseProcAddr(s string) (netip.AddrPort, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, errors.New("no port")
	}
	raw, err := hex.DecodeString(a)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("address %q", a)
	}
	for w := 0; w < len(raw); w += 4 { // words as the kernel printed them → network order
		binary.BigEndian.PutUint32(raw[w:], binary.NativeEndian.Uint32(raw[w:]))
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port %q", p)
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

// LoopbackUDP looks up the UDP socket bound to 127.0.0.1:port in /proc/net/udp, without
// touching the port: found says whether one is bound, unread is its receive queue in bytes
// (0 once its owner has read every datagram). A test waiting for a collector to listen uses
// this rather than trying to bind the port itself, which, at the wrong instant, takes the
// port from the collector starting up.
func LoopbackUDP(t testing.TB, port int) (found bool, unread int) {
	t.Helper()
	socks, err := procSockets(0, "udp")
	if err != nil {
		t.Fatal(err)
	}
	want := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(port))
	for _, s := range socks {
		if s.local == want {
			return true, s.unread
		}
	}
	return false, 0
}

// Listening reports whether the process pid, or one of its descendants (a flowpipe host's
// plugin processes: with the default isolation a source listens in its plugin), owns a socket
// on port: for network "tcp" one in the LISTEN state, for "udp" one bound to the port; on any
// local address, IPv4 or IPv6, in pid's network namespace. It touches no port.
func Listening(pid int, network string, port int) (bool, error) {
	var tables []string
	switch network {
	case "tcp":
		tables = []string{"tcp", "tcp6"}
	case "udp":
		tables = []string{"udp", "udp6"}
	default:
		return false, fmt.Errorf("testenv.Listening: network %q, want tcp or udp", network)
	}
	candidates := map[uint64]bool{}
	for _, table := range tables {
		socks, err := procSockets(pid, table)
		if errors.Is(err, os.ErrNotExist) && table != tables[0] {
			continue // no IPv6
		}
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return false, nil // pid is gone
			}
			return false, err
		}
		for _, s := range socks {
			if int(s.local.Port()) == port && (network == "udp" || s.state == tcpListen) {
				candidates[s.inode] = true
			}
		}
	}
	if len(candidates) == 0 {
		return false, nil
	}
	for _, p := range processTree(pid) {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p)) // a process ending meanwhile has none
		for _, fd := range fds {
			target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", p, fd.Name()))
			if err != nil {
				continue
			}
			inode, ok := strings.CutPrefix(target, "socket:[")
			if !ok {
				continue
			}
			if n, err := strconv.ParseUint(strings.TrimSuffix(inode, "]"), 10, 64); err == nil && candidates[n] {
				return true, nil
			}
		}
	}
	return false, nil
}

// ErrExited is what WaitListening returns when the process ended before it listened.
var ErrExited = errors.New("the process exited before it listened")

// WaitListening waits until Listening(pid, network, port) holds and returns nil then. It
// returns ErrExited as soon as exited is closed first (the process's log says why: another
// process may have taken the port), and an error once within has passed; the bound only
// keeps a broken test from hanging.
func WaitListening(pid int, network string, port int, exited <-chan struct{}, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		ok, err := Listening(pid, network, port)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-exited:
			return ErrExited
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("process %d does not listen on %s port %d after %s", pid, network, port, within)
		}
	}
}
