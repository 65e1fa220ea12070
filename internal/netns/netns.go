package conntrack

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// netNS is the network namespace a source reads. A nil *netNS is the namespace of the
// process, which needs no switching.
type netNS struct {
	path string
	f    *os.File
}

// openNetNS opens a namespace by name (a file in /run/netns, as `ip netns` makes) or by path
// (anything with a slash, such as /proc/1234/ns/net); "" is the current namespace.
func openNetNS(spec string) (*netNS, error) {
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
	return &netNS{path: path, f: f}, nil
}

// fd is the namespace's file descriptor for netlink.Config.NetNS and nftables; 0 means the
// current namespace.
func (ns *netNS) fd() int {
	if ns == nil {
		return 0
	}
	return int(ns.f.Fd())
}

func (ns *netNS) String() string {
	if ns == nil {
		return "the current network namespace"
	}
	return "network namespace " + ns.path
}

func (ns *netNS) Close() error {
	if ns == nil {
		return nil
	}
	return ns.f.Close()
}

// do runs fn on an OS thread that has entered the namespace. Sockets fn opens stay in the
// namespace after it returns, and files under /proc/sys/net are the namespace's own. The
// thread runs in a goroutine of its own so that, if it cannot go back to its namespace, it
// is thrown away with the goroutine rather than reused by the Go scheduler.
func (ns *netNS) do(fn func() error) error {
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
		if err := unix.Setns(ns.fd(), unix.CLONE_NEWNET); err != nil {
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
