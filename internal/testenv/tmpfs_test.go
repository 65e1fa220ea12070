package testenv

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestTmpfs: the mount is a tmpfs of the size asked, a write past it fails with ENOSPC, and
// it is unmounted when the test ends.
func TestTmpfs(t *testing.T) {
	var dir string
	t.Run("mounted", func(t *testing.T) {
		dir = Tmpfs(t, "256k")
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		if total := int64(st.Blocks) * int64(st.Bsize); total != 256<<10 {
			t.Errorf("tmpfs size %d bytes, want %d", total, 256<<10)
		}
		err := os.WriteFile(filepath.Join(dir, "big"), make([]byte, 1<<20), 0o600)
		if !errors.Is(err, syscall.ENOSPC) {
			t.Errorf("writing 1MiB on a 256KiB tmpfs: %v, want ENOSPC", err)
		}
	})
	if dir == "" {
		return // skipped
	}
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mounts), " "+dir+" ") {
		t.Errorf("%s is still mounted after its test ended", dir)
	}
}
