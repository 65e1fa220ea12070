package lockfile

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// The lock is another process's to take only once the holder lets it go, whether it unlocks
// or dies; Held sees a holder in this process and in another one, and Held itself holds
// nothing.
func TestLockAcrossProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), ".lock")
	if Held(path) {
		t.Fatal("a lock file that does not exist is held")
	}
	f, err := Lock(path, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Lock(path, false); !errors.Is(err, ErrLocked) {
		t.Fatalf("a second Lock of a held file: %v, want ErrLocked", err)
	}
	if !Held(path) || !Held(path) {
		t.Fatal("a held lock is not Held")
	}
	got := make(chan error, 1)
	go func() {
		g, err := Lock(path, true) // waits for the holder
		Unlock(g)
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("a waiting Lock returned while the lock was held: %v", err)
	case <-time.After(50 * time.Millisecond): // not a timing assertion: it must not return at all
	}
	Unlock(f)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if Held(path) {
		t.Fatal("a released lock is still Held")
	}

	// Held by another process (flock(1) holds it while sleep runs), then free when it dies.
	if _, err := exec.LookPath("flock"); err != nil {
		t.Skip("flock(1) not installed (util-linux)")
	}
	cmd := exec.Command("flock", "-x", "-o", path, "sleep", "60") // -o: the lock is flock's, not sleep's
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	kill := func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) } // flock and sleep
	defer kill()
	deadline := time.Now().Add(10 * time.Second)
	for !Held(path) {
		if time.Now().After(deadline) {
			t.Fatal("flock(1)'s lock never showed as held")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := Lock(path, false); !errors.Is(err, ErrLocked) {
		t.Fatalf("Lock of a file another process holds: %v, want ErrLocked", err)
	}
	kill()
	_ = cmd.Wait()
	f, err = Lock(path, false)
	if err != nil {
		t.Fatalf("the lock of a killed holder: %v", err)
	}
	Unlock(f)
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
}
