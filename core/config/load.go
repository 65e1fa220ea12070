// Package config loads pipeline.yaml: the file, ${VAR} interpolation and FLOWPIPE_
// environment overrides (merged with koanf), strict decoding of options into typed structs,
// and positions, so that every problem is reported with its file, line and key path.
package config

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/knadh/koanf/providers/confmap"
	"github.com/knadh/koanf/providers/env/v2"
	"github.com/knadh/koanf/v2"
	"gopkg.in/yaml.v3"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/options"
)

// EnvPrefix starts every environment variable that overrides a pipeline.yaml value. A
// double underscore separates keys: FLOWPIPE_SINKS__LOCAL__PATH sets sinks.local.path.
// Variables without a double underscore (FLOWPIPE_CONFIG, FLOWPIPE_PLUGIN_DIR) are not
// overrides.
const EnvPrefix = "FLOWPIPE_"

// Document is a loaded pipeline.yaml.
type Document struct {
	File    string // the file as named by the user
	Dir     string // its directory, for resolving relative paths
	Admin   Admin
	Runtime Runtime
	// DataDir holds every component's state (disk queues, journals, what a source changed
	// on the host); `data_dir:` in pipeline.yaml, see DefaultDataDir.
	DataDir string
	// RunAs is the user plugin processes run as when flowpipe runs as root (`run_as:`);
	// empty keeps them as root, without capabilities beyond their own (docs/security.md).
	RunAs string
	// Enabled is the top-level `enabled:` (default true). A pipeline with enabled: false is
	// loaded and checked in full, but none of its components is built or run: flowpipe run
	// stays up with nothing running, so that a reload can turn it on.
	Enabled   bool
	Sources   []Component // sorted by name
	Enrichers []Component // in pipeline order
	Sinks     []Component // sorted by name

	where map[string]string // key path -> "file:line" or "env NAME"
	nodes int               // values expanded so far
}

// Admin is the admin listener: metrics, health, the tap and top API and the live page
// (docs/observe.md).
type Admin struct {
	// Listen is host:port, or unix:PATH for a Unix socket; empty disables it. An address
	// that is not loopback needs Token, TokenFile or ClientCAFile, or Insecure.
	Listen string `yaml:"listen"`
	// Token is the bearer token every request but GET / and /healthz must carry.
	Token string `yaml:"token"`
	// TokenFile holds the token (surrounding white space ignored), relative to pipeline.yaml.
	TokenFile string `yaml:"token_file"`
	// CertFile and KeyFile serve HTTPS; with ClientCAFile, clients must present a
	// certificate it signed (mTLS). The same keys as the gRPC receiver's.
	CertFile     string `yaml:"cert_file"`
	KeyFile      string `yaml:"key_file"`
	ClientCAFile string `yaml:"client_ca_file"`
	// Insecure allows a non-loopback listener with no authentication.
	Insecure bool `yaml:"insecure"`
	// TapRing is how many recent events each tap point keeps for `flowpipe tap --last`
	// (0 turns the rings off: then a tap point costs one atomic load per batch).
	TapRing int `yaml:"tap_ring"`
}

// Runtime holds pipeline-wide settings.
type Runtime struct {
	// ShutdownTimeout bounds how long a stopping pipeline waits for in-flight batches to
	// reach the sinks before it gives up on them (and reports them).
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
}

// Component is one source, enricher or sink as written in pipeline.yaml.
type Component struct {
	Kind      component.Kind
	Name      string // map key (sources, sinks) or `name:` / type (enrichers)
	Path      string // key path of its settings, e.g. "sinks.local" or "enrichers[0]"
	Type      string // built-in type
	Plugin    string // external plugin name or path
	SHA256    string // pin for Plugin
	Isolation string // "", "inproc" or "process"
	// RunAs is the user this component's process runs as when flowpipe runs as root: its own
	// `run_as:`, else the top-level one.
	RunAs string
	// Process holds the plugin host's settings for a component run out of process
	// (`process:` in pipeline.yaml); the plugin host decodes and checks them.
	Process any
	// Options is everything else beside type: the component's own options and the
	// runtime's per-component settings (queue, retry, ...).
	Options map[string]any
	// Enabled is the component's `enabled:` (default true). A disabled component is checked
	// as an enabled one is, but it is not built or run.
	Enabled bool
}

// EnabledOnly is list without its disabled components.
func EnabledOnly(list []Component) []Component {
	out := make([]Component, 0, len(list))
	for _, c := range list {
		if c.Enabled {
			out = append(out, c)
		}
	}
	return out
}

// DefaultAdminListen is where the admin listener goes when admin.listen is not set.
const DefaultAdminListen = "127.0.0.1:9560"

// DefaultDataDir returns the data directory used when pipeline.yaml sets no `data_dir:`:
// $STATE_DIRECTORY when systemd provides one (StateDirectory=), else /var/lib/flowpipe.
func DefaultDataDir() string {
	if d := os.Getenv("STATE_DIRECTORY"); d != "" {
		// systemd may list several directories separated by colons; the first is ours.
		return strings.Split(d, ":")[0]
	}
	return "/var/lib/flowpipe"
}

// DefaultShutdownTimeout is the default runtime.shutdown_timeout.
const DefaultShutdownTimeout = 30 * time.Second

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]*$`)

// Where returns where the value at a key path came from ("pipeline.yaml:14" or
// "env FLOWPIPE_..."), falling back to the closest enclosing key that has a position and
// finally to the file name.
func (d *Document) Where(path string) string {
	for p := path; p != ""; p = parentPath(p) {
		if w, ok := d.where[p]; ok {
			return w
		}
	}
	return d.File
}

// Problem positions a problem at a key path.
func (d *Document) Problem(path, format string, args ...any) Problem {
	return Problem{Where: d.Where(path), Path: path, Msg: fmt.Sprintf(format, args...)}
}

// Problems positions field errors found under a key path.
func (d *Document) Problems(base string, errs FieldErrors) Problems {
	var ps Problems
	for _, e := range errs {
		p := Join(base, e.Path)
		ps = append(ps, Problem{Where: d.Where(p), Path: p, Msg: e.Msg})
	}
	return ps
}

func parentPath(p string) string {
	i := strings.LastIndexAny(p, ".[")
	if i < 0 {
		return ""
	}
	return p[:i]
}

// LoadFile reads and checks a pipeline file. environ is the environment for ${VAR}
// interpolation and FLOWPIPE_ overrides (os.Environ() in flowpipe). The error, when the
// document has problems, is a Problems listing every one.
func LoadFile(file string, environ []string) (*Document, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: no such file; pass another with -c FILE or FLOWPIPE_CONFIG", file)
		}
		return nil, fmt.Errorf("read %s: %w", file, err)
	}
	return Load(file, data, environ)
}

// Load is LoadFile on data already read; file names it in messages.
func Load(file string, data []byte, environ []string) (*Document, error) {
	d := &Document{File: file, Dir: filepath.Dir(file), where: map[string]string{}}
	envMap := map[string]string{}
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			envMap[k] = v
		}
	}

	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, Problems{yamlProblem(file, data, err)}
	}
	var probs Problems
	raw := map[string]any{}
	if len(root.Content) > 0 {
		top := root.Content[0]
		if top.Kind != yaml.MappingNode {
			return nil, Problems{{Where: fmt.Sprintf("%s:%d", file, top.Line), Msg: "the pipeline must be a map with sources, enrichers and sinks"}}
		}
		v, ps := d.nodeValue(top, "", envMap)
		probs = append(probs, ps...)
		raw, _ = v.(map[string]any)
	}

	// koanf merges the file with the environment overrides.
	k := koanf.New(".")
	if err := k.Load(confmap.Provider(raw, ""), nil); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	envProv := env.Provider(".", env.Opt{
		Prefix:      EnvPrefix,
		EnvironFunc: func() []string { return environ },
		TransformFunc: func(name, value string) (string, any) {
			rest := strings.TrimPrefix(name, EnvPrefix)
			if !strings.Contains(rest, "__") {
				return "", nil
			}
			path := strings.ToLower(strings.ReplaceAll(rest, "__", "."))
			d.where[path] = "env " + name
			var v any
			if err := yaml.Unmarshal([]byte(value), &v); err != nil || options.IsCollection(v) {
				v = value
			}
			return path, v
		},
	})
	if err := k.Load(envProv, nil); err != nil {
		return nil, fmt.Errorf("environment overrides: %w", err)
	}
	raw = k.Raw()

	probs = append(probs, d.decodeTop(raw)...)
	if len(probs) > 0 {
		probs.Sort()
		return d, probs
	}
	return d, nil
}

func yamlProblem(file string, data []byte, err error) Problem {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if n, tail, ok := strings.Cut(rest, ": "); ok {
			if line, err := strconv.Atoi(n); err == nil {
				if tabIndented(data, line) {
					tail = "a tab character indents this line; YAML indents with spaces only (" + tail + ")"
				}
				return Problem{Where: file + ":" + n, Msg: "invalid YAML: " + tail}
			}
		}
	}
	return Problem{Where: file, Msg: "invalid YAML: " + msg}
}

// tabIndented reports whether a tab starts the indentation of line n (1-based) or of the
// line before it (the YAML parser sometimes reports the line after the one at fault).
func tabIndented(data []byte, n int) bool {
	lines := strings.Split(string(data), "\n")
	for _, i := range []int{n - 1, n - 2} {
		if i < 0 || i >= len(lines) {
			continue
		}
		indent := lines[i][:len(lines[i])-len(strings.TrimLeft(lines[i], " \t"))]
		if strings.Contains(indent, "\t") {
			return true
		}
	}
	return false
}

// nodeValue converts a YAML node to plain values, interpolating ${VAR} in scalars and
// recording the line of every key path.
func (d *Document) nodeValue(n *yaml.Node, path string, env map[string]string) (any, Problems) {
	var probs Problems
	d.nodes++
	if d.nodes > maxNodes {
		if d.nodes == maxNodes+1 {
			return nil, Problems{{Where: fmt.Sprintf("%s:%d", d.File, n.Line), Path: path, Msg: fmt.Sprintf("the document expands to more than %d values (aliases?)", maxNodes)}}
		}
		return nil, nil
	}
	switch n.Kind {
	case yaml.AliasNode:
		// An alias may refer to a node that contains it; cap the expansion.
		if strings.Count(path, ".")+strings.Count(path, "[") > maxDepth {
			return nil, Problems{{Where: fmt.Sprintf("%s:%d", d.File, n.Line), Path: path, Msg: "aliases nest too deep (a recursive alias?)"}}
		}
		return d.nodeValue(n.Alias, path, env)
	case yaml.MappingNode:
		m := map[string]any{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			kn, vn := n.Content[i], n.Content[i+1]
			if kn.Tag == "!!merge" {
				v, ps := d.nodeValue(vn, path, env)
				probs = append(probs, ps...)
				if mm, ok := v.(map[string]any); ok {
					for k, x := range mm {
						if _, exists := m[k]; !exists {
							m[k] = x
						}
					}
				}
				continue
			}
			key := kn.Value
			p := Join(path, key)
			if _, dup := m[key]; dup {
				probs = append(probs, Problem{Where: fmt.Sprintf("%s:%d", d.File, kn.Line), Path: p, Msg: "duplicate key"})
			}
			d.where[p] = fmt.Sprintf("%s:%d", d.File, kn.Line)
			v, ps := d.nodeValue(vn, p, env)
			probs = append(probs, ps...)
			m[key] = v
		}
		return m, probs
	case yaml.SequenceNode:
		list := make([]any, len(n.Content))
		for i, item := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			d.where[p] = fmt.Sprintf("%s:%d", d.File, item.Line)
			v, ps := d.nodeValue(item, p, env)
			probs = append(probs, ps...)
			list[i] = v
		}
		return list, probs
	case yaml.ScalarNode:
		val := n.Value
		if strings.Contains(val, "$") {
			expanded, err := interpolate(val, env)
			if err != nil {
				return nil, Problems{{Where: fmt.Sprintf("%s:%d", d.File, n.Line), Path: path, Msg: err.Error()}}
			}
			if expanded != val {
				// The substituted text is typed as if it had been written in the file.
				var v any
				if n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) != 0 {
					return expanded, nil
				}
				if err := yaml.Unmarshal([]byte(expanded), &v); err != nil || options.IsCollection(v) {
					return expanded, nil
				}
				return v, nil
			}
		}
		var v any
		if err := n.Decode(&v); err != nil {
			return nil, Problems{{Where: fmt.Sprintf("%s:%d", d.File, n.Line), Path: path, Msg: err.Error()}}
		}
		if t, ok := v.(time.Time); ok {
			v = t.Format(time.RFC3339Nano)
		}
		return v, nil
	}
	return nil, nil
}

// maxDepth bounds how deep a document may nest, aliases expanded.
const maxDepth = 64

// maxNodes bounds how many values a document may expand to, so that nested aliases cannot
// blow up memory.
const maxNodes = 1_000_000

var varRE = regexp.MustCompile(`\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}`)

// interpolate replaces ${VAR} and ${VAR:-default}; $$ is a literal $.
func interpolate(s string, env map[string]string) (string, error) {
	var missing []string
	out := varRE.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		sub := varRE.FindStringSubmatch(m)
		if v, ok := env[sub[1]]; ok && (v != "" || sub[2] == "") {
			return v
		}
		if sub[2] != "" {
			return sub[3]
		}
		missing = append(missing, sub[1])
		return ""
	})
	if len(missing) > 0 {
		return "", fmt.Errorf("environment variable %s is not set (use ${%s:-default} for a default)", strings.Join(missing, ", "), missing[0])
	}
	return out, nil
}

func (d *Document) decodeTop(raw map[string]any) Problems {
	var probs Problems
	for key := range raw {
		switch key {
		case "admin", "runtime", "data_dir", "run_as", "enabled", "sources", "enrichers", "sinks":
		default:
			probs = append(probs, d.Problem(key, "unknown top-level key (want admin, runtime, data_dir, run_as, enabled, sources, enrichers, sinks)"))
		}
	}
	d.Enabled = true
	if v, ok := raw["enabled"]; ok {
		var ps Problems
		d.Enabled, ps = d.boolValue(v, "enabled")
		probs = append(probs, ps...)
	}
	d.Admin = Admin{Listen: DefaultAdminListen, TapRing: DefaultTapRing}
	if v, ok := raw["admin"]; ok {
		if ps := d.decodeSection(v, "admin", &d.Admin); len(ps) > 0 {
			probs = append(probs, ps...)
		} else {
			probs = append(probs, d.checkAdmin()...)
		}
	}
	d.Runtime = Runtime{ShutdownTimeout: DefaultShutdownTimeout}
	if v, ok := raw["runtime"]; ok {
		probs = append(probs, d.decodeSection(v, "runtime", &d.Runtime)...)
		if d.Runtime.ShutdownTimeout < 0 {
			probs = append(probs, d.Problem("runtime.shutdown_timeout", "must not be negative"))
		}
	}

	d.DataDir = DefaultDataDir()
	if v, ok := raw["data_dir"]; ok {
		switch dir, isString := v.(string); {
		case !isString || dir == "":
			probs = append(probs, d.Problem("data_dir", "want a directory path, got %s", options.Describe(v)))
		case filepath.IsAbs(dir):
			d.DataDir = filepath.Clean(dir)
		default:
			// Relative to pipeline.yaml, as every other path in the file.
			d.DataDir = filepath.Join(d.Dir, dir)
		}
	}

	if v, ok := raw["run_as"]; ok {
		d.RunAs, probs = d.runAs(v, "run_as", probs)
	}

	var ps Problems
	d.Sources, ps = d.componentMap(raw["sources"], "sources", component.KindSource)
	probs = append(probs, ps...)
	d.Sinks, ps = d.componentMap(raw["sinks"], "sinks", component.KindSink)
	probs = append(probs, ps...)
	if v, ok := raw["enrichers"]; ok && v != nil {
		list, ok := v.([]any)
		if !ok {
			probs = append(probs, d.Problem("enrichers", "want a list of enrichers (- type: ...), got %s", options.Describe(v)))
		}
		seen := map[string]string{}
		for i, item := range list {
			path := fmt.Sprintf("enrichers[%d]", i)
			c, ps := d.component(item, path, "", component.KindEnricher)
			probs = append(probs, ps...)
			if c.Name == "" {
				continue
			}
			if prev, dup := seen[c.Name]; dup {
				probs = append(probs, d.Problem(path, "enricher name %q is also used by %s; give one a distinct name:", c.Name, prev))
			}
			seen[c.Name] = path
			d.Enrichers = append(d.Enrichers, c)
		}
	}
	for _, list := range [][]Component{d.Sources, d.Enrichers, d.Sinks} {
		for i := range list {
			if list[i].RunAs == "" {
				list[i].RunAs = d.RunAs
			}
		}
	}
	if len(d.Sources) == 0 {
		probs = append(probs, d.Problem("sources", "a pipeline needs at least one source"))
	}
	if len(d.Sinks) == 0 {
		probs = append(probs, d.Problem("sinks", "a pipeline needs at least one sink"))
	}
	return probs
}

func (d *Document) decodeSection(v any, path string, out any) Problems {
	m, ok := v.(map[string]any)
	if !ok {
		if v == nil {
			return nil
		}
		return Problems{d.Problem(path, "want a map, got %s", options.Describe(v))}
	}
	return d.Problems(path, Decode(m, out, ""))
}

func (d *Document) componentMap(v any, section string, kind component.Kind) ([]Component, Problems) {
	if v == nil {
		return nil, nil
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, Problems{d.Problem(section, "want a map from component name to its settings, got %s", options.Describe(v))}
	}
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []Component
	var probs Problems
	for _, n := range names {
		path := section + "." + n
		if !nameRE.MatchString(n) {
			probs = append(probs, d.Problem(path, "invalid name %q: use letters, digits, '-' and '_'", n))
			continue
		}
		c, ps := d.component(m[n], path, n, kind)
		probs = append(probs, ps...)
		if c.Name != "" {
			out = append(out, c)
		}
	}
	return out, probs
}

func (d *Document) component(v any, path, name string, kind component.Kind) (Component, Problems) {
	m, ok := v.(map[string]any)
	if !ok {
		return Component{}, Problems{d.Problem(path, "want a map with type: and options, got %s", options.Describe(v))}
	}
	c := Component{Kind: kind, Name: name, Path: path, Options: map[string]any{}, Enabled: true}
	var probs Problems
	str := func(key string) string {
		x, ok := m[key]
		if !ok || x == nil {
			return ""
		}
		s, ok := x.(string)
		if !ok {
			probs = append(probs, d.Problem(Join(path, key), "want a string, got %s", options.Describe(x)))
		}
		return s
	}
	for key, x := range m {
		switch key {
		case "type", "plugin", "sha256", "isolation":
		case "process":
			c.Process = x
		case "run_as":
			c.RunAs, probs = d.runAs(x, Join(path, key), probs)
		case "enabled":
			var ps Problems
			c.Enabled, ps = d.boolValue(x, Join(path, key))
			probs = append(probs, ps...)
		case "name":
			if kind != component.KindEnricher {
				c.Options[key] = x
			}
		default:
			c.Options[key] = x
		}
	}
	c.Type, c.Plugin, c.SHA256, c.Isolation = str("type"), str("plugin"), str("sha256"), str("isolation")
	if kind == component.KindEnricher {
		c.Name = str("name")
		if c.Name == "" {
			c.Name = c.Type
			if c.Name == "" {
				c.Name = filepath.Base(c.Plugin)
			}
		} else if !nameRE.MatchString(c.Name) {
			probs = append(probs, d.Problem(Join(path, "name"), "invalid name %q: use letters, digits, '-' and '_'", c.Name))
		}
	}
	if c.Type == "" && c.Plugin == "" {
		probs = append(probs, d.Problem(path, "missing type: (or plugin: for an external plugin)"))
	}
	switch c.Isolation {
	case "", "inproc", "process":
	default:
		probs = append(probs, d.Problem(Join(path, "isolation"), "unknown isolation %q (want inproc or process)", c.Isolation))
	}
	if _, ok := m["run_as"]; ok && c.Isolation == "inproc" {
		probs = append(probs, d.Problem(Join(path, "run_as"), "run_as applies to a component in its own process; remove it or isolation: inproc"))
	}
	if c.SHA256 != "" {
		if c.Plugin == "" {
			probs = append(probs, d.Problem(Join(path, "sha256"), "sha256 pins an external plugin; set plugin: too"))
		} else if !isHex64(c.SHA256) {
			probs = append(probs, d.Problem(Join(path, "sha256"), "want 64 hexadecimal digits (the output of sha256sum)"))
		}
	}
	return c, probs
}

// boolValue reads an `enabled:` value: true or false.
func (d *Document) boolValue(v any, path string) (bool, Problems) {
	b, ok := v.(bool)
	if !ok {
		return true, Problems{d.Problem(path, "want true or false, got %s", options.Describe(v))}
	}
	return b, nil
}

// runAs checks a run_as: value: a user that exists on this machine (its uid and groups are
// looked up when a process starts).
func (d *Document) runAs(v any, path string, probs Problems) (string, Problems) {
	name, ok := v.(string)
	if !ok || name == "" {
		return "", append(probs, d.Problem(path, "want a user name, got %s", options.Describe(v)))
	}
	if _, err := user.Lookup(name); err != nil {
		return "", append(probs, d.Problem(path, "no user %q on this machine: create it (useradd --system %s; the Debian package creates flowpipe) or remove run_as", name, name))
	}
	return name, probs
}

func isHex64(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, r := range s {
		if !strings.ContainsRune("0123456789abcdefABCDEF", r) {
			return false
		}
	}
	return true
}

// Sort orders problems by file and line, as a reader goes through the file.
func (ps Problems) Sort() {
	sort.SliceStable(ps, func(i, j int) bool {
		fi, li := splitWhere(ps[i].Where)
		fj, lj := splitWhere(ps[j].Where)
		if fi != fj {
			return fi < fj
		}
		return li < lj
	})
}

func splitWhere(w string) (string, int) {
	if i := strings.LastIndexByte(w, ':'); i >= 0 {
		if n, err := strconv.Atoi(w[i+1:]); err == nil {
			return w[:i], n
		}
	}
	return w, 0
}
