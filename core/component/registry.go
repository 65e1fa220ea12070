package component

import (
	"fmt"
	"sort"
	"sync"

	"github.com/flowpipe/flowpipe/core/options"
)

// Factory builds one type of component from its options.
type Factory struct {
	Kind Kind
	Type string
	// Summary is a one-line description shown by `flowpipe plugins list`.
	Summary string
	// NewConfig returns a pointer to the options struct filled with defaults. The options are
	// decoded into it with core/options (yaml struct tags, unknown keys rejected); if it has a
	// Validate() error method, that runs next and may return options.FieldErrors.
	NewConfig func() any
	// New builds the component from a validated config (the value NewConfig returned).
	New func(env Env, cfg any) (any, error)
	// InFlight, for a sink, is its default for the runtime's in_flight setting (how many
	// batches it writes at once); 0 keeps the runtime's default of 1. A sink that waits on a
	// remote acknowledgement sets it higher.
	InFlight int
	// Holds, for an enricher, says that it keeps events across batches (a Holder, such as a
	// windowed aggregation): it runs only in the flowpipe process, and the runtime knows so
	// without building it.
	Holds bool
	// Reasons are the reasons the component counts drops and filters under (Env.Metrics);
	// the runtime publishes their counters at 0 when it builds the component, so that an
	// alert can be written before the first drop.
	Reasons Reasons
}

// Reasons name a component's own drop and filter reasons.
type Reasons struct {
	Dropped, Filtered []string
}

// Build is the one path from a component's options to the component, in process and in a
// plugin process alike: the options are decoded into a fresh config and validated
// (options.Check), then New builds the component. Problems with the options come back as
// options.FieldErrors relative to the component, so that each is shown at its line.
func (f Factory) Build(env Env, raw map[string]any) (any, error) {
	cfg := f.NewConfig()
	if errs := options.Check(raw, cfg, ""); len(errs) > 0 {
		return nil, errs
	}
	return f.New(env, cfg)
}

// Capabilities decodes and checks raw as Build does and returns the Linux capabilities the
// component needs with these options (NeedsCapabilities on its config; none without it):
// what the plugin host gives its process.
func (f Factory) Capabilities(raw map[string]any) ([]string, error) {
	cfg := f.NewConfig()
	if errs := options.Check(raw, cfg, ""); len(errs) > 0 {
		return nil, errs
	}
	if n, ok := cfg.(NeedsCapabilities); ok {
		return n.Capabilities(), nil
	}
	return nil, nil
}

// NewSourceFactory is a typed helper for a source factory.
func NewSourceFactory[C any](typ, summary string, defaults func() *C, build func(Env, *C) (Source, error)) Factory {
	return newFactory(KindSource, typ, summary, defaults, func(env Env, c *C) (any, error) { return build(env, c) })
}

// NewEnricherFactory is a typed helper for an enricher factory.
func NewEnricherFactory[C any](typ, summary string, defaults func() *C, build func(Env, *C) (Enricher, error)) Factory {
	return newFactory(KindEnricher, typ, summary, defaults, func(env Env, c *C) (any, error) { return build(env, c) })
}

// NewSinkFactory is a typed helper for a sink factory.
func NewSinkFactory[C any](typ, summary string, defaults func() *C, build func(Env, *C) (Sink, error)) Factory {
	return newFactory(KindSink, typ, summary, defaults, func(env Env, c *C) (any, error) { return build(env, c) })
}

func newFactory[C any](kind Kind, typ, summary string, defaults func() *C, build func(Env, *C) (any, error)) Factory {
	return Factory{
		Kind:      kind,
		Type:      typ,
		Summary:   summary,
		NewConfig: func() any { return defaults() },
		New: func(env Env, cfg any) (any, error) {
			c, ok := cfg.(*C)
			if !ok {
				return nil, fmt.Errorf("%s %q: config is %T, want %T", kind, typ, cfg, c)
			}
			return build(env, c)
		},
	}
}

// Registry maps (kind, type) to factories. It is safe for concurrent use.
type Registry struct {
	mu        sync.RWMutex
	factories map[Kind]map[string]Factory
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{factories: map[Kind]map[string]Factory{}}
}

// Register adds f; registering the same kind and type twice is a programming error.
func (r *Registry) Register(f Factory) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.factories[f.Kind]
	if m == nil {
		m = map[string]Factory{}
		r.factories[f.Kind] = m
	}
	if _, dup := m[f.Type]; dup {
		panic(fmt.Sprintf("component: %s type %q registered twice", f.Kind, f.Type))
	}
	m[f.Type] = f
}

// Lookup returns the factory for a kind and type.
func (r *Registry) Lookup(kind Kind, typ string) (Factory, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	f, ok := r.factories[kind][typ]
	return f, ok
}

// Types lists the registered types of a kind, sorted.
func (r *Registry) Types(kind Kind) []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []string
	for t := range r.factories[kind] {
		out = append(out, t)
	}
	sort.Strings(out)
	return out
}
