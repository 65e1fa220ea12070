// Package pluginhost is flowpipe's side of the plugin boundary: it starts plugin processes
// (pinned by SHA-256, mutual TLS, logs forwarded), reaches them through the ordinary
// component.Source, Enricher and Sink interfaces, and restarts them when they crash or hang,
// delivering again every batch they had not acknowledged. Plugin authors never see it: they
// import the public sdk package. The wire protocol both sides speak is internal/pluginproto.
package pluginhost

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/privilege"
)

// PluginDirEnv names a directory searched for plugins after plugins/ beside the pipeline
// file.
const PluginDirEnv = "FLOWPIPE_PLUGIN_DIR"

// DefaultIsolation is how built-in components run when pipeline.yaml does not say:
// each in its own process.
const DefaultIsolation = "process"

// HostOptions configure a Host.
type HostOptions struct {
	// Registry holds the built-in factories: a built-in component with isolation: process is
	// served by the command BuiltinCommand returns, one with isolation: inproc is built from
	// the registry directly.
	Registry *component.Registry
	// BuiltinCommand returns the command that serves a built-in as a plugin. Nil re-executes
	// the running binary (the file it was started from) as `flowpipe plugin serve <kind> <type>`.
	BuiltinCommand func(kind component.Kind, typ string) (*exec.Cmd, error)
	// PluginDir is searched for plugins by name; empty uses $FLOWPIPE_PLUGIN_DIR.
	PluginDir string
}

// Host starts plugin processes for a pipeline. Its Instantiate is pipeline.Options.
// Instantiate.
type Host struct {
	opts HostOptions
}

// NewHost returns a host.
func NewHost(opts HostOptions) *Host {
	if opts.PluginDir == "" {
		opts.PluginDir = os.Getenv(PluginDirEnv)
	}
	return &Host{opts: opts}
}

// Settings are the host's per-component options for a plugin process, written under
// `process:` beside the component's own options.
type Settings struct {
	// CallTimeout is how long a Write or Enrich may run before the host checks that the
	// plugin still answers (and again each CallTimeout after): a plugin that answers is
	// waiting on its destination and is left to finish; one that does not is hung, is
	// killed and restarted, and the batch is delivered again.
	CallTimeout time.Duration `yaml:"call_timeout"`
	// PingInterval is how often the host checks that the plugin still answers; a plugin
	// that does not answer within the same interval is restarted.
	PingInterval time.Duration `yaml:"ping_interval"`
	// StartTimeout bounds starting the process and configuring the component.
	StartTimeout time.Duration `yaml:"start_timeout"`
}

// settingsKey is the key of Settings beside a component's options (config.Component.Process).
const settingsKey = "process"

func defaultSettings() Settings {
	return Settings{CallTimeout: time.Minute, PingInterval: 10 * time.Second, StartTimeout: 30 * time.Second}
}

// Validate checks the settings; paths are relative to process:.
func (s *Settings) Validate() error {
	var errs options.FieldErrors
	for _, d := range []struct {
		path string
		v    time.Duration
	}{{"call_timeout", s.CallTimeout}, {"ping_interval", s.PingInterval}, {"start_timeout", s.StartTimeout}} {
		if d.v <= 0 {
			errs.Add(d.path, "must be positive")
		}
	}
	return errs.Err()
}

// Instantiate builds the component spec describes in a plugin process: an external plugin,
// or a built-in served by the flowpipe binary (isolation: process, the default). The
// runtime builds isolation: inproc components and enrichers that keep events across batches
// (component.Factory.Holds) itself. Option problems come back as options.FieldErrors
// relative to the component, so that they are shown at their line.
func (h *Host) Instantiate(ctx context.Context, spec config.Component, env component.Env) (any, error) {
	settings := defaultSettings()
	if raw := spec.Process; raw != nil {
		m, ok := raw.(map[string]any)
		if !ok {
			return nil, options.FieldErrors{{Path: settingsKey, Msg: "want a map (call_timeout, ping_interval, start_timeout)"}}
		}
		if errs := options.Check(m, &settings, settingsKey); len(errs) > 0 {
			return nil, errs
		}
	}
	if spec.Plugin == "" {
		f, ok := h.opts.Registry.Lookup(spec.Kind, spec.Type)
		if !ok {
			return nil, options.FieldErrors{{Path: "type", Msg: fmt.Sprintf("unknown %s type %q (known: %s)", spec.Kind, spec.Type, strings.Join(h.opts.Registry.Types(spec.Kind), ", "))}}
		}
		if f.Holds {
			return nil, fmt.Errorf("enricher type %q keeps events across batches and runs only in process: set isolation: inproc", spec.Type)
		}
	}
	l, err := h.launcher(spec, env.ConfigDir)
	if err != nil {
		return nil, err
	}
	if l.priv, err = h.privileges(spec); err != nil {
		return nil, err
	}
	optYAML, err := yaml.Marshal(spec.Options)
	if err != nil {
		return nil, fmt.Errorf("encode options for the plugin: %w", err)
	}
	in := newInstance(spec, env, settings, l, optYAML)
	if spec.Plugin == "" {
		f, _ := h.opts.Registry.Lookup(spec.Kind, spec.Type)
		in.capsOf = f.Capabilities
	}
	p, holder, err := startProc(ctx, l, spec, env, settings, optYAML)
	if err != nil {
		return nil, err
	}
	if holder {
		p.shutdown()
		return nil, fmt.Errorf("%s keeps events across batches (component.Holder) and cannot run as a plugin", l.describe)
	}
	in.adopt(p)
	c := remote(spec.Kind, in)
	if c == nil {
		in.Close(ctx)
		return nil, fmt.Errorf("unknown component kind %q", spec.Kind)
	}
	return c, nil
}

// remote is the component the runtime sees for a plugin process of that kind; nil for an
// unknown kind.
func remote(kind component.Kind, in *instance) any {
	switch kind {
	case component.KindSink:
		return &remoteSink{in: in}
	case component.KindEnricher:
		return &remoteEnricher{in: in}
	case component.KindSource:
		return &remoteSource{in: in}
	}
	return nil
}

// launcher says how to start one component's process.
type launcher struct {
	describe string // "plugin /path/flowpipe-sink-x" or "built-in sink \"file\""
	cmd      func() (*exec.Cmd, error)
	checksum []byte // SHA-256 the binary must have; nil: not pinned
	path     string
	inMemory bool            // served inside this process (ServeInMemory): nothing to restart
	priv     *privilege.Spec // capabilities and user of the process; nil: none, as flowpipe's user
}

func (h *Host) launcher(spec config.Component, configDir string) (*launcher, error) {
	if spec.Plugin == "" {
		mk := h.opts.BuiltinCommand
		if mk == nil {
			mk = h.selfCommand
		}
		kind, typ := spec.Kind, spec.Type
		// Not pinned by a hash: selfCommand starts the very file this process runs
		// (privilege.SelfExe), so a flowpipe replaced on disk (an upgrade) is never started
		// as a plugin of the old one, and nothing reads 40 MB per start to make sure.
		return &launcher{describe: fmt.Sprintf("built-in %s %q", kind, typ), cmd: func() (*exec.Cmd, error) { return mk(kind, typ) }}, nil
	}
	path, err := h.Find(spec.Kind, spec.Plugin, configDir)
	if err != nil {
		return nil, options.FieldErrors{{Path: "plugin", Msg: err.Error()}}
	}
	l := &launcher{describe: "plugin " + path, path: path, cmd: func() (*exec.Cmd, error) { return exec.Command(path), nil }}
	if spec.SHA256 != "" {
		sum, err := hex.DecodeString(spec.SHA256)
		if err != nil || len(sum) != sha256.Size {
			return nil, options.FieldErrors{{Path: "sha256", Msg: "want 64 hexadecimal digits (the output of sha256sum)"}}
		}
		l.checksum = sum
	}
	return l, nil
}

// selfCommand serves a built-in from the running binary: the file this process was started
// from (privilege.SelfExe), even if its path now names another (an upgrade) or nothing.
func (h *Host) selfCommand(kind component.Kind, typ string) (*exec.Cmd, error) {
	cmd, err := privilege.SelfCommand("plugin", "serve", string(kind), typ)
	if err != nil {
		return nil, fmt.Errorf("serve built-in %s %q: %w", kind, typ, err)
	}
	return cmd, nil
}

// Find resolves a plugin: reference from pipeline.yaml. A reference with a slash is a path
// (relative to configDir); a name is looked up as flowpipe-<kind>-<name> in plugins/ beside
// the pipeline file, then in the plugin directory ($FLOWPIPE_PLUGIN_DIR).
func (h *Host) Find(kind component.Kind, ref, configDir string) (string, error) {
	if strings.ContainsRune(ref, '/') {
		path := ref
		if !filepath.IsAbs(path) {
			path = filepath.Join(configDir, path)
		}
		// Absolute, so that "./x" beside a pipeline file in the working directory (Join
		// makes it "x") is not looked up in $PATH when it is run.
		if abs, err := filepath.Abs(path); err == nil {
			path = abs
		}
		if err := checkExecutable(path); err != nil {
			return "", err
		}
		return path, nil
	}
	file := fmt.Sprintf("flowpipe-%s-%s", kind, ref)
	var looked []string
	for _, dir := range h.searchDirs(configDir) {
		path := filepath.Join(dir, file)
		looked = append(looked, path)
		if _, err := os.Stat(path); err == nil {
			if err := checkExecutable(path); err != nil {
				return "", err
			}
			return path, nil
		}
	}
	hint := ""
	if h.opts.PluginDir == "" {
		hint = fmt.Sprintf(", and $%s is not set", PluginDirEnv)
	}
	return "", fmt.Errorf("plugin %q not found: looked for %s%s", ref, strings.Join(looked, " and "), hint)
}

func (h *Host) searchDirs(configDir string) []string {
	dirs := []string{filepath.Join(configDir, "plugins")}
	if h.opts.PluginDir != "" {
		dirs = append(dirs, h.opts.PluginDir)
	}
	return dirs
}

func checkExecutable(path string) error {
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("plugin binary %s does not exist", path)
	case err != nil:
		return fmt.Errorf("plugin binary %s: %w", path, err)
	case st.IsDir():
		return fmt.Errorf("plugin binary %s is a directory", path)
	case st.Mode()&0o111 == 0:
		return fmt.Errorf("plugin binary %s is not executable (chmod +x it)", path)
	}
	return checkNotReplaceable(path)
}

// checkNotReplaceable refuses a plugin that someone other than root or flowpipe's own user
// could replace: the binary, and every directory above it, must be owned by one of them and
// writable by no one else (a world-writable directory with the sticky bit, such as /tmp,
// protects what others own in it).
func checkNotReplaceable(path string) error {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return fmt.Errorf("plugin binary %s: %w", path, err)
	}
	real, err = filepath.Abs(real)
	if err != nil {
		return err
	}
	self := uint32(os.Geteuid())
	for p := real; ; p = filepath.Dir(p) {
		st, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("plugin binary %s: %w", path, err)
		}
		sys, ok := st.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		what := "plugin binary"
		if p != real {
			what = "plugin directory"
		}
		mode := st.Mode()
		// The sticky bit lets only an entry's owner rename or remove it, and what is below
		// was checked already.
		sticky := mode.IsDir() && mode&os.ModeSticky != 0
		switch {
		case sys.Uid != 0 && sys.Uid != self:
			return fmt.Errorf("%s %s is owned by uid %d, neither root nor flowpipe's user (uid %d): refusing to start %s, which that user could replace; chown it to root", what, p, sys.Uid, self, real)
		case mode.Perm()&0o002 != 0 && !sticky:
			return fmt.Errorf("%s %s is writable by every user (mode %s): refusing to start %s, which anyone could replace; chmod o-w %s", what, p, mode.Perm(), real, p)
		case mode.Perm()&0o020 != 0 && sys.Gid != 0 && !sticky:
			return fmt.Errorf("%s %s is writable by group %d (mode %s): refusing to start %s, which the group's members could replace; chmod g-w %s", what, p, sys.Gid, mode.Perm(), real, p)
		}
		if p == "/" || p == filepath.Dir(p) {
			return nil
		}
	}
}

// FileSHA256 is the SHA-256 of a file, as sha256sum prints it.
func FileSHA256(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return h.Sum(nil), nil
}
