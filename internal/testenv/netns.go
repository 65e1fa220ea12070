package testenv

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Pair is two network namespaces joined by a veth pair: A (10.x.y.1, fdxx::1) and
// B (10.x.y.2, fdxx::2), both links up, loopback up in each. The names are unique per call
// and everything is removed when the test ends.
type Pair struct {
	A, B       string // namespace names (ip netns)
	IfA, IfB   string // veth names inside A and B
	A4, B4     string // IPv4 addresses without prefix length
	A6, B6     string // IPv6 addresses without prefix length
	SubnetBits int
}

// NewPair creates a namespace pair; it needs root (call RequireRoot first).
func NewPair(t testing.TB) *Pair {
	t.Helper()
	var rnd [3]byte
	_, _ = rand.Read(rnd[:])
	id := hex.EncodeToString(rnd[:])
	p := &Pair{
		A: "fpA" + id, B: "fpB" + id,
		IfA: "va" + id, IfB: "vb" + id,
		A4: fmt.Sprintf("10.%d.%d.1", 100+int(rnd[0])%100, rnd[1]),
		B4: fmt.Sprintf("10.%d.%d.2", 100+int(rnd[0])%100, rnd[1]),
		A6: fmt.Sprintf("fd%02x:%02x%02x::1", rnd[0], rnd[1], rnd[2]),
		B6: fmt.Sprintf("fd%02x:%02x%02x::2", rnd[0], rnd[1], rnd[2]),
	}
	t.Cleanup(func() {
		_ = exec.Command("ip", "netns", "del", p.A).Run()
		_ = exec.Command("ip", "netns", "del", p.B).Run()
	})
	MustRun(t, "ip", "netns", "add", p.A)
	MustRun(t, "ip", "netns", "add", p.B)
	MustRun(t, "ip", "link", "add", p.IfA, "netns", p.A, "type", "veth", "peer", "name", p.IfB, "netns", p.B)
	for _, s := range []struct{ ns, ifc, a4, a6 string }{{p.A, p.IfA, p.A4, p.A6}, {p.B, p.IfB, p.B4, p.B6}} {
		MustRun(t, "ip", "-n", s.ns, "link", "set", "lo", "up")
		MustRun(t, "ip", "-n", s.ns, "addr", "add", s.a4+"/24", "dev", s.ifc)
		MustRun(t, "ip", "-n", s.ns, "addr", "add", s.a6+"/64", "dev", s.ifc, "nodad")
		MustRun(t, "ip", "-n", s.ns, "link", "set", s.ifc, "up")
	}
	// "link set up" returns before the kernel's link watcher has run for the new device; until
	// it has, the device has no active queue and drops what is sent. A test's first packet
	// then waits for an ARP retry a second later (longer than the 1 s conntrack timeouts some
	// tests set), which a loaded machine made happen. Wait until both ends are operationally up.
	for _, s := range []struct{ ns, ifc string }{{p.A, p.IfA}, {p.B, p.IfB}} {
		waitOperUp(t, s.ns, s.ifc)
	}
	return p
}

// waitOperUp waits (bounded, a hang guard) until interface ifc in namespace ns reports
// operstate up.
func waitOperUp(t testing.TB, ns, ifc string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command("ip", "-n", ns, "-o", "link", "show", "dev", ifc).CombinedOutput()
		if err == nil && strings.Contains(string(out), " state UP ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("interface %s in namespace %s is not up: %v\n%s", ifc, ns, err, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Exec runs a command inside namespace ns and returns its combined output; it fails t on
// error.
func (p *Pair) Exec(t testing.TB, ns string, name string, args ...string) string {
	t.Helper()
	return MustRun(t, "ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

// Command returns a command that will run inside namespace ns (not started).
func (p *Pair) Command(ns string, name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

// MustRun runs a command and fails t with its output when it fails.
func MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out.String())
	}
	return out.String()
}
