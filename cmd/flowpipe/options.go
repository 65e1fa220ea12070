package main

import (
	"context"
	"log/slog"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/pipeline"
	"github.com/flowpipe/flowpipe/core/tap"
)

// pipelineOptions is how this binary builds pipelines; the plugin host hooks in here.
func pipelineOptions(log *slog.Logger) pipeline.Options {
	opts := pipeline.Options{Registry: newRegistry(), Logger: log}
	for _, hook := range optionHooks {
		hook(&opts, log)
	}
	return opts
}

// build loads the pipeline file and builds every component, as run and validate both do;
// configuration problems are printed and become exit status 1.
func (g *globalFlags) build(ctx context.Context) (*config.Document, *pipeline.Pipeline, *slog.Logger, error) {
	log, err := g.logger()
	if err != nil {
		return nil, nil, nil, err
	}
	doc, err := g.loadConfig()
	if err != nil {
		return nil, nil, nil, printProblems(err)
	}
	opts := pipelineOptions(log)
	if doc.Admin.Listen != "" {
		opts.Taps = tap.NewRegistry(doc.Admin.TapRing)
	}
	p, err := pipeline.New(ctx, doc, opts)
	if err != nil {
		return nil, nil, nil, printProblems(err)
	}
	return doc, p, log, nil
}

// optionHooks let other files of this command adjust the options (the plugin host sets
// Instantiate and DefaultIsolation).
var optionHooks []func(*pipeline.Options, *slog.Logger)
