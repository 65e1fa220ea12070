package sdk

import (
	"os"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/internal/pluginserver"
)

// Info describes a plugin to `flowpipe plugins list` and in the host's log.
type Info struct {
	Type    string // the component type it implements, e.g. "webhook"
	Version string // the plugin's own version, e.g. "1.2.0"
	Summary string // one line
}

// ServeSink is the whole main of a sink plugin: it decodes the options from pipeline.yaml
// into a *C that defaults returned (yaml tags, unknown keys rejected, C's Validate run if it
// has one), builds the sink with build, and serves it to flowpipe until flowpipe stops it.
func ServeSink[C any](info Info, defaults func() *C, build func(component.Env, *C) (component.Sink, error)) {
	Serve(component.NewSinkFactory(info.Type, info.Summary, defaults, build), info.Version)
}

// ServeSource is ServeSink for a source.
func ServeSource[C any](info Info, defaults func() *C, build func(component.Env, *C) (component.Source, error)) {
	Serve(component.NewSourceFactory(info.Type, info.Summary, defaults, build), info.Version)
}

// ServeEnricher is ServeSink for an enricher. An enricher that keeps events across batches
// (component.Holder) cannot run out of process.
func ServeEnricher[C any](info Info, defaults func() *C, build func(component.Env, *C) (component.Enricher, error)) {
	Serve(component.NewEnricherFactory(info.Type, info.Summary, defaults, build), info.Version)
}

// Serve serves the component that f builds as a plugin process and exits when the host is
// done with it. Run by hand, outside flowpipe, it explains that it is a plugin and exits 1.
func Serve(f component.Factory, version string) {
	os.Exit(pluginserver.Serve(f, version))
}
