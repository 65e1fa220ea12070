// Package lockfile holds advisory locks (flock(2)) on files, so that two flowpipe processes,
// or two components of one, never own the same state at once: a disk queue's directory, a
// conntrack source's record of what it changed on the host. A lock lasts while its file is
// open: Unlock, closing it, or the death of the process, however it dies, releases it.
package lockfile

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// ErrLocked is wrapped by the error of a Lock that does not wait, when another open file
// holds the lock.
var ErrLocked = errors.New("held by another process")

// Lock takes path's lock, exclusive, creating the file (mode 0640) if it does not exist. wait
// says whether to wait until a holder lets it go, or to fail at once with an error wrapping
// ErrLocked. The file is opened read-only: a lock needs no write access to its file.
func Lock(path string, wait bool) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o640)
	if err != nil {
		return nil, err
	}
	how := syscall.LOCK_EX
	if !wait {
		how |= syscall.LOCK_NB
	}
	if err := flock(f, how); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock %s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

// Unlock releases a lock Lock took. A nil f is nothing to release.
func Unlock(f *os.File) {
	if f != nil {
		f.Close() // closing the only descriptor of the open file releases its lock
	}
}

// Held reports whether another open file holds path's lock; a file that does not exist, or
// cannot be opened, is not held. It only looks: a shared lock, taken and let go at once, so
// that two callers that look at the same time do not see each other as holders.
func Held(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	return errors.Is(flock(f, syscall.LOCK_SH|syscall.LOCK_NB), syscall.EWOULDBLOCK)
}

func flock(f *os.File, how int) error {
	for {
		if err := syscall.Flock(int(f.Fd()), how); err != syscall.EINTR {
			return err
		}
	}
}
