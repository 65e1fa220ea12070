package privilege

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// specEnv carries a Spec from Wrap to the launcher (this package's init) in the
// environment of the re-executed host binary; the launcher removes it before the exec.
const specEnv = "FLOWPIPE_PRIVILEGE_SPEC"

// Spec is how one plugin process starts.
type Spec struct {
	// Caps are the capabilities the process keeps (capability names); the bounding set is
	// emptied of every other, so that not even a set-uid binary could bring one back.
	Caps []string `json:"caps,omitempty"`
	// User, when set, is the run_as user the process runs as (the host must be root).
	User *User `json:"user,omitempty"`

	// Set by Wrap.
	Path      string `json:"path"`             // the plugin binary
	SHA256    string `json:"sha256,omitempty"` // checked just before the exec
	ParentPID int    `json:"ppid"`             // the host: the process dies with it
}

// User is a resolved run_as user.
type User struct {
	Name   string `json:"name"`
	UID    int    `json:"uid"`
	GID    int    `json:"gid"`
	Groups []int  `json:"groups,omitempty"` // supplementary groups
}

// SelfExe names the file the running process was started from, whatever its path names now:
// a flowpipe replaced on disk while it runs (an upgrade; the old file is renamed over or
// removed, and a running binary cannot be written in place) still starts its plugins, and its
// launcher, from its own binary, the one whose protocol it speaks.
const SelfExe = "/proc/self/exe"

// SelfCommand is a command that runs this binary (SelfExe) with args; argv[0] is its path,
// so that ps shows a name.
func SelfCommand(args ...string) (*exec.Cmd, error) {
	if err := selfExecutable(); err != nil {
		return nil, err
	}
	cmd := exec.Command(SelfExe, args...)
	if exe, err := os.Executable(); err == nil {
		cmd.Args[0] = exe
	}
	return cmd, nil
}

func selfExecutable() error {
	if _, err := os.Stat(SelfExe); err != nil {
		return fmt.Errorf("flowpipe starts its plugin processes from its own binary, %s: %w (is /proc mounted?)", SelfExe, err)
	}
	return nil
}

// Wrap makes cmd start through the launcher: cmd runs the host binary (SelfExe, which
// imports this package), which applies s and then execs what cmd named, with the same
// arguments and environment. sum, when not nil, is the SHA-256 the plugin binary must have;
// the launcher checks it (cmd.Path no longer names the plugin, so a checksum of cmd.Path
// would be the host's).
func Wrap(cmd *exec.Cmd, s Spec, sum []byte) error {
	if err := selfExecutable(); err != nil {
		return err
	}
	if _, err := Parse(s.Caps); err != nil {
		return err
	}
	s.Path = cmd.Path
	if sum != nil {
		s.SHA256 = hex.EncodeToString(sum)
	}
	s.ParentPID = os.Getpid()
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	if len(cmd.Args) == 0 {
		cmd.Args = []string{cmd.Path}
	}
	cmd.Path = SelfExe
	cmd.Env = append(cmd.Env, specEnv+"="+string(b))
	return nil
}

func init() {
	v, ok := os.LookupEnv(specEnv)
	if !ok {
		return
	}
	_ = os.Unsetenv(specEnv)
	err := launch(v)
	// launch returns only on failure. The host logs this process's output.
	fmt.Fprintf(os.Stderr, "flowpipe: cannot start plugin with least privilege: %v\n", err)
	os.Exit(126)
}

// launch applies the spec to this thread, which then execs the plugin. Every step is a
// per-thread system call on the locked thread (not Go's process-wide setuid), because only
// the exec'ing thread's credentials pass to the plugin; the exec ends the other threads.
func launch(v string) error {
	runtime.LockOSThread()
	var s Spec
	if err := json.Unmarshal([]byte(v), &s); err != nil {
		return fmt.Errorf("bad %s: %w", specEnv, err)
	}
	keep, err := Parse(s.Caps)
	if err != nil {
		return err
	}
	if s.SHA256 != "" {
		if err := checkSum(s.Path, s.SHA256); err != nil {
			return err
		}
	}
	eff, perm, err := Current()
	if err != nil {
		return err
	}
	// 1. The bounding set: every capability not kept goes (needs CAP_SETPCAP; a host without
	// it has no capabilities to lose, and no_new_privs below stops it gaining any).
	if eff.Has(unix.CAP_SETPCAP) {
		for c := 0; c <= lastCap(); c++ {
			if !keep.Has(c) {
				if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
					return fmt.Errorf("drop %s from the bounding set: %w", Set(1<<c), err)
				}
			}
		}
	}
	// 2. The user. KEEPCAPS keeps the permitted set across the uid change.
	if u := s.User; u != nil {
		if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("keep capabilities: %w", err)
		}
		groups := make([]uint32, 0, len(u.Groups)+1)
		groups = append(groups, uint32(u.GID))
		for _, g := range u.Groups {
			if g != u.GID {
				groups = append(groups, uint32(g))
			}
		}
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETGROUPS, uintptr(len(groups)), uintptr(unsafe.Pointer(&groups[0])), 0); e != 0 {
			return fmt.Errorf("set groups of %s: %w", u.Name, e)
		}
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESGID, uintptr(u.GID), uintptr(u.GID), uintptr(u.GID)); e != 0 {
			return fmt.Errorf("set group %d of %s: %w", u.GID, u.Name, e)
		}
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESUID, uintptr(u.UID), uintptr(u.UID), uintptr(u.UID)); e != 0 {
			return fmt.Errorf("become %s (uid %d): %w", u.Name, u.UID, e)
		}
		if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 0, 0, 0, 0); err != nil {
			return fmt.Errorf("reset keepcaps: %w", err)
		}
	}
	// 3. Exactly the kept capabilities, in every set; ambient ones survive the exec of an
	// ordinary binary. A capability the host does not have cannot be given: the component
	// says so when it needs it (Explain).
	keep &= perm
	if err := capset(keep, keep, keep); err != nil {
		return err
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	for c := 0; c < 64; c++ {
		if keep.Has(c) {
			if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE, uintptr(c), 0, 0); err != nil {
				return fmt.Errorf("raise ambient %s: %w", Set(1<<c), err)
			}
		}
	}
	// 4. The kernel clears the parent-death signal on a uid change: set it again, then make
	// sure the host did not die before that.
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0, 0, 0); err != nil {
		return fmt.Errorf("set parent-death signal: %w", err)
	}
	if s.ParentPID != 0 && os.Getppid() != s.ParentPID {
		os.Exit(1)
	}
	// 5. Nothing exec'd from here on gains privileges (set-uid bits, file capabilities).
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("set no_new_privs: %w", err)
	}
	err = syscall.Exec(s.Path, os.Args, os.Environ())
	name := s.Path
	if name == SelfExe && len(os.Args) > 0 {
		name = os.Args[0] // a built-in: flowpipe's own binary
	}
	if errors.Is(err, syscall.EACCES) && s.User != nil {
		return fmt.Errorf("exec %s as %s: %w: that user must be able to execute it and to enter every directory above it", name, s.User.Name, err)
	}
	return fmt.Errorf("exec %s: %w", name, err)
}

func checkSum(path, want string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		return fmt.Errorf("%s has SHA-256 %s, but pipeline.yaml pins %s: refusing to start it", path, got, want)
	}
	return nil
}
