package resources

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/flowpipe/flowpipe/core/config"
)

// tableFile is the tables_file and what was last seen of it.
type tableFile struct {
	path string

	mu      sync.Mutex // one load at a time (the watcher and Reload)
	stat    fileStat   // metadata when last read, valid or not
	sum     [32]byte   // content of the tables in force
	hasSum  bool
	missing bool // the last check found no file (logged once)
}

type fileStat struct {
	mtime time.Time
	size  int64
	ino   uint64
	dev   uint64
}

func statOf(fi os.FileInfo) fileStat {
	s := fileStat{mtime: fi.ModTime(), size: fi.Size()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino, s.dev = st.Ino, uint64(st.Dev)
	}
	return s
}

// load reads and compiles the file when its metadata changed since the last read (or always,
// with force). changed is false when the file was not read or its content is what is already
// in force. A file that cannot be read or parsed is an error, reported once per change.
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
	if !force && st == f.stat {
		return nil, false, nil
	}
	// Remember the metadata seen before reading: a write that lands while we read changes it
	// again, so the next check reads the file once more.
	f.stat = st
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
// as pipeline.yaml: unknown keys and wrong types are errors, each at its key path.
func parseTables(path string, data []byte) (*compiled, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		// An empty file is almost always a writer caught mid-write, not a wish to forget
		// every resource; refuse it so the previous tables stay.
		return nil, fmt.Errorf("tables file %s is empty; write {} to clear the tables on purpose", path)
	}
	var raw map[string]any
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("tables file %s: %w", path, err)
	}
	var tbl Tables
	if errs := config.Decode(raw, &tbl, ""); len(errs) > 0 {
		return nil, fileErrors(path, errs)
	}
	t, errs := compile(&tbl, "")
	if len(errs) > 0 {
		return nil, fileErrors(path, errs)
	}
	return t, nil
}
