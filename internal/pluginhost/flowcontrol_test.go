package pluginhost

import (
	"bufio"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/pipeline"
)

// blockingSink is a sink whose collector is down: Write waits until the pipeline gives up.
type blockingSink struct{}

func (blockingSink) Write(ctx context.Context, _ *flow.Batch) error {
	<-ctx.Done()
	return ctx.Err()
}

type blockingConfig struct{}

var blockingFactory = component.NewSinkFactory("block", "waits until the pipeline stops", func() *blockingConfig { return &blockingConfig{} },
	func(component.Env, *blockingConfig) (component.Sink, error) { return blockingSink{}, nil })

func counterValue(t *testing.T, c prometheus.Counter) int {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return int(m.GetCounter().GetValue())
}

// sumLines adds up the numbers in a file of one number a line (a missing file is 0).
func sumLines(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	total := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		n, err := strconv.Atoi(sc.Text())
		if err != nil {
			continue // a line being written
		}
		total += n
	}
	return total
}

// TestSourcePluginBlocksOnFullQueue runs a fast source plugin into a sink that never
// finishes a write, through the real runtime: once the sink's queue is full, the plugin's
// Emit blocks as an in-process Emit does. What the source was told the pipeline took, beyond
// what the sink's queue admitted, stays within the emit window, instead of piling up in the
// plugin connection.
func TestSourcePluginBlocksOnFullQueue(t *testing.T) {
	const batch, maxEvents = 100, 1000
	dir := t.TempDir()
	emitted := filepath.Join(dir, "emitted")
	yaml := `admin: {listen: ""}
runtime: {shutdown_timeout: 1s}
sources:
  seq: {plugin: seq, count: 100000, batch: ` + strconv.Itoa(batch) + `, emitted: ` + emitted + `}
sinks:
  out: {type: block, queue: {max_events: ` + strconv.Itoa(maxEvents) + `}}
`
	file := filepath.Join(dir, "pipeline.yaml")
	doc, err := config.Load(file, []byte(yaml), nil)
	if err != nil {
		t.Fatal(err)
	}
	reg := component.NewRegistry()
	reg.Register(blockingFactory)
	logs := &logBuf{}
	host := NewHost(HostOptions{Registry: reg, PluginDir: pluginDir})
	p, err := pipeline.New(context.Background(), doc, pipeline.Options{
		Registry: reg, Instantiate: host.Instantiate,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log:\n%s", logs.String())
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()

	// The sink holds one batch in its Write and its queue max_events more; the source's
	// Emit may run up to the window beyond that, and must then block.
	in := p.Metrics().Component("out", "sink").In
	window := int(emitWindow)
	deadline := time.Now().Add(30 * time.Second)
	for counterValue(t, in) < maxEvents+batch || sumLines(t, emitted) < counterValue(t, in)+(window-1)*batch {
		if time.Now().After(deadline) {
			t.Fatalf("the pipeline never filled: sink took %d events, source emitted %d", counterValue(t, in), sumLines(t, emitted))
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	queued, sent := counterValue(t, in), sumLines(t, emitted)
	if bound := window * batch; sent-queued > bound {
		t.Fatalf("the source plugin was told %d events were taken, the sink's queue took %d: %d held invisibly, more than the emit window (%d batches of %d = %d)",
			sent, queued, sent-queued, window, batch, bound)
	}
	t.Logf("source emitted %d events, sink queue took %d (window %d batches)", sent, queued, window)
}
