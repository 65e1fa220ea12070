package resources

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"

	"gopkg.in/yaml.v3"

	"github.com/flowpipe/flowpipe/core/config"
)

// tableFile is the tables_file and what was last seen of it.
type tableFile struct {
	path string

	mu      sync.Mutex // one load at a time (the watcher and Reload)
	stat    fileStat   // metadata when last read, valid or not
	seen    fileStat   // metadata at the last check, to see whether a change has settled
	sum     [32]byte   // content of the tables in force
	hasSum  bool
	missing bool // the last check found no file (logged once)
}

type fileStat struct {
	mtime int64 // nanoseconds
	size  int64
	ino   uint64
	dev   uint64
}

func statOf(fi os.FileInfo) fileStat {
	s := fileStat{mtime: fi.ModTime().UnixNano(), size: fi.Size()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino, s.dev = st.Ino, uint64(st.Dev)
	}
	return s
}

// load reads and compiles the file when its metadata changed since the last read and then
// stayed the same for one check (or at once, with force): a writer that rewrites the file in
// place is then not caught half-way, which could leave a shorter file that still parses
// (rename-over writers are atomic anyway). changed is false when the file was not read or
// its content is what is already in force. A file that cannot be read or parsed is an error,
// reported once per change.
func (f *tableFile) load(force bool) (t *compiled, changed bool, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fi, err := os.Stat(f.path)
	if err != nil {
		// A rename-over leaves no gap, but a delete-then-create does; the next check sees the
		// new file. Report a missing file once, not at every check.
		if !force && f.missing {
			return nil, false, nil
		}
		f.missing = true
		return nil, false, fmt.Errorf("tables file: %w", err)
	}
	f.missing = false
	st := statOf(fi)
	if !force {
		settled := st == f.seen
		f.seen = st
		if st == f.stat || !settled {
			return nil, false, nil
		}
	}
	// Remember the metadata seen before reading: a write that lands while we read changes it
	// again, so the next check reads the file once more.
	f.stat, f.seen = st, st
	data, err := os.ReadFile(f.path)
	if err != nil {
		return nil, false, fmt.Errorf("tables file: %w", err)
	}
	sum := sha256.Sum256(data)
	if f.hasSum && sum == f.sum {
		return nil, false, nil
	}
	t, err = parseTables(f.path, data)
	if err != nil {
		return nil, false, err
	}
	f.sum, f.hasSum = sum, true
	return t, true, nil
}

// parseTables decodes a tables file (YAML, or JSON, which is YAML) with the same strict rules
// as pipeline.yaml: unknown keys and wrong types are errors. Problems are config.Problems
// positioned in the tables file ("tables.yaml:12: rules[2].ports[0]: ..."), so that `flowpipe
// validate` points into that file rather than at the tables_file option.
func parseTables(path string, data []byte) (*compiled, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		// An empty file is almost always a writer caught mid-write, not a wish to forget
		// every resource; refuse it so the previous tables stay.
		return nil, config.Problems{{Where: path, Msg: "the tables file is empty; write {} to clear the tables on purpose"}}
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, config.Problems{{Where: path, Msg: strings.TrimPrefix(err.Error(), "yaml: ")}}
	}
	var raw map[string]any
	if err := doc.Decode(&raw); err != nil {
		return nil, config.Problems{{Where: path, Msg: "want a map with the keys overlay, resources, routes and rules: " + strings.TrimPrefix(err.Error(), "yaml: ")}}
	}
	var tbl Tables
	errs := config.Decode(raw, &tbl, "")
	var t *compiled
	if len(errs) == 0 {
		t, errs = compile(&tbl, "")
	}
	if len(errs) > 0 {
		lines := map[string]int{}
		nodeLines(&doc, "", lines)
		ps := make(config.Problems, len(errs))
		for i, e := range errs {
			ps[i] = config.Problem{Where: path, Path: e.Path, Msg: e.Msg}
			for p := e.Path; ; p = parentPath(p) {
				if n, ok := lines[p]; ok {
					ps[i].Where = fmt.Sprintf("%s:%d", path, n)
					break
				}
				if p == "" {
					break
				}
			}
		}
		return nil, ps
	}
	return t, nil
}

// nodeLines records the line of every key path in a YAML document.
func nodeLines(n *yaml.Node, path string, out map[string]int) {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			nodeLines(c, path, out)
		}
	case yaml.MappingNode:
		out[path] = n.Line
		for i := 0; i+1 < len(n.Content); i += 2 {
			p := config.Join(path, n.Content[i].Value)
			out[p] = n.Content[i].Line
			nodeLines(n.Content[i+1], p, out)
		}
	case yaml.SequenceNode:
		out[path] = n.Line
		for i, c := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			out[p] = c.Line
			nodeLines(c, p, out)
		}
	}
}

// parentPath is "rules[2]" for "rules[2].ports", "rules" for "rules[2]", "" at the top.
func parentPath(p string) string {
	i := strings.LastIndexAny(p, ".[")
	if i < 0 {
		return ""
	}
	return p[:i]
}
