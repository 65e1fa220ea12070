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
	return &Source{cfg: *c, path: env.Path(c.Path), env: env}
}

// maxLine bounds one JSON line; a longer one is malformed.
const maxLine = 1 << 20

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
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxLine)
	events := make([]flow.Event, 0, s.cfg.BatchSize)
	line, malformed, emitted := 0, 0, 0
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
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return fmt.Errorf("%s:%d: line longer than %d bytes", s.path, line+1, maxLine)
		}
		return fmt.Errorf("read %s: %w", s.path, err)
	}
	s.env.Logger.Info("replay finished", "file", s.path, "lines", line, "events", emitted, "malformed", malformed)
	return nil
}
