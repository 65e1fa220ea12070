package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/pipeline"
	"github.com/flowpipe/flowpipe/core/tap"
	"github.com/flowpipe/flowpipe/internal/pluginhost"
)

// pipelineOptions is how this binary builds pipelines: every component that names a plugin
// or runs with isolation: process (the default for built-ins) is built by the plugin host,
// which serves a built-in by re-executing this binary as `flowpipe plugin serve KIND TYPE`
// (newPluginCmd); isolation: inproc builds it in this process.
func pipelineOptions(log *slog.Logger) pipeline.Options {
	reg := newRegistry()
	host := pluginhost.NewHost(pluginhost.HostOptions{Registry: reg})
	return pipeline.Options{
		Registry:         reg,
		Logger:           log,
		Instantiate:      host.Instantiate,
		DefaultIsolation: pluginhost.DefaultIsolation,
	}
}

// build loads the pipeline file and builds every component, as run and validate both do;
// configuration problems are printed and become exit status 1.
func (g *globalFlags) build(ctx context.Context) (*config.Document, *pipeline.Pipeline, *slog.Logger, error) {
	log, err := g.logger()
	if err != nil {
		return nil, nil, nil, err
	}
	doc, err := g.loadConfig()
	var probs config.Problems
	if err != nil {
		if doc == nil || !errors.As(err, &probs) {
			return nil, nil, nil, printProblems(err)
		}
		// The document's own problems (admin, runtime, a section's shape) must not hide
		// the components': check those too, and report everything at once.
	}
	opts := pipelineOptions(log)
	if doc.Admin.Listen != "" {
		opts.Taps = tap.NewRegistry(doc.Admin.TapRing)
	}
	if len(probs) > 0 {
		return nil, nil, nil, printProblems(withComponentProblems(ctx, doc, probs, opts))
	}
	p, err := pipeline.New(ctx, doc, opts)
	if err != nil {
		return nil, nil, nil, printProblems(err)
	}
	return doc, p, log, nil
}

// withComponentProblems adds, to a document's own problems, those of its components: they
// are built as at start, and closed. So the problems of admin:, runtime: or a section's
// shape do not hide the components'.
func withComponentProblems(ctx context.Context, doc *config.Document, probs config.Problems, opts pipeline.Options) config.Problems {
	p, err := pipeline.New(ctx, doc, opts)
	var more config.Problems
	if errors.As(err, &more) {
		probs = append(probs, more...)
	} else if err != nil {
		probs = append(probs, config.Problem{Where: doc.File, Msg: err.Error()})
	}
	if p != nil {
		p.Close(ctx)
	}
	probs.Sort()
	return probs
}
