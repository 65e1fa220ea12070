package main

import (
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// buildDeb builds the Debian package of binary with scripts/package.sh, as
// scripts/release.sh does.
func buildDeb(t *testing.T, bin, version string) string {
	t.Helper()
	out, err := exec.Command("../../scripts/package.sh", bin, runtime.GOARCH, version, t.TempDir()).Output()
	if err != nil {
		msg := ""
		if ee, ok := err.(*exec.ExitError); ok {
			msg = string(ee.Stderr)
		}
		t.Fatalf("scripts/package.sh: %v\n%s", err, msg)
	}
	return strings.TrimSpace(string(out))
}

// TestDebianPackage installs the package on this machine (as CI does, as root), checks what
// an operator gets, upgrades it (the data directory and a conffile edit survive), and purges
// it, leaving the machine as it was.
func TestDebianPackage(t *testing.T) {
	testenv.RequireRoot(t)
	_, err := exec.LookPath("dpkg")
	testenv.Require(t, err == nil, "dpkg in PATH (a Debian machine)")
	testenv.Require(t, exec.Command("dpkg", "-s", "flowpipe").Run() != nil,
		"no flowpipe package installed already (this test installs and purges its own)")
	testenv.LockSystemUser(t, "flowpipe")
	_, lookErr := user.Lookup("flowpipe")
	userBefore := lookErr == nil

	v1 := buildDeb(t, binary, "v0.0.1")
	v2bin := filepath.Join(t.TempDir(), "flowpipe")
	if out, err := exec.Command("go", "build", "-ldflags", "-X main.version=v0.0.2", "-o", v2bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	v2 := buildDeb(t, v2bin, "v0.0.2")

	t.Cleanup(func() {
		_ = exec.Command("dpkg", "--purge", "flowpipe").Run()
		if !userBefore {
			_ = exec.Command("userdel", "flowpipe").Run()
		}
	})
	testenv.MustRun(t, "dpkg", "-i", v1)

	if _, err := user.Lookup("flowpipe"); err != nil {
		t.Errorf("the package did not create the flowpipe user: %v", err)
	}
	for _, d := range []string{"/var/lib/flowpipe", "/var/log/flowpipe"} {
		out := testenv.MustRun(t, "stat", "-c", "%U:%G %a", d)
		if strings.TrimSpace(out) != "root:flowpipe 770" {
			t.Errorf("%s is %s, want root:flowpipe 770", d, out)
		}
	}
	if out := testenv.MustRun(t, "/usr/bin/flowpipe", "version"); !strings.HasPrefix(out, "flowpipe devel") {
		t.Errorf("installed flowpipe version: %q", out)
	}
	verifyUnit(t, "/usr/lib/systemd/system/flowpipe.service")
	// The packaged pipeline is valid on a machine where the package was installed.
	if out, err := exec.Command("/usr/bin/flowpipe", "validate", "-c", "/etc/flowpipe/pipeline.yaml").CombinedOutput(); err != nil {
		t.Errorf("flowpipe validate /etc/flowpipe/pipeline.yaml: %v\n%s", err, out)
	}
	if out := testenv.MustRun(t, "dpkg-query", "-W", "-f", "${Conffiles}", "flowpipe"); !strings.Contains(out, "/etc/flowpipe/pipeline.yaml") {
		t.Errorf("pipeline.yaml is not a conffile: %q", out)
	}

	// Upgrade: a queue in the data directory and the operator's edit survive.
	queue := "/var/lib/flowpipe/queue/local/segment-test"
	if err := os.MkdirAll(filepath.Dir(queue), 0o750); err != nil {
		t.Fatal(err)
	}
	writeFile(t, queue, "queued batches")
	conf, _ := os.ReadFile("/etc/flowpipe/pipeline.yaml")
	edited := string(conf) + "# edited by the operator\n"
	writeFile(t, "/etc/flowpipe/pipeline.yaml", edited)
	testenv.MustRun(t, "dpkg", "--force-confold", "-i", v2)
	if out := testenv.MustRun(t, "/usr/bin/flowpipe", "version"); !strings.HasPrefix(out, "flowpipe v0.0.2\n") {
		t.Errorf("after upgrade: %q", out)
	}
	if b, err := os.ReadFile(queue); err != nil || string(b) != "queued batches" {
		t.Errorf("queue after upgrade: %q, %v", b, err)
	}
	if b, _ := os.ReadFile("/etc/flowpipe/pipeline.yaml"); string(b) != edited {
		t.Errorf("the upgrade replaced the operator's pipeline.yaml")
	}

	testenv.MustRun(t, "dpkg", "--purge", "flowpipe")
	for _, p := range []string{"/usr/bin/flowpipe", "/usr/lib/systemd/system/flowpipe.service", "/etc/flowpipe", "/var/lib/flowpipe", "/var/log/flowpipe", "/usr/lib/flowpipe"} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s remains after dpkg --purge", p)
		}
	}
	if exec.Command("dpkg", "-s", "flowpipe").Run() == nil {
		t.Error("dpkg still lists flowpipe after --purge")
	}
}
