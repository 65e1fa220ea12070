// Package webhook is a flowpipe sink that POSTs each batch as NDJSON (one JSON event per
// line, the schema of docs/schema.md) and acknowledges the batch only on a 2xx answer.
// Other answers and network errors are retried with backoff; when the attempts run out,
// Write fails and flowpipe retries the batch later, so nothing is lost, but a receiver may
// see a batch twice: the X-Flowpipe-Batch header (the batch's first event ID) lets it
// de-duplicate.
package webhook

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/sdk"
)

// Info describes the plugin to flowpipe.
var Info = sdk.Info{Type: "webhook", Version: "0.1.0", Summary: "POSTs each batch as NDJSON to an HTTP endpoint; acknowledges on 2xx"}

// Config is the sink's options in pipeline.yaml.
type Config struct {
	URL     string            `yaml:"url" required:"true"`
	Headers map[string]string `yaml:"headers"` // e.g. Authorization
	Timeout time.Duration     `yaml:"timeout"` // one request
	// Attempts is how many times one Write tries before it reports failure to flowpipe,
	// which then retries the batch with its own backoff.
	Attempts int           `yaml:"attempts"`
	Backoff  time.Duration `yaml:"backoff"` // before the second attempt; doubles after
}

// Defaults are the options a pipeline.yaml does not set.
func Defaults() *Config {
	return &Config{Timeout: 10 * time.Second, Attempts: 3, Backoff: 200 * time.Millisecond}
}

// Validate checks the options; flowpipe validate shows each problem at its line.
func (c *Config) Validate() error {
	var errs options.FieldErrors
	if u, err := url.Parse(c.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs.Add("url", "want an http:// or https:// URL, got %q", c.URL)
	}
	if c.Timeout <= 0 {
		errs.Add("timeout", "must be positive")
	}
	if c.Attempts < 1 {
		errs.Add("attempts", "must be at least 1")
	}
	if c.Backoff < 0 {
		errs.Add("backoff", "must not be negative")
	}
	return errs.Err()
}

// Sink posts batches.
type Sink struct {
	cfg    *Config
	env    component.Env
	client *http.Client
}

// New builds the sink.
func New(env component.Env, c *Config) (component.Sink, error) {
	return &Sink{cfg: c, env: env, client: &http.Client{Timeout: c.Timeout}}, nil
}

// Write returns nil once the endpoint answered 2xx.
func (s *Sink) Write(ctx context.Context, b *flow.Batch) error {
	if len(b.Events) == 0 {
		return nil
	}
	var body []byte
	for i := range b.Events {
		body = flow.AppendJSON(body, &b.Events[i])
		body = append(body, '\n')
	}
	wait := s.cfg.Backoff
	var err error
	for attempt := 1; ; attempt++ {
		if err = s.post(ctx, body, b.Events[0].EventID.String()); err == nil {
			return nil
		}
		s.env.Metrics.Errors("post_failed", 1)
		if attempt >= s.cfg.Attempts {
			break
		}
		s.env.Logger.Warn("webhook POST failed; retrying", "attempt", attempt, "error", err, "in", wait)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait *= 2
	}
	return fmt.Errorf("POST %d events to %s: %w", len(b.Events), s.cfg.URL, err)
}

func (s *Sink) post(ctx context.Context, body []byte, batchID string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.cfg.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-ndjson")
	req.Header.Set("X-Flowpipe-Batch", batchID)
	for k, v := range s.cfg.Headers {
		req.Header.Set(k, v)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("%s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}
