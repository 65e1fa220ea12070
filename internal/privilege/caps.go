// Package privilege starts plugin processes with least privilege and explains missing
// privileges. A component declares the Linux capabilities it needs
// (component.NeedsCapabilities); the plugin host starts its process through Wrap, which
// re-executes the host binary as a small launcher that, on the one thread that will exec the
// plugin, empties the capability bounding set down to those capabilities, switches to the
// run_as user, keeps exactly those capabilities (effective, permitted, inheritable and
// ambient, so that they survive the exec), sets no_new_privs, and execs the plugin.
package privilege

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// names of the capabilities by number, as capabilities(7) spells them.
var names = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
	"CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
	"CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
	"CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
	"CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
	"CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
	"CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
	"CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
	"CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
}

// Set is a set of capabilities, bit n for capability number n (as in /proc/PID/status).
type Set uint64

// Parse turns capability names ("CAP_NET_ADMIN", case-insensitive, CAP_ optional) into a set.
func Parse(caps []string) (Set, error) {
	var s Set
	for _, c := range caps {
		n := strings.ToUpper(c)
		if !strings.HasPrefix(n, "CAP_") {
			n = "CAP_" + n
		}
		found := false
		for i, name := range names {
			if name == n {
				s |= 1 << i
				found = true
				break
			}
		}
		if !found {
			return 0, fmt.Errorf("unknown capability %q", c)
		}
	}
	return s, nil
}

// Has reports whether capability number n is in s.
func (s Set) Has(n int) bool { return n >= 0 && n < 64 && s&(1<<n) != 0 }

// Names lists the capabilities in s, in number order.
func (s Set) Names() []string {
	var out []string
	for i := 0; i < 64; i++ {
		if s.Has(i) {
			if i < len(names) {
				out = append(out, names[i])
			} else {
				out = append(out, "cap_"+strconv.Itoa(i))
			}
		}
	}
	return out
}

func (s Set) String() string {
	if s == 0 {
		return "none"
	}
	return strings.Join(s.Names(), ",")
}

// lastCap is the highest capability the running kernel knows.
func lastCap() int {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n < 64 {
			return n
		}
	}
	return unix.CAP_LAST_CAP
}

// Current is this thread's effective and permitted capability sets.
func Current() (effective, permitted Set, err error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 0, 0, fmt.Errorf("capget: %w", err)
	}
	effective = Set(data[0].Effective) | Set(data[1].Effective)<<32
	permitted = Set(data[0].Permitted) | Set(data[1].Permitted)<<32
	return effective, permitted, nil
}

func capset(eff, perm, inh Set) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(eff), Permitted: uint32(perm), Inheritable: uint32(inh)},
		{Effective: uint32(eff >> 32), Permitted: uint32(perm >> 32), Inheritable: uint32(inh >> 32)},
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	return nil
}
