package main

import (
	"log/slog"

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

// optionHooks let other files of this command adjust the options (the plugin host sets
// Instantiate and DefaultIsolation).
var optionHooks []func(*pipeline.Options, *slog.Logger)
