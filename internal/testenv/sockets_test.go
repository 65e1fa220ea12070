package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// listenerEnv makes the test binary a child that listens on TCP 127.0.0.1:0, prints the
// port and waits (TestListenerChild); with a value of "grandchild", it first starts another
// copy of itself that does so, as a flowpipe host's plugin process listens for it.
const listenerEnv = "TESTENV_LISTENER_CHILD"

func TestListenerChild(t *testing.T) {
	switch os.Getenv(listenerEnv) {
	case "":
		return // run as a helper process only
	case "grandchild":
		cmd := exec.Command(os.Args[0], "-test.run=^TestListenerChild$")
		cmd.Env = append(os.Environ(), listenerEnv+"=child")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			t.Fatal(err)
		}
	default:
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		fmt.Println(l.Addr().(*net.TCPAddr).Port)
		os.Stdin.Read(make([]byte, 1)) // until the test closes our stdin
	}
}

// startListener runs the helper process and returns it and the port it listens on.
func startListener(t *testing.T, mode string) (*exec.Cmd, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestListenerChild$")
	cmd.Env = append(os.Environ(), listenerEnv+"="+mode)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("helper process: %v", err)
	}
	port, err := strconv.Atoi(line[:len(line)-1])
	if err != nil {
		t.Fatalf("helper process printed %q", line)
	}
	return cmd, port
}

// Listening tells the process tree that owns a listening socket from one whose port another
// process holds: the case a dial cannot tell apart.
func TestListeningOwnership(t *testing.T) {
	self := os.Getpid()
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		if ok, err := Listening(self, "tcp", port); err != nil || !ok {
			t.Errorf("Listening(self, tcp, %d) = %v, %v with a listener on %s", port, ok, err, l.Addr())
		}
		l.Close()
		if ok, err := Listening(self, "tcp", port); err != nil || ok {
			t.Errorf("Listening(self, tcp, %d) = %v, %v after the listener on %s closed", port, ok, err, l.Addr())
		}
	}

	// A connected socket on the port is not a listener.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	accepted, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer accepted.Close()
	l.Close()
	if port := c.RemoteAddr().(*net.TCPAddr).Port; mustListening(t, self, "tcp", port) {
		t.Errorf("Listening(self, tcp, %d) with only the accepted connection's socket left on the port", port)
	}

	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if port := pc.LocalAddr().(*net.UDPAddr).Port; !mustListening(t, self, "udp", port) || mustListening(t, self, "tcp", port) {
		t.Errorf("a UDP socket on %d: want Listening for udp only", port)
	}
	pc.Close()

	// The listener of a grandchild (a host's plugin process) is its grandparent's tree's.
	grand, port := startListener(t, "grandchild")
	if !mustListening(t, grand.Process.Pid, "tcp", port) || !mustListening(t, self, "tcp", port) {
		t.Errorf("the grandchild's listener on %d is not found in the trees of its grandparent and of this test", port)
	}
	// Another process's listener is not ours, though a dial to it succeeds.
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	if mustListening(t, other.Process.Pid, "tcp", port) {
		t.Errorf("Listening(sleep, tcp, %d) while only another process listens there", port)
	}
	if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err != nil {
		t.Fatalf("dial the helper: %v", err)
	} else {
		c.Close()
	}
	if ok, err := Listening(1<<30, "tcp", port); err != nil || ok {
		t.Errorf("Listening(a pid that does not exist) = %v, %v", ok, err)
	}
}

func mustListening(t *testing.T, pid int, network string, port int) bool {
	t.Helper()
	ok, err := Listening(pid, network, port)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// WaitListening returns once the process listens, and ErrExited at once for one that exits
// without listening.
func TestWaitListening(t *testing.T) {
	cmd, port := startListener(t, "child")
	if err := WaitListening(cmd.Process.Pid, "tcp", port, nil, time.Minute); err != nil {
		t.Fatal(err)
	}
	sh := exec.Command("true")
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { sh.Wait(); close(exited) }()
	if err := WaitListening(sh.Process.Pid, "tcp", port, exited, time.Minute); !errors.Is(err, ErrExited) {
		t.Fatalf("WaitListening of a process that exits without listening = %v, want ErrExited", err)
	}
}

// KillTree ends a host and its plugin process at once: when it returns, the port the plugin
// listened on is held by nobody.
func TestKillTree(t *testing.T) {
	host, port := startListener(t, "grandchild")
	tree := processTree(host.Process.Pid)
	if len(tree) != 2 {
		t.Fatalf("process tree of the helper: %v, want it and its child", tree)
	}
	if err := KillTree(host.Process.Pid, time.Minute); err != nil {
		t.Fatal(err)
	}
	for _, p := range tree {
		if Alive(p) {
			t.Errorf("process %d alive after KillTree", p)
		}
	}
	if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err != nil {
		t.Errorf("the port of the killed tree's listener: %v", err)
	} else {
		l.Close()
	}
}

// TestFreePortsDistinct: ports handed out in one process are never the same twice (a NATS
// node once got one port for its clients and its routes), bind, and lie below the kernel's
// ephemeral range, where no connection of another process takes them.
func TestFreePortsDistinct(t *testing.T) {
	low := ephemeralLow()
	for _, network := range []string{"tcp", "udp"} {
		seen := map[int]bool{}
		for range 300 {
			var p int
			if network == "tcp" {
				p = FreeTCPPort(t)
			} else {
				p = FreeUDPPort(t)
			}
			if seen[p] {
				t.Fatalf("%s port %d handed out twice", network, p)
			}
			seen[p] = true
			if p >= low {
				t.Errorf("%s port %d is in the ephemeral range (from %d)", network, p, low)
			}
			if _, ok := tryBind(network, p); !ok {
				t.Errorf("%s port %d does not bind", network, p)
			}
		}
	}
	if addr := FreeTCPAddr(t); Port(t, addr) >= low {
		t.Errorf("FreeTCPAddr %s is in the ephemeral range", addr)
	}
}
