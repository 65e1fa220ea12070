// Package replay is a source that reads JSON lines written by the file sink and emits the
// events again (`type: replay`), unchanged, so that recorded flows can be re-sent to a
// collector or run through another pipeline. The round trip file → replay → file is lossless.
package replay

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

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
	// MaxLineSize bounds one line (default 1MiB). A longer line is malformed: under
	// on_error: skip it is skipped (reason line_too_long) and the lines after it are read.
	MaxLineSize config.ByteSize `yaml:"max_line_size"`
}

func defaults() *Config { return &Config{BatchSize: 1024, OnError: "skip", MaxLineSize: 1 << 20} }

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
	if c.MaxLineSize < 1<<10 || c.MaxLineSize > 1<<30 {
		errs.Add("max_line_size", "must be between 1KiB and 1GiB, got %s", c.MaxLineSize)
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
	f.Reasons.Dropped = []string{"malformed", "line_too_long"}
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
	s := &Source{cfg: *c, path: env.Path(c.Path), env: env}
	if s.cfg.MaxLineSize <= 0 {
		s.cfg.MaxLineSize = defaults().MaxLineSize
	}
	return s
}

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
	s.env.Logger.Info("replay finished", "path", s.path, "files", len(files), "lines", st.lines, "events", st.emitted, "malformed", st.malformed, "too_long", st.tooLong)
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
	tooLong                   int
}

// decompress recognises a zstd or gzip stream by its magic number (what the file sink's
// compression option writes, rotated files included) and returns a reader of its content and
// whether it is compressed; anything else is returned as it is.
func decompress(r io.Reader) (io.Reader, func(), bool, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	magic, _ := br.Peek(4)
	switch {
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		d, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, nil, true, fmt.Errorf("zstd: %w", err)
		}
		return d, d.Close, true, nil
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		g, err := gzip.NewReader(br) // multistream: every member, one per batch
		if err != nil {
			return nil, nil, true, fmt.Errorf("gzip: %w", err)
		}
		return g, func() { g.Close() }, true, nil
	}
	return br, func() {}, false, nil
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
	r, closeFn, compressed, err := decompress(r)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	defer closeFn()
	rd := newLineReader(r, int(s.cfg.MaxLineSize))
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
	for {
		b, long, err := rd.next()
		if err == io.EOF {
			break
		}
		if err != nil && compressed && errors.Is(err, io.ErrUnexpectedEOF) {
			// A writer killed in the middle of a frame leaves it torn at the end of the file
			// (the file sink cuts it off when it starts again; that batch was not
			// acknowledged, and is written again). What came before it is whole.
			if s.cfg.OnError == "stop" {
				_ = emit()
				return fmt.Errorf("read %s: the compressed stream ends in the middle of a frame after line %d (a writer stopped mid-write leaves that; on_error: skip reads the file up to there): %w", path, line, err)
			}
			st.malformed++
			s.env.Metrics.Dropped("malformed", 1)
			s.env.Logger.Warn("the compressed file ends in the middle of a frame (its writer was stopped mid-write): read up to there", "file", path, "lines", line)
			break
		}
		if err != nil {
			_ = emit()
			return fmt.Errorf("read %s: %w", path, err)
		}
		line++
		if long {
			if s.cfg.OnError == "stop" {
				_ = emit()
				return fmt.Errorf("%s:%d: line longer than max_line_size (%s)", path, line, s.cfg.MaxLineSize)
			}
			st.tooLong++
			s.env.Metrics.Dropped("line_too_long", 1)
			if st.tooLong <= 10 {
				s.env.Logger.Warn("skipping a line longer than max_line_size", "file", path, "line", line, "max_line_size", s.cfg.MaxLineSize.String())
			}
			continue
		}
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
	return nil
}

// lineReader reads lines of at most max bytes (without the newline); a longer line is
// reported as long and skipped to its end without being held in memory.
type lineReader struct {
	r   *bufio.Reader
	max int
	buf []byte
}

func newLineReader(r io.Reader, max int) *lineReader {
	return &lineReader{r: bufio.NewReaderSize(r, 64<<10), max: max}
}

// next returns the next line (valid until the next call), or long when it was over the
// limit, or io.EOF at the end. A last line without a newline counts.
func (l *lineReader) next() (line []byte, long bool, err error) {
	l.buf = l.buf[:0]
	for {
		frag, err := l.r.ReadSlice('\n')
		if !long {
			n := len(l.buf) + len(frag) // the line's length so far, without its newline
			if len(frag) > 0 && frag[len(frag)-1] == '\n' {
				n--
			}
			if n > l.max {
				long, l.buf = true, l.buf[:0]
			} else {
				l.buf = append(l.buf, frag...)
			}
		}
		switch {
		case err == nil:
			if long {
				return nil, true, nil
			}
			return trimEOL(l.buf), false, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case err == io.EOF:
			if long {
				return nil, true, nil
			}
			if len(l.buf) == 0 {
				return nil, false, io.EOF
			}
			return trimEOL(l.buf), false, nil
		default:
			return nil, false, err
		}
	}
}

func trimEOL(b []byte) []byte {
	b = bytes.TrimSuffix(b, []byte("\n"))
	return bytes.TrimSuffix(b, []byte("\r"))
}
