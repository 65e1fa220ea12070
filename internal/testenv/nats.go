package testenv

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// NATSCluster is a cluster of real nats-server processes (Debian's nats-server package) with
// JetStream, on loopback, each with its own store in a temporary directory; stopped and
// removed when the test ends.
type NATSCluster struct {
	t     testing.TB
	Nodes []*NATSNode
}

// NATSNode is one server of a NATSCluster.
type NATSNode struct {
	Name   string
	URL    string // nats://127.0.0.1:port
	conf   string
	dir    string
	port   int // clients'
	mon    int
	route  int // the cluster's; 0 for a single server
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has ended
	log    *os.File
}

// NATSAuth, when not empty, is the user and password every client must present.
type NATSAuth struct{ User, Password string }

// StartNATSCluster starts n JetStream servers clustered together (n = 1: a single server)
// and waits until every one is healthy. A node that exits because another process took one of
// its ports before it bound it (FreeTCPPort reserves nothing) does not fail the test: the
// cluster is started again on fresh ports, up to three times.
func StartNATSCluster(t testing.TB, n int, auth NATSAuth) *NATSCluster {
	t.Helper()
	bin, err := exec.LookPath("nats-server")
	Require(t, err == nil, "nats-server in PATH (apt-get install nats-server)")
	c := &NATSCluster{t: t}
	t.Cleanup(func() {
		for _, nd := range c.Nodes {
			nd.stop()
		}
	})
	for attempt := 1; ; attempt++ {
		c.configure(n, auth, t.TempDir())
		for _, nd := range c.Nodes {
			c.start(bin, nd)
		}
		var failed error
		for _, nd := range c.Nodes {
			if failed = c.waitHealthy(nd); failed != nil {
				break
			}
		}
		if failed == nil {
			return c
		}
		if attempt == 3 || !strings.Contains(failed.Error(), "address already in use") {
			t.Fatal(failed)
		}
		t.Logf("nats cluster, attempt %d: a port was taken by another process before its node bound it; starting again on fresh ports", attempt)
		for _, nd := range c.Nodes {
			nd.stop()
		}
	}
}

// configure chooses the nodes' ports and writes their configuration files into dir.
func (c *NATSCluster) configure(n int, auth NATSAuth, dir string) {
	t := c.t
	t.Helper()
	c.Nodes = nil
	clients, routes, mons := make([]int, n), make([]int, n), make([]int, n)
	for i := range n {
		clients[i], routes[i], mons[i] = FreeTCPPort(t), FreeTCPPort(t), FreeTCPPort(t)
	}
	for i := range n {
		name := fmt.Sprintf("n%d", i+1)
		nd := &NATSNode{Name: name, URL: fmt.Sprintf("nats://127.0.0.1:%d", clients[i]), dir: filepath.Join(dir, name), port: clients[i], mon: mons[i]}
		var b strings.Builder
		fmt.Fprintf(&b, "server_name: %s\nlisten: 127.0.0.1:%d\nhttp: 127.0.0.1:%d\n", name, clients[i], mons[i])
		fmt.Fprintf(&b, "jetstream {\n  store_dir: %q\n  max_memory_store: 256MB\n  max_file_store: 2GB\n}\n", nd.dir)
		if auth.User != "" {
			fmt.Fprintf(&b, "authorization {\n  user: %q\n  password: %q\n}\n", auth.User, auth.Password)
		}
		if n > 1 {
			fmt.Fprintf(&b, "cluster {\n  name: flowpipe-test\n  listen: 127.0.0.1:%d\n  routes: [\n", routes[i])
			for j := range n {
				if j != i {
					fmt.Fprintf(&b, "    nats-route://127.0.0.1:%d\n", routes[j])
				}
			}
			b.WriteString("  ]\n}\n")
		}
		nd.conf = filepath.Join(dir, name+".conf")
		if err := os.WriteFile(nd.conf, []byte(b.String()), 0o600); err != nil {
			t.Fatal(err)
		}
		if n > 1 {
			nd.route = routes[i]
		}
		c.Nodes = append(c.Nodes, nd)
	}
}

// URLs are the client URLs of the running nodes.
func (c *NATSCluster) URLs() []string {
	var out []string
	for _, nd := range c.Nodes {
		out = append(out, nd.URL)
	}
	return out
}

func (c *NATSCluster) start(bin string, nd *NATSNode) {
	c.t.Helper()
	f, err := os.OpenFile(filepath.Join(filepath.Dir(nd.conf), nd.Name+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		c.t.Fatal(err)
	}
	nd.log = f
	nd.cmd = exec.Command(bin, "-c", nd.conf)
	nd.cmd.Stdout, nd.cmd.Stderr = f, f
	nd.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := nd.cmd.Start(); err != nil {
		c.t.Fatalf("start nats-server %s: %v", nd.Name, err)
	}
	nd.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) { cmd.Wait(); close(exited) }(nd.cmd, nd.exited)
}

// waitHealthy waits until the node's own process listens on its client, monitoring and cluster ports
// (not another process that took one after FreeTCPPort chose it: the node then exits, and a
// probe of the port would get the other's answer), then until it reports itself healthy.
func (c *NATSCluster) waitHealthy(nd *NATSNode) error {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for _, port := range []int{nd.port, nd.mon, nd.route} {
		if port == 0 {
			continue
		}
		if err := WaitListening(nd.cmd.Process.Pid, "tcp", port, nd.exited, time.Until(deadline)); err != nil {
			log, _ := os.ReadFile(nd.log.Name())
			return fmt.Errorf("nats-server %s: %v; its log:\n%s", nd.Name, err, log)
		}
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz", nd.mon)
	for time.Now().Before(deadline) {
		select {
		case <-nd.exited:
			log, _ := os.ReadFile(nd.log.Name())
			return fmt.Errorf("nats-server %s exited before it was healthy; its log:\n%s", nd.Name, log)
		default:
		}
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	log, _ := os.ReadFile(nd.log.Name())
	return fmt.Errorf("nats-server %s not healthy within 30s; its log:\n%s", nd.Name, log)
}

// Kill kills node i with SIGKILL (its store stays, for Restart).
func (c *NATSCluster) Kill(i int) {
	c.Nodes[i].stop()
}

// Restart starts node i again with its store and waits until it is healthy.
func (c *NATSCluster) Restart(i int) {
	c.t.Helper()
	bin, _ := exec.LookPath("nats-server")
	c.start(bin, c.Nodes[i])
	if err := c.waitHealthy(c.Nodes[i]); err != nil {
		c.t.Fatal(err)
	}
}

func (nd *NATSNode) stop() {
	if nd.cmd == nil || nd.cmd.Process == nil {
		return
	}
	nd.cmd.Process.Kill()
	<-nd.exited
	nd.cmd = nil
	nd.log.Close()
}
