package pluginhost

import (
	"fmt"
	"os"
	"os/user"
	"strconv"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/privilege"
)

// privileges decides how a component's process starts: the capabilities its config declares
// (component.NeedsCapabilities, through Factory.Capabilities; none for an external plugin)
// and, when flowpipe runs as root, the run_as user.
func (h *Host) privileges(spec config.Component) (*privilege.Spec, error) {
	p := &privilege.Spec{}
	if spec.Plugin == "" {
		f, _ := h.opts.Registry.Lookup(spec.Kind, spec.Type)
		caps, err := f.Capabilities(spec.Options)
		if err != nil {
			return nil, err
		}
		p.Caps = caps
	}
	u, err := h.runAs(spec)
	if err != nil {
		return nil, err
	}
	p.User = u
	return p, nil
}

// runAs resolves the user a component's process runs as. Only a root flowpipe can change
// it: run_as is then the component's or the top-level run_as; unset (or root), the process
// stays root with only its own capabilities, so that a pipeline that worked as root keeps
// working on a machine where no flowpipe user exists (flowpipe run warns about it). A
// flowpipe that is not root ignores run_as.
func (h *Host) runAs(spec config.Component) (*privilege.User, error) {
	if os.Geteuid() != 0 || spec.RunAs == "" || spec.RunAs == "root" {
		return nil, nil
	}
	u, err := user.Lookup(spec.RunAs)
	if err != nil {
		return nil, options.FieldErrors{{Path: "run_as", Msg: fmt.Sprintf("no user %q on this machine: create it (useradd --system %s; the Debian package creates flowpipe) or remove run_as", spec.RunAs, spec.RunAs)}}
	}
	out := &privilege.User{Name: u.Username}
	if out.UID, err = strconv.Atoi(u.Uid); err != nil {
		return nil, fmt.Errorf("run_as %s: uid %q: %w", spec.RunAs, u.Uid, err)
	}
	if out.GID, err = strconv.Atoi(u.Gid); err != nil {
		return nil, fmt.Errorf("run_as %s: gid %q: %w", spec.RunAs, u.Gid, err)
	}
	gids, err := u.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("run_as %s: groups: %w", spec.RunAs, err)
	}
	for _, g := range gids {
		if n, err := strconv.Atoi(g); err == nil {
			out.Groups = append(out.Groups, n)
		}
	}
	return out, nil
}
