// Package netns enters Linux network namespaces: it opens one by name (as `ip netns` makes
// them) or by path, and runs a function on an OS thread inside it. Sockets opened there stay
// in that namespace for their whole life, whichever thread later uses them, so only the
// opening needs the switch; files under /proc/sys/net read there are the namespace's own.
package netns

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// NS is an open network namespace. A nil *NS is the namespace of the process, which needs
// no switching.
type NS struct {
	path string
	f    *os.File
}

// Open opens a namespace by name (a file in /run/netns, as `ip netns` makes) or by path
// (anything with a slash, such as /proc/1234/ns/net); "" is the current namespace (nil).
func Open(spec string) (*NS, error) {
	if spec == "" {
		return nil, nil
	}
	path := spec
	if !strings.Contains(spec, "/") {
		path = filepath.Join("/run/netns", spec)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %q: %w (create it with `ip netns add`, or give a path such as /proc/PID/ns/net)", spec, err)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil || (st.Type != unix.NSFS_MAGIC && st.Type != unix.PROC_SUPER_MAGIC) {
		f.Close()
		return nil, fmt.Errorf("network namespace %q: %s is not a namespace file", spec, path)
	}
	return &NS{path: path, f: f}, nil
}

// Fd is the namespace's file descriptor, for netlink.Config.NetNS and nftables; 0 means the
// current namespace.
func (ns *NS) Fd() int {
	if ns == nil {
		return 0
	}
	return int(ns.f.Fd())
}

func (ns *NS) String() string {
	if ns == nil {
		return "the current network namespace"
	}
	return "network namespace " + ns.path
}

// Close closes the namespace file.
func (ns *NS) Close() error {
	if ns == nil {
		return nil
	}
	return ns.f.Close()
}

// Do runs fn on an OS thread that has entered the namespace. Sockets fn opens stay in the
// namespace after it returns, and files under /proc/sys/net are the namespace's own. The
// thread runs in a goroutine of its own so that, if it cannot go back to its namespace, it
// is thrown away with the goroutine rather than reused by the Go scheduler.
func (ns *NS) Do(fn func() error) error {
	if ns == nil {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(ns.Fd(), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it dies with this goroutine.
			errc <- fmt.Errorf("return from %s: %w", ns, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Run runs fn inside the namespace spec (see Open); "" runs it where it is.
func Run(spec string, fn func() error) error {
	ns, err := Open(spec)
	if err != nil {
		return err
	}
	defer ns.Close()
	return ns.Do(fn)
}

// ID identifies the namespace itself (the device and inode of its nsfs file), so that a
// record made in one namespace is not applied to another that took its name later.
func (ns *NS) ID() (string, error) {
	var st unix.Stat_t
	var err error
	if ns == nil {
		err = unix.Stat("/proc/self/ns/net", &st)
	} else {
		err = unix.Fstat(int(ns.f.Fd()), &st)
	}
	if err != nil {
		return "", fmt.Errorf("identify %s: %w", ns, err)
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino), nil
}
