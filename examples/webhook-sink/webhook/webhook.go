// Package webhook is a flowpipe sink that POSTs each batch as NDJSON (one JSON event per
// line, in the schema of docs/schema.md, or ECS or OCSF with the format option) and acknowledges the batch only on a 2xx answer.
// Write tries once: a network error or a 5xx fails it, and flowpipe retries the batch with
// its own backoff (the sink's retry: settings), so nothing is lost, but a receiver may see a
// batch twice: the X-Flowpipe-Batch header (the batch's first event ID) lets it
// de-duplicate. A 4xx that says the batch itself is unacceptable (400, 413, 422, ...) is
// permanent (flow.Permanent): flowpipe drops the batch as rejected instead of retrying it.
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
	"github.com/flowpipe/flowpipe/core/schema"
	"github.com/flowpipe/flowpipe/sdk"
)

// Info describes the plugin to flowpipe.
var Info = sdk.Info{Type: "webhook", Version: "0.1.0", Summary: "POSTs each batch as NDJSON to an HTTP endpoint; acknowledges on 2xx"}

// Config is the sink's options in pipeline.yaml.
type Config struct {
	URL     string            `yaml:"url" required:"true"`
	Headers map[string]string `yaml:"headers"` // e.g. Authorization
	Timeout time.Duration     `yaml:"timeout"` // one request
	// Format is the schema of each line: flowpipe, ecs or ocsf.
	Format string `yaml:"format"`
}

// Defaults are the options a pipeline.yaml does not set.
func Defaults() *Config {
	return &Config{Timeout: 10 * time.Second, Format: "flowpipe"}
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
	if _, ok := schema.Parse(c.Format); !ok {
		errs.Add("format", "unknown format %q (want %s)", c.Format, schema.Choices)
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
	format, _ := schema.Parse(s.cfg.Format)
	enc := schema.Encoder{Format: format}
	var body []byte
	for i := range b.Events {
		body = enc.Append(body, &b.Events[i])
		body = append(body, '\n')
	}
	if err := s.post(ctx, body, b.Events[0].EventID.String()); err != nil {
		s.env.Metrics.Errors("post_failed", 1)
		return fmt.Errorf("POST %d events to %s: %w", len(b.Events), s.cfg.URL, err)
	}
	return nil
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
	if resp.StatusCode >= 200 && resp.StatusCode <= 299 {
		return nil
	}
	err = fmt.Errorf("%s: %s", resp.Status, bytes.TrimSpace(msg))
	if rejects(resp.StatusCode) {
		return flow.Permanent(err)
	}
	return err
}

// rejects reports whether an answer says the batch itself can never be accepted. Other 4xx
// are about the endpoint or the credentials (401, 403, 404), or ask to come back later (408,
// 429): fixing those delivers the batch, so they are retried.
func rejects(status int) bool {
	switch status {
	case http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound, http.StatusRequestTimeout, http.StatusTooManyRequests:
		return false
	}
	return status >= 400 && status <= 499
}
