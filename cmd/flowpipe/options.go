package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/pipeline"
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
	var probs config.Problems
	if err != nil {
		if doc == nil || !errors.As(err, &probs) {
			return nil, nil, nil, printProblems(err)
		}
		// The document's own problems (admin, runtime, a section's shape) must not hide
		// the components': check those too, and report everything at once.
	}
	p, err := pipeline.New(ctx, doc, pipelineOptions(log))
	if len(probs) > 0 {
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
		return nil, nil, nil, printProblems(probs)
	}
	if err != nil {
		return nil, nil, nil, printProblems(err)
	}
	return doc, p, log, nil
}

// optionHooks let other files of this command adjust the options (the plugin host sets
// Instantiate and DefaultIsolation).
var optionHooks []func(*pipeline.Options, *slog.Logger)
