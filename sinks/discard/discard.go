// Package discard is a sink that accepts every batch and keeps nothing (`type: discard`):
// for benchmarks and for pipelines whose only purpose is their metrics.
package discard

import (
	"context"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Config has no options.
type Config struct{}

// Factory returns the discard sink's factory.
func Factory() component.Factory {
	return component.NewSinkFactory("discard", "accepts and forgets every event (benchmarks, metrics only)",
		func() *Config { return &Config{} },
		func(component.Env, *Config) (component.Sink, error) { return Sink{}, nil })
}

// Sink accepts everything. It never looks at the events, so a batch that comes encoded (from
// a source plugin, a disk queue, or the host when the sink is a plugin) is never decoded.
type Sink struct{}

func (Sink) Write(context.Context, *flow.Batch) error { return nil }

// WritesEncoded makes Sink a component.EncodedWriter.
func (Sink) WritesEncoded() {}
