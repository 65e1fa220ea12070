// Package replay is a source that reads JSON lines written by the file sink and emits the
// events again (`type: replay`), unchanged, so that recorded flows can be re-sent to a
// collector or run through another pipeline. The round trip file → replay → file is lossless.
package replay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Config is the replay source's options.
type Config struct {
	// Path of a JSON-lines file ("-" reads standard input), a directory (every file in it),
	// or a glob such as "flows.jsonl*": the files are replayed oldest first, by name, a
	// file sink's rotated files (name.<UTC time>) before its current one (name). Relative
	// paths are relative to the directory of pipeline.yaml.
	Path string `yaml:"path" required:"true"`
	// BatchSize is the number of events per batch.
	BatchSize int `yaml:"batch_size"`
	// Rate limits events per second; 0 is full speed.
	Rate int `yaml:"rate"`
	// OnError is "skip" (default: a malformed line is logged with its line number, counted
	// as dropped with reason malformed, and skipped) or "stop" (the source fails).
	OnError string `yaml:"on_error"`
}

func defaults() *Config { return &Config{BatchSize: 1024, OnError: "skip"} }

// Validate checks the options.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	if c.Path == "" {
		errs.Add("path", "must not be empty")
	}
	if c.BatchSize < 1 {
		errs.Add("batch_size", "must be at least 1, got %d", c.BatchSize)
	}
	if c.Rate < 0 {
		errs.Add("rate", "must not be negative")
	}
	if c.OnError != "skip" && c.OnError != "stop" {
		errs.Add("on_error", "unknown mode %q (want skip or stop)", c.OnError)
	}
	return errs.Err()
}

// Factory returns the replay source's factory.
func Factory() component.Factory {
	f := component.NewSourceFactory("replay", "re-emits events from a JSON-lines file written by the file sink",
		defaults, func(env component.Env, c *Config) (component.Source, error) { return New(env, c), nil })
	f.Reasons.Dropped = []string{"malformed"}
	return f
}

// Source replays a file.
type Source struct {
	cfg  Config
	path string
	env  component.Env
}

// New makes a replay source; the file is opened by Run.
func New(env component.Env, c *Config) *Source {
	return &Source{cfg: *c, path: env.Path(c.Path), env: env}
}

// maxLine bounds one JSON line; a longer one is malformed.
const maxLine = 1 << 20

// Run reads every file of path, oldest first, to its end.
func (s *Source) Run(ctx context.Context, out component.Emitter) error {
	files, err := s.files()
	if err != nil {
		return err
	}
	st := &progress{start: time.Now()}
	for _, path := range files {
		if err := s.replay(ctx, out, path, st); err != nil || ctx.Err() != nil {
			return err
		}
	}
	s.env.Logger.Info("replay finished", "path", s.path, "files", len(files), "lines", st.lines, "events", st.emitted, "malformed", st.malformed)
	return nil
}

// files lists what path names, oldest first.
func (s *Source) files() ([]string, error) {
	if s.path == "-" {
		return []string{"-"}, nil
	}
	var files []string
	if strings.ContainsAny(s.path, "*?[") {
		m, err := filepath.Glob(s.path)
		if err != nil {
			return nil, fmt.Errorf("path %s: %w", s.path, err)
		}
		for _, f := range m {
			if st, err := os.Stat(f); err == nil && st.Mode().IsRegular() {
				files = append(files, f)
			}
		}
		if len(files) == 0 {
			return nil, fmt.Errorf("path %s: no file matches", s.path)
		}
	} else if st, err := os.Stat(s.path); err == nil && st.IsDir() {
		entries, err := os.ReadDir(s.path)
		if err != nil {
			return nil, fmt.Errorf("read directory %s: %w", s.path, err)
		}
		for _, e := range entries {
			if e.Type().IsRegular() {
				files = append(files, filepath.Join(s.path, e.Name()))
			}
		}
		if len(files) == 0 {
			return nil, fmt.Errorf("directory %s has no file to replay", s.path)
		}
	} else {
		return []string{s.path}, nil
	}
	// By name, except that a file whose rotations are in the set (name.<UTC time>) is the
	// newest of them, as the file sink names them.
	key := func(f string) string {
		for _, g := range files {
			if strings.HasPrefix(g, f+".") {
				return f + "\xff"
			}
		}
		return f
	}
	sort.Slice(files, func(i, j int) bool { return key(files[i]) < key(files[j]) })
	return files, nil
}

// progress is what the files replayed so far amount to; the rate applies across them.
type progress struct {
	start                     time.Time
	lines, malformed, emitted int
}

// replay emits the events of one file.
func (s *Source) replay(ctx context.Context, out component.Emitter, path string, st *progress) error {
	var r io.Reader = os.Stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return fmt.Errorf("open %s: %w", path, err)
		}
		defer f.Close()
		r = f
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxLine)
	events := make([]flow.Event, 0, s.cfg.BatchSize)
	line := 0
	defer func() { st.lines += line }()
	emit := func() error {
		if len(events) == 0 {
			return nil
		}
		err := out.Emit(ctx, flow.NewBatch(events, nil))
		st.emitted += len(events)
		events = make([]flow.Event, 0, s.cfg.BatchSize)
		if err == nil && s.cfg.Rate > 0 {
			due := st.start.Add(time.Duration(float64(st.emitted) / float64(s.cfg.Rate) * float64(time.Second)))
			select {
			case <-time.After(time.Until(due)):
			case <-ctx.Done():
			}
		}
		return err
	}
	for sc.Scan() {
		line++
		b := sc.Bytes()
		if len(b) == 0 {
			continue
		}
		events = append(events, flow.Event{})
		if err := flow.ParseJSON(b, &events[len(events)-1]); err != nil {
			events = events[:len(events)-1]
			if s.cfg.OnError == "stop" {
				_ = emit()
				return fmt.Errorf("%s:%d: %w", path, line, err)
			}
			st.malformed++
			s.env.Metrics.Dropped("malformed", 1)
			if st.malformed <= 10 {
				s.env.Logger.Warn("skipping malformed line", "file", path, "line", line, "error", err)
			}
			continue
		}
		if len(events) == s.cfg.BatchSize {
			if err := emit(); err != nil {
				return nil
			}
		}
		if ctx.Err() != nil {
			return nil
		}
	}
	if err := emit(); err != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return fmt.Errorf("%s:%d: line longer than %d bytes", path, line+1, maxLine)
		}
		return fmt.Errorf("read %s: %w", path, err)
	}
	return nil
}
