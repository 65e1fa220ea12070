package conntrack

import (
	"bytes"
	"fmt"
	"os"

	"github.com/flowpipe/flowpipe/internal/netns"
)

// Sysctls that make the kernel put what an end event needs into its DESTROY messages:
// byte and packet counters, and start and stop times.
const (
	sysctlAcct      = "/proc/sys/net/netfilter/nf_conntrack_acct"
	sysctlTimestamp = "/proc/sys/net/netfilter/nf_conntrack_timestamp"
)

// sysctlChange is a sysctl a source set, with the value to put back when it stops.
type sysctlChange struct {
	path string
	prev []byte
}

// setSysctl writes value to the sysctl at path inside ns and returns the change to undo, or
// nil when the sysctl already had that value (nothing to restore then).
func setSysctl(ns *netns.NS, path, value string) (*sysctlChange, error) {
	var ch *sysctlChange
	err := ns.Do(func() error {
		prev, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("read %s in %s: %w (is the nf_conntrack module loaded?)", path, ns, err)
		}
		prev = bytes.TrimSpace(prev)
		if string(prev) == value {
			return nil
		}
		if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
			return fmt.Errorf("set %s=%s in %s: %w (needs CAP_NET_ADMIN in that namespace)", path, value, ns, err)
		}
		ch = &sysctlChange{path: path, prev: prev}
		return nil
	})
	return ch, err
}

// restore puts the previous value back.
func (c *sysctlChange) restore(ns *netns.NS) error {
	return ns.Do(func() error {
		if err := os.WriteFile(c.path, c.prev, 0o644); err != nil {
			return fmt.Errorf("restore %s=%s in %s: %w", c.path, c.prev, ns, err)
		}
		return nil
	})
}

// readSysctl reads a sysctl inside ns.
func readSysctl(ns *netns.NS, path string) (string, error) {
	var v []byte
	err := ns.Do(func() error {
		var err error
		v, err = os.ReadFile(path)
		return err
	})
	return string(bytes.TrimSpace(v)), err
}
