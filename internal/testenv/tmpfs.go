package testenv

import (
	"os/exec"
	"testing"
)

// Tmpfs mounts a tmpfs of size bytes (a mount size such as "1m") on a new t.TempDir() and
// unmounts it when t ends: a small disk that tests can fill. It needs root (RequireRoot).
func Tmpfs(t testing.TB, size string) string {
	t.Helper()
	RequireRoot(t)
	_, err := exec.LookPath("mount")
	Require(t, err == nil, "mount in PATH (Debian package mount)")
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0755", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount a %s tmpfs on %s: %v: %s", size, dir, err, out)
	}
	// Registered after TempDir's own cleanup, so it runs first: the directory is emptied
	// only once it is a plain directory again.
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}
