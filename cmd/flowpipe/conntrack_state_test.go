package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// The conntrack source records what it changes on the host before changing it, so that a
// flowpipe killed with SIGKILL (no chance to undo anything) is cleaned up after by the next
// start, which must not take the leftovers for the host's own settings: after kill -9, a new
// start and a clean stop, the sysctls and the nftables tables are as they were before.
// A real namespace, the real binary, the default isolation (the source is a plugin process).
func TestConntrackRestoresTheHostAfterKill9(t *testing.T) {
	testenv.RequireRoot(t)
	_, err := exec.LookPath("nft")
	testenv.Require(t, err == nil, "nft (Debian package nftables)")
	p := testenv.NewPair(t)
	const acct = "/proc/sys/net/netfilter/nf_conntrack_acct"
	const stamp = "/proc/sys/net/netfilter/nf_conntrack_timestamp"
	sysctl := func(path string) string {
		return strings.TrimSpace(p.Exec(t, p.A, "cat", path))
	}
	// The host's values, pinned to 0 (the files are the namespace's own).
	p.Exec(t, p.A, "sh", "-c", "echo 0 >"+acct+" && echo 0 >"+stamp)
	tables := func() string { return strings.TrimSpace(p.Exec(t, p.A, "nft", "list", "tables")) }
	origTables := tables()

	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), `
admin: {listen: ""}
data_dir: state
sources:
  kernel: {type: conntrack, netns: `+p.A+`, activate: true}
sinks:
  out: {type: file, path: flows.jsonl}
`)
	// One record per running instance of the source (host-changes-<id>.json).
	records := func() []string {
		m, _ := filepath.Glob(filepath.Join(dir, "state", "conntrack", "kernel", "host-changes*.json"))
		return m
	}

	cmd, stderr := runUntilRunning(t, dir)
	if sysctl(acct) != "1" || sysctl(stamp) != "1" || !strings.Contains(tables(), "flowpipe_kernel") {
		t.Fatalf("the source did not set the host up: acct=%s timestamp=%s tables=%q\n%s", sysctl(acct), sysctl(stamp), tables(), stderr.String())
	}
	if r := records(); len(r) != 1 {
		t.Fatalf("records of the host changes: %v, want one", r)
	}
	children := pluginChildren(t, cmd.Process.Pid)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_, _ = cmd.Process.Wait()
	for _, pid := range children { // the parent-death signal kills the plugin too
		eventually(t, "the conntrack plugin to die with flowpipe", func() bool { return !testenv.Alive(pid) })
	}
	if sysctl(acct) != "1" {
		t.Fatal("kill -9 undid the sysctl: the test does not exercise a leftover")
	}

	cmd, stderr = runUntilRunning(t, dir)
	if !strings.Contains(stderr.String(), "restored what it had changed on the host") {
		t.Errorf("the second start did not say it restored the leftovers:\n%s", stderr.String())
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, cmd, stderr, time.Minute); code != 0 {
		t.Fatalf("clean stop exited %d:\n%s", code, stderr.String())
	}
	if sysctl(acct) != "0" || sysctl(stamp) != "0" {
		t.Errorf("after kill -9, restart and a clean stop: acct=%s timestamp=%s, want the host's 0 and 0\n%s", sysctl(acct), sysctl(stamp), stderr.String())
	}
	if got := tables(); got != origTables {
		t.Errorf("nftables tables %q, want %q as before", got, origTables)
	}
	if r := records(); len(r) != 0 {
		t.Errorf("records still there after a clean stop: %v", r)
	}
}
