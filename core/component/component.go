// Package component defines the three kinds of pipeline component (source, enricher, sink),
// the factories that build them from their pipeline.yaml options, and the registry that maps a
// `type:` name to its factory.
//
// The interfaces are the same whether a component runs inside the flowpipe process or behind a
// plugin process: the plugin host implements them over gRPC. Everything that crosses them is a
// batch (flow.Batch), and acknowledgement is part of the batch, not bolted on: a source learns
// that the sinks made its batch durable through the ack function it gave flow.NewBatch.
package component

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/flow"
)

// Kind is the role of a component in a pipeline.
type Kind string

const (
	KindSource   Kind = "source"
	KindEnricher Kind = "enricher"
	KindSink     Kind = "sink"
)

// Source produces batches of events.
type Source interface {
	// Run emits batches with out.Emit until ctx is cancelled (return nil or ctx.Err()) or the
	// source is exhausted (return nil). Emit blocks while the pipeline applies backpressure.
	// The ack function of each batch tells the source what became of it.
	Run(ctx context.Context, out Emitter) error
}

// Emitter accepts batches into a pipeline.
type Emitter interface {
	// Emit hands a batch, and the caller's reference to it, to the pipeline. The batch's ack
	// function runs once every sink has accepted it, or with an error when it was dropped or
	// could not be delivered. Emit returns an error only when ctx is done or the pipeline is
	// stopping; the batch is acknowledged in every case.
	Emit(ctx context.Context, b *flow.Batch) error
}

// EncodedEmitter is an Emitter that takes batches still encoded (flow.NewEncodedBatch) and
// decodes them only where their events are needed: the pipeline runtime. A source that gets
// its batches encoded (a source plugin's, in the plugin host) hands them on undecoded only
// to an EncodedEmitter; any other Emitter gets them decoded.
type EncodedEmitter interface {
	Emitter
	TakesEncoded()
}

// Enricher changes events in place and may filter them out. One enricher instance serves
// every source of a pipeline, so Enrich must be safe for concurrent use.
type Enricher interface {
	// Enrich modifies b.Events; to filter, it shortens b.Events (keeping order is customary)
	// and counts what it removed with Env.Metrics.Filtered. An error fails the whole batch:
	// it is counted and acknowledged to its source with that error.
	Enrich(ctx context.Context, b *flow.Batch) error
}

// Pipeliner is an enricher whose work happens elsewhere (a plugin process), so that more than
// one batch in flight lets both sides work at once. StartEnrich begins enriching b (it sends
// it) and returns at once; finish waits and leaves b as Enrich would, with Enrich's error.
// The runtime calls each finish once, in the order of the StartEnrich calls of a source, and
// keeps few in flight; b is not touched between the two.
type Pipeliner interface {
	Enricher
	StartEnrich(ctx context.Context, b *flow.Batch) (finish func() error)
}

// Holder is an enricher that keeps events across calls, such as a windowed aggregation. The
// runtime attaches the emitter that feeds the stages after it. A Holder that removes events
// from a batch to emit them later calls b.Retain and releases the batch once what it emitted
// in their place is acknowledged, so acknowledgement stays end to end. It emits everything it
// holds when it is closed.
type Holder interface {
	Enricher
	Attach(next Emitter)
}

// Sink writes batches somewhere.
type Sink interface {
	// Write returns nil only when the batch is durable where the sink writes (fsynced, ACKed
	// by a collector). An error makes the runtime retry the same batch with backoff. The sink
	// must not modify or keep b.Events after Write returns.
	Write(ctx context.Context, b *flow.Batch) error
}

// EncodedWriter is a sink whose Write takes a batch still encoded (flow.Batch.Undecoded) and
// decodes it only if it needs its events: a sink plugin, which is sent the encoding as it
// is. The runtime decodes a batch before the Write of any other sink. Other sinks may be
// decoding the same batch meanwhile: an EncodedWriter uses Encoded and Len, and reads Events
// only after its own call to Decode.
type EncodedWriter interface {
	Sink
	WritesEncoded()
}

// BatchEncoder is an EncodedWriter that sends every batch in its encoding (a sink plugin).
// A batch without one (from an in-process source, or changed by an enricher) would be
// encoded by each such sink in its Write, on the path of every write; instead the runtime
// asks one of them to encode it before handing it to the sinks (EncodeBatch), in the
// goroutine that runs the enrichers, and keeps the encoding on the batch (flow.Batch.
// SetEncoded) for all of them. EncodeBatch returns nil when the events do not fit the
// sink's one message (it then encodes them itself, in parts); release gives the memory back,
// and is called once the batch is acknowledged.
type BatchEncoder interface {
	EncodedWriter
	EncodeBatch(b *flow.Batch) (enc []byte, release func())
}

// Closer is implemented by components that hold resources or buffered state. The runtime
// calls Close once, after the component's work is done (sources stopped, enrichers flushed,
// sink queues drained); ctx bounds how long it may take.
type Closer interface {
	Close(ctx context.Context) error
}

// Env is what the runtime gives a component when it builds it.
type Env struct {
	Name      string // the component's name in pipeline.yaml
	Kind      Kind
	Type      string
	ConfigDir string // directory of pipeline.yaml; relative paths in options are relative to it
	// DataDir is the pipeline's data directory (`data_dir:`); a component keeps its state
	// under it in a folder of its own, by convention <DataDir>/<what>/<name> (for example
	// queue/collector), and creates that folder when it starts, not when it is built.
	DataDir string
	// Stdout is flowpipe's standard output, also in a plugin process (whose own is the
	// plugin protocol's); nil means os.Stdout. A component that writes to standard output
	// (a file sink with path "-") writes here.
	Stdout  io.Writer
	Logger  *slog.Logger
	Metrics Metrics
	// Registerer registers component-specific Prometheus metrics; the labels component and
	// kind are added to each.
	Registerer prometheus.Registerer
}

// Metrics counts what a component does with events beyond what the runtime sees.
type Metrics interface {
	// Filtered counts events an enricher removed on purpose (a filter), by reason.
	Filtered(reason string, n int)
	// Dropped counts events lost, by reason (a source that could not keep up, a malformed
	// input). Every drop must be counted here or by the runtime.
	Dropped(reason string, n int)
	// Errors counts failed operations that did not lose events (a retried read, a reconnect).
	Errors(reason string, n int)
}

// NopMetrics counts nothing; for tests and tools that build components outside a pipeline.
type NopMetrics struct{}

func (NopMetrics) Filtered(string, int) {}
func (NopMetrics) Dropped(string, int)  {}
func (NopMetrics) Errors(string, int)   {}

// Starter is implemented by components that open resources (files, sockets, processes)
// before they work. Building a component must not start work, so that `flowpipe validate`
// can build a pipeline without side effects; the runtime calls Start when the pipeline runs,
// sinks first, then enrichers, then sources. An error stops the pipeline before any source
// runs.
type Starter interface {
	Start(ctx context.Context) error
}

// Reconfigurer is implemented by components that can take new options while they run, so
// that a reload keeps their state instead of restarting them (a conntrack source keeps its
// netlink subscription and its open connections, and loses no start and no end). Reconfigure
// decodes and checks options exactly as the factory's Build does and applies them at once:
// when it returns an error, nothing changed and the component goes on with its old options.
// An error that wraps ErrRestartNeeded says the change cannot be applied in place (a new
// network namespace, a new listen address); the runtime then replaces the component. Other
// errors are the options' problems (options.FieldErrors, positioned at their keys).
type Reconfigurer interface {
	Reconfigure(ctx context.Context, options map[string]any) error
}

// OptionsChecker is implemented by components whose options are checked elsewhere than in
// this process's registry: a component in a plugin process, which the host asks to decode
// and validate the options (as its Build would) without building or changing anything. A
// reload asks it before any component changes, so that a wrong option refuses the reload at
// its line. It returns the options' problems (options.FieldErrors, positioned at their
// keys), nil when they are good, and nil also when it cannot tell (a plugin built before
// the check, a process that is down): the options are then checked when they are applied.
type OptionsChecker interface {
	CheckOptions(ctx context.Context, options map[string]any) error
}

// ErrRestartNeeded is wrapped by Reconfigure when a change needs a new instance of the
// component.
var ErrRestartNeeded = errors.New("this change needs a new instance of the component")

// HealthChecker is implemented by components that can tell they are unhealthy (a plugin
// that keeps crashing, a collector that cannot be reached); /readyz reports the error.
type HealthChecker interface {
	Health() error
}

// Output is Stdout, or os.Stdout when it is not set.
func (e Env) Output() io.Writer {
	if e.Stdout != nil {
		return e.Stdout
	}
	return os.Stdout
}

// Path resolves a path from a component's options: relative paths are relative to the
// directory of pipeline.yaml, so a pipeline runs the same from any working directory. ""
// and "-" (standard input or output) are returned as they are.
func (e Env) Path(p string) string {
	if p == "" || p == "-" || filepath.IsAbs(p) || e.ConfigDir == "" {
		return p
	}
	return filepath.Join(e.ConfigDir, p)
}

// Register registers a component's own Prometheus metrics with Registerer (which adds the
// component and kind labels); with no Registerer (a test, a tool) it does nothing.
func (e Env) Register(cs ...prometheus.Collector) error {
	if e.Registerer == nil {
		return nil
	}
	for _, c := range cs {
		if err := e.Registerer.Register(c); err != nil {
			return fmt.Errorf("%s %s: register metrics: %w", e.Kind, e.Name, err)
		}
	}
	return nil
}

// NeedsCapabilities is implemented by a component's config (the value its factory's
// NewConfig returns, decoded and validated) when, with those options, the component needs
// Linux capabilities, named as in capabilities(7) ("CAP_NET_ADMIN"). The plugin host starts
// the component's process with exactly these and with none other (docs/security.md); a
// config without the method needs none.
type NeedsCapabilities interface {
	Capabilities() []string
}
