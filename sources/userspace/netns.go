package userspace

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// inNetns runs fn on an OS thread inside the network namespace spec (a name under /run/netns
// or a path); "" runs fn where it is. A socket opened by fn belongs to that namespace for its
// whole life, whichever thread later reads it, so only the opening needs the switch.
func inNetns(spec string, fn func() error) error {
	if spec == "" {
		return fn()
	}
	path := spec
	if !strings.Contains(spec, "/") {
		path = filepath.Join("/run/netns", spec)
	}
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open network namespace %q: %w (create it with `ip netns add`, or give a path such as /proc/PID/ns/net)", spec, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	// A fresh goroutine whose thread is never unlocked if it cannot return to its own
	// namespace: the runtime then discards the thread instead of reusing it elsewhere.
	go func() {
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open the current network namespace: %w", err)
			return
		}
		defer home.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter network namespace %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}
