package main

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/netns"
	"github.com/flowpipe/flowpipe/internal/privilege"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// traversable opens every directory from dir up to / for others to enter (t.TempDir makes
// them 0700), so that a component running as run_as reaches what the test gives it.
func traversable(t *testing.T, dir string) {
	t.Helper()
	for d := dir; d != "/" && d != "."; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm()&0o001 == 0 {
			if err := os.Chmod(d, st.Mode().Perm()|0o011); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// freeLowPort finds a TCP port below 1024 free on 127.0.0.1.
func freeLowPort(t *testing.T) int {
	t.Helper()
	for port := 900; port < 1024; port++ {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			l.Close()
			return port
		}
	}
	t.Fatal("no free port below 1024 on 127.0.0.1")
	return 0
}

// pluginType reads "<kind> <type>" from a plugin process's command line (plugin serve KIND TYPE).
func pluginType(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	if len(args) < 5 {
		t.Fatalf("plugin %d: command line %q", pid, args)
	}
	return args[3] + " " + args[4]
}

// TestPluginProcessesRunWithLeastPrivilege runs a pipeline as root with run_as: flowpipe and
// reads /proc/PID/status of every plugin process: each runs as flowpipe, with no_new_privs,
// and with exactly the capabilities its component declared (effective, and the bounding
// set). Then the conntrack source, as flowpipe with CAP_NET_ADMIN and CAP_SYS_ADMIN, records
// a burst of flows in a test namespace, and the file sink, as flowpipe, writes them.
func TestPluginProcessesRunWithLeastPrivilege(t *testing.T) {
	testenv.RequireRoot(t)
	_, err := exec.LookPath("conntrack")
	testenv.Require(t, err == nil, "conntrack in PATH (Debian package conntrack)")
	uid, gid := testenv.SystemUser(t, "flowpipe")
	p := testenv.NewPair(t)

	dir := t.TempDir()
	traversable(t, dir)
	for _, d := range []string{"out", "data"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(filepath.Join(dir, d), uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	low := freeLowPort(t)
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), fmt.Sprintf(`
run_as: flowpipe
data_dir: data
admin: {listen: ""}
sources:
  kernel: {type: conntrack, netns: %s, activate: true, existing_flows: false}
  gen: {type: generate, rate: 50}
  low: {type: grpc, listen: "127.0.0.1:%d", auth: none}
  high: {type: grpc, listen: "127.0.0.1:0", auth: none}
  capture: {type: userspace, netns: %s, interface: lo, promiscuous: true}  # not the burst's path
sinks:
  out: {type: file, path: out/flows.jsonl}
  nowhere: {type: discard}
`, p.A, low, p.B))
	cmd := exec.Command(binary, "run")
	cmd.Dir = dir
	stderr := &testenv.SyncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	eventually(t, "pipeline running", func() bool { return strings.Contains(stderr.String(), "pipeline running") })

	const (
		netAdmin = 1 << 12
		netRaw   = 1 << 13
		bind     = 1 << 10
		sysAdmin = 1 << 21
	)
	want := map[string]privilege.Set{
		"source conntrack": netAdmin | sysAdmin,
		"source generate":  0,
		"source grpc":      bind, // the first one seen; the other is checked below
		"source userspace": netRaw | netAdmin | sysAdmin,
		"sink file":        0,
		"sink discard":     0,
	}
	children := pluginChildren(t, cmd.Process.Pid)
	if len(children) != 7 {
		t.Fatalf("%d plugin processes, want 7 (one per component)\n%s", len(children), stderr.String())
	}
	grpcCaps := map[privilege.Set]int{}
	for _, pid := range children {
		typ := pluginType(t, pid)
		st, err := privilege.ReadStatus(pid)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s (pid %d): uid %d CapEff %016x CapBnd %016x NoNewPrivs %v", typ, pid, st.UID, uint64(st.CapEff), uint64(st.CapBnd), st.NoNewPrivs)
		if st.UID != uid || st.GID != gid || !st.NoNewPrivs {
			t.Errorf("%s: uid %d gid %d no_new_privs %v, want uid %d gid %d and no_new_privs", typ, st.UID, st.GID, st.NoNewPrivs, uid, gid)
		}
		// Not dumpable (PR_SET_DUMPABLE 0): the kernel then gives /proc/PID to root, so a
		// sibling plugin of the same user cannot read this one's memory or environment.
		var pst syscall.Stat_t
		if err := syscall.Stat(fmt.Sprintf("/proc/%d/environ", pid), &pst); err != nil || pst.Uid != 0 {
			t.Errorf("%s: /proc/%d/environ owned by uid %d (%v), want 0: the plugin is dumpable", typ, pid, pst.Uid, err)
		}
		if typ == "source grpc" {
			grpcCaps[st.CapEff]++
			if st.CapBnd != st.CapEff || st.CapPrm != st.CapEff {
				t.Errorf("%s: CapEff %v CapPrm %v CapBnd %v differ", typ, st.CapEff, st.CapPrm, st.CapBnd)
			}
			continue
		}
		w, ok := want[typ]
		if !ok {
			t.Errorf("unexpected plugin %s", typ)
			continue
		}
		if st.CapEff != w || st.CapPrm != w || st.CapBnd != w {
			t.Errorf("%s: CapEff %v CapPrm %v CapBnd %v, want exactly %v", typ, st.CapEff, st.CapPrm, st.CapBnd, w)
		}
	}
	if grpcCaps[bind] != 1 || grpcCaps[0] != 1 {
		t.Errorf("gRPC receivers: capability sets %v, want one with CAP_NET_BIND_SERVICE (port %d) and one with none", grpcCaps, low)
	}

	// A burst of short UDP flows in namespace A, expired fast and reaped by a table dump.
	testenv.MustRun(t, "ip", "netns", "exec", p.A, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=1")
	ns, err := netns.Open(p.A)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	var srv *net.UDPConn
	nsB, err := netns.Open(p.B)
	if err != nil {
		t.Fatal(err)
	}
	defer nsB.Close()
	if err := nsB.Do(func() (err error) {
		srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(p.B4)})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	dst := srv.LocalAddr().(*net.UDPAddr).AddrPort()
	const n, first = 300, 30000
	if err := ns.Do(func() error {
		for i := 0; i < n; i++ {
			c, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.ParseIP(p.A4), Port: first + i}, net.UDPAddrFromAddrPort(dst))
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("flowpipe"))
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out", "flows.jsonl")
	inBurst := func(e *flow.Event) bool {
		return e.Protocol == flow.ProtoUDP && e.DstPort == dst.Port() && e.SrcPort >= first && e.SrcPort < first+n &&
			e.DstAddr == netip.MustParseAddr(p.B4)
	}
	count := func() (starts, ends map[uint16]int) {
		starts, ends = map[uint16]int{}, map[uint16]int{}
		data, _ := os.ReadFile(out)
		for _, line := range bytes.Split(data, []byte("\n")) {
			var e flow.Event
			if len(line) == 0 || flow.ParseJSON(line, &e) != nil || !inBurst(&e) {
				continue
			}
			switch e.Type {
			case flow.TypeStart:
				starts[e.SrcPort]++
			case flow.TypeEnd:
				ends[e.SrcPort]++
			}
		}
		return starts, ends
	}
	eventually(t, "every start and end of the burst in flows.jsonl", func() bool {
		_ = p.Command(p.A, "conntrack", "-L").Run() // reaps expired entries: their DESTROY events
		s, e := count()
		return len(s) == n && len(e) == n
	})
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("flowpipe exited with %v:\n%s", err, stderr.String())
	}
	starts, ends := count()
	for port := uint16(first); port < first+n; port++ {
		if starts[port] != 1 || ends[port] != 1 {
			t.Errorf("source port %d: %d starts and %d ends, want one each", port, starts[port], ends[port])
		}
	}
	// The file sink wrote as flowpipe.
	var st syscall.Stat_t
	if err := syscall.Stat(out, &st); err != nil || int(st.Uid) != uid {
		t.Errorf("flows.jsonl owned by uid %d (%v), want flowpipe (%d)", st.Uid, err, uid)
	}
}

// runAsUser runs the flowpipe binary as uid:gid (not root) and returns its combined output.
func runAsUser(t *testing.T, dir string, uid, gid int, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestLeastPrivilegeErrors: what a user sees when run_as, file permissions, capabilities or
// a plugin's file mode are not right.
func TestLeastPrivilegeErrors(t *testing.T) {
	testenv.RequireRoot(t)
	uid, gid := testenv.SystemUser(t, "flowpipe")
	dir := t.TempDir()
	traversable(t, dir)

	t.Run("unknown run_as user", func(t *testing.T) {
		writeFile(t, filepath.Join(dir, "nouser.yaml"), "admin: {listen: \"\"}\nrun_as: flowpipe-no-such-user\nsources: {g: {type: generate, count: 2}}\nsinks:\n  o: {type: discard, run_as: another-missing-user}\n")
		_, stderr, code := flowpipe(t, dir, "validate", "-c", "nouser.yaml")
		for _, want := range []string{
			`nouser.yaml:2: run_as: no user "flowpipe-no-such-user" on this machine: create it (useradd --system flowpipe-no-such-user`,
			`nouser.yaml:5: sinks.o.run_as: no user "another-missing-user"`,
		} {
			if code != 1 || !strings.Contains(stderr, want) {
				t.Errorf("validate (exit %d) lacks %q:\n%s", code, want, stderr)
			}
		}
	})

	t.Run("file sink directory not writable by run_as", func(t *testing.T) {
		root := filepath.Join(dir, "rootonly")
		if err := os.Mkdir(root, 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, "denied.yaml"), "admin: {listen: \"\"}\nrun_as: flowpipe\ndata_dir: rootonly\nsources: {g: {type: generate, count: 10}}\nsinks: {o: {type: file, path: rootonly/flows.jsonl}}\n")
		_, stderr, code := flowpipe(t, dir, "run", "-c", "denied.yaml")
		want := fmt.Sprintf("this component runs as user flowpipe (uid %d), which cannot write in %s: give it the directory (chown flowpipe %s)", uid, root, root)
		if code == 0 || !strings.Contains(stderr, want) {
			t.Errorf("run (exit %d) lacks %q:\n%s", code, want, stderr)
		}
	})

	t.Run("missing capability", func(t *testing.T) {
		// flowpipe itself as an unprivileged user: the conntrack source cannot get
		// CAP_NET_ADMIN and says so.
		writeFile(t, filepath.Join(dir, "nocap.yaml"), "admin: {listen: \"\"}\ndata_dir: /tmp\nsources: {k: {type: conntrack}}\nsinks: {o: {type: discard}}\n")
		out, err := runAsUser(t, dir, uid, gid, "run", "-c", "nocap.yaml")
		want := fmt.Sprintf("this needs CAP_NET_ADMIN, which this process (uid %d) does not have: run flowpipe as root", uid)
		if err == nil || !strings.Contains(out, want) || !strings.Contains(out, "AmbientCapabilities=CAP_NET_ADMIN") {
			t.Errorf("run as uid %d (%v) lacks %q:\n%s", uid, err, want, out)
		}
	})

	t.Run("replaceable plugin binary", func(t *testing.T) {
		plugins := filepath.Join(dir, "plugins")
		if err := os.Mkdir(plugins, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(plugins, 0, gid); err != nil {
			t.Fatal(err)
		}
		bin := filepath.Join(plugins, "flowpipe-sink-x")
		writeFile(t, bin, "#!/bin/sh\nexit 1\n")
		writeFile(t, filepath.Join(dir, "plug.yaml"), "admin: {listen: \"\"}\nsources: {g: {type: generate, count: 2}}\nsinks: {o: {plugin: x}}\n")
		for _, tc := range []struct {
			path string
			mode os.FileMode
			want string
		}{
			{bin, 0o777, fmt.Sprintf("plugin binary %s is writable by every user (mode -rwxrwxrwx): refusing to start %s", bin, bin)},
			{plugins, 0o775, fmt.Sprintf("plugin directory %s is writable by group %d (mode -rwxrwxr-x): refusing to start %s", plugins, gid, bin)},
		} {
			if err := os.Chmod(bin, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(plugins, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(tc.path, tc.mode); err != nil {
				t.Fatal(err)
			}
			_, stderr, code := flowpipe(t, dir, "validate", "-c", "plug.yaml")
			if code != 1 || !strings.Contains(stderr, tc.want) {
				t.Errorf("validate (exit %d) lacks %q:\n%s", code, tc.want, stderr)
			}
		}
	})
}
