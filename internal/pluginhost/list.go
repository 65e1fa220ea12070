package pluginhost

import (
	"context"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
)

// Listing is one plugin found on disk, as `flowpipe plugins list` shows it.
type Listing struct {
	Kind    component.Kind
	Name    string // the name to write after plugin: in pipeline.yaml
	Path    string
	SHA256  string
	Type    string // what the plugin says it serves; empty when Err is set
	Version string
	Summary string
	Err     error // the plugin could not be started or described
}

// Discover lists the plugins in plugins/ beside the pipeline file and in the plugin
// directory, starting each to ask what it is (Describe only: nothing is configured).
func (h *Host) Discover(ctx context.Context, configDir string, log *slog.Logger) []Listing {
	var out []Listing
	seen := map[string]bool{}
	for _, dir := range h.searchDirs(configDir) {
		entries, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range entries {
			kind, name, ok := parsePluginFile(e.Name())
			if !ok || e.IsDir() || seen[string(kind)+"/"+name] {
				continue
			}
			seen[string(kind)+"/"+name] = true
			out = append(out, h.inspect(ctx, kind, name, filepath.Join(dir, e.Name()), log))
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Kind != out[j].Kind {
			return out[i].Kind < out[j].Kind
		}
		return out[i].Name < out[j].Name
	})
	return out
}

func parsePluginFile(file string) (component.Kind, string, bool) {
	rest, ok := strings.CutPrefix(file, "flowpipe-")
	if !ok {
		return "", "", false
	}
	for _, k := range []component.Kind{component.KindSource, component.KindEnricher, component.KindSink} {
		if name, ok := strings.CutPrefix(rest, string(k)+"-"); ok && name != "" {
			return k, name, true
		}
	}
	return "", "", false
}

func (h *Host) inspect(ctx context.Context, kind component.Kind, name, path string, log *slog.Logger) Listing {
	l := Listing{Kind: kind, Name: name, Path: path}
	sum, err := FileSHA256(path)
	if err != nil {
		l.Err = err
		return l
	}
	l.SHA256 = hex.EncodeToString(sum)
	if err := checkExecutable(path); err != nil {
		l.Err = err
		return l
	}
	ln := &launcher{describe: "plugin " + path, path: path, checksum: sum, cmd: func() (*exec.Cmd, error) { return exec.Command(path), nil }}
	env := component.Env{Name: name, Kind: kind, Logger: log, Metrics: component.NopMetrics{}}
	s := defaultSettings()
	s.StartTimeout = 10 * time.Second
	p, _, err := startProc(ctx, ln, config.Component{}, env, s, nil)
	if err != nil {
		l.Err = err
		return l
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if p.close(cctx) != nil {
			p.kill()
		}
	}()
	l.Type, l.Version, l.Summary = p.desc.Type, p.desc.Version, p.desc.Summary
	if p.desc.Kind != string(kind) {
		l.Err = fmt.Errorf("named as a %s plugin but serves a %s", kind, p.desc.Kind)
	}
	return l
}
