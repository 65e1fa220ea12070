package privilege

import (
	"errors"
	"fmt"
	"os"
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
