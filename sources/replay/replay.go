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
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Config is the replay source's options.
type Config struct {
	// Path of a JSON-lines file ("-" reads standard input). Relative paths are relative to
	// the directory of pipeline.yaml.
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
	return component.NewSourceFactory("replay", "re-emits events from a JSON-lines file written by the file sink",
		defaults, func(env component.Env, c *Config) (component.Source, error) { return New(env, c), nil })
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

// Run reads the file to its end.
func (s *Source) Run(ctx context.Context, out component.Emitter) error {
	var r io.Reader = os.Stdin
	if s.path != "-" {
		f, err := os.Open(s.path)
		if err != nil {
			return fmt.Errorf("open %s: %w", s.path, err)
		}
		defer f.Close()
		r = f
	}
	rd := newLineReader(r, int(s.cfg.MaxLineSize))
	events := make([]flow.Event, 0, s.cfg.BatchSize)
	line, malformed, tooLong, emitted := 0, 0, 0, 0
	start := time.Now()
	emit := func() error {
		if len(events) == 0 {
			return nil
		}
		err := out.Emit(ctx, flow.NewBatch(events, nil))
		emitted += len(events)
		events = make([]flow.Event, 0, s.cfg.BatchSize)
		if err == nil && s.cfg.Rate > 0 {
			due := start.Add(time.Duration(float64(emitted) / float64(s.cfg.Rate) * float64(time.Second)))
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
		if err != nil {
			_ = emit()
			return fmt.Errorf("read %s: %w", s.path, err)
		}
		line++
		if long {
			if s.cfg.OnError == "stop" {
				_ = emit()
				return fmt.Errorf("%s:%d: line longer than max_line_size (%s)", s.path, line, s.cfg.MaxLineSize)
			}
			tooLong++
			s.env.Metrics.Dropped("line_too_long", 1)
			if tooLong <= 10 {
				s.env.Logger.Warn("skipping a line longer than max_line_size", "file", s.path, "line", line, "max_line_size", s.cfg.MaxLineSize.String())
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
				return fmt.Errorf("%s:%d: %w", s.path, line, err)
			}
			malformed++
			s.env.Metrics.Dropped("malformed", 1)
			if malformed <= 10 {
				s.env.Logger.Warn("skipping malformed line", "file", s.path, "line", line, "error", err)
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
	s.env.Logger.Info("replay finished", "file", s.path, "lines", line, "events", emitted, "malformed", malformed, "too_long", tooLong)
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
