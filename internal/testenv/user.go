package testenv

import (
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/flowpipe/flowpipe/internal/lockfile"
)

// LockSystemUser serialises, across test processes (go test runs packages in parallel),
// the tests that create, use or remove the system user name, until t ends.
func LockSystemUser(t testing.TB, name string) {
	t.Helper()
	f, err := lockfile.Lock(filepath.Join(os.TempDir(), "flowpipe-test-user-"+name+".lock"), true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lockfile.Unlock(f) })
}

// SystemUser makes sure the system user name (and its group) exists while t runs: it is
// created with useradd --system when absent, and removed when t ends only if this call
// created it. It needs root; it holds LockSystemUser.
func SystemUser(t testing.TB, name string) (uid, gid int) {
	t.Helper()
	RequireRoot(t)
	LockSystemUser(t, name)
	u, err := user.Lookup(name)
	if err != nil {
		_, lerr := exec.LookPath("useradd")
		Require(t, lerr == nil, "useradd in PATH (Debian package passwd)")
		MustRun(t, "useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name)
		t.Cleanup(func() { _ = exec.Command("userdel", name).Run() })
		if u, err = user.Lookup(name); err != nil {
			t.Fatal(err)
		}
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}
