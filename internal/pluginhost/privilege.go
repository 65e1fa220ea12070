package pluginhost

import (
	"fmt"
	"os"
	"os/user"
	"strconv"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/privilege"
)

// privileges decides how a component's process starts: the capabilities its config declares
// (component.NeedsCapabilities, through Factory.Capabilities; none for an external plugin)
// and, when flowpipe runs as root, the run_as user.
func (h *Host) privileges(spec config.Component, env component.Env) (*privilege.Spec, error) {
	p := &privilege.Spec{}
	if spec.Plugin == "" {
		f, _ := h.opts.Registry.Lookup(spec.Kind, spec.Type)
		caps, err := f.Capabilities(spec.Options)
		if err != nil {
			return nil, err
		}
		p.Caps = caps
	}
	u, err := h.runAs(spec, env)
	if err != nil {
		return nil, err
	}
	p.User = u
	return p, nil
}

// runAs resolves the user a component's process runs as. Only a root flowpipe can change
// it: run_as is then the component's or the top-level run_as; unset, the process stays root
// (with only its own capabilities), with a warning, so that a pipeline that worked as root
// keeps working on a machine where no flowpipe user exists.
func (h *Host) runAs(spec config.Component, env component.Env) (*privilege.User, error) {
	log := env.Logger
	if os.Geteuid() != 0 {
		if spec.RunAs != "" {
			h.warnOnce.Do(func() {
				if log != nil {
					log.Warn("run_as is ignored: flowpipe does not run as root, so plugin processes run as its own user", "run_as", spec.RunAs, "uid", os.Geteuid())
				}
			})
		}
		return nil, nil
	}
	switch spec.RunAs {
	case "":
		h.warnOnce.Do(func() {
			if log != nil {
				log.Warn("plugin processes run as root (each with only the capabilities it needs); set run_as: flowpipe in pipeline.yaml to run them as an unprivileged user (docs/security.md)")
			}
		})
		return nil, nil
	case "root":
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
