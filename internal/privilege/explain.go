package privilege

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Explain turns a permission error of an operation that needs the capabilities needed (a
// component's declared set) into one that says which of them this process lacks and how to
// grant them. Any other error, or nil, comes back unchanged.
func Explain(err error, needed []string) error {
	if err == nil || !(errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES)) {
		return err
	}
	want, perr := Parse(needed)
	if perr != nil || want == 0 {
		return err
	}
	eff, _, cerr := Current()
	if cerr != nil {
		return err
	}
	missing := want &^ eff
	if missing == 0 {
		return err // not a capability problem (a file mode, an LSM)
	}
	return fmt.Errorf("%w: this needs %s, which this process (uid %d) does not have: run flowpipe as root "+
		"(the flowpipe service does), or grant it to flowpipe (systemd: AmbientCapabilities=%s and CapabilityBoundingSet= including it); "+
		"flowpipe then gives it to this component's process only (docs/security.md)",
		err, missing, os.Geteuid(), strings.Join(missing.Names(), " "))
}

// ExplainWrite turns a permission error writing path (or creating it in dir) into one that
// names the user this process runs as and what to do; other errors come back unchanged.
func ExplainWrite(err error, dir string) error {
	if err == nil || !(errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES)) {
		return err
	}
	if abs, aerr := filepath.Abs(dir); aerr == nil {
		dir = abs
	}
	uid := os.Geteuid()
	name := strconv.Itoa(uid)
	if u, uerr := user.LookupId(name); uerr == nil {
		name = u.Username
	}
	return fmt.Errorf("%w: this component runs as user %s (uid %d), which cannot write in %s: give it the directory "+
		"(chown %s %s), or choose a path it can write (run_as: in pipeline.yaml chooses the user; docs/security.md)",
		err, name, uid, dir, name, dir)
}
