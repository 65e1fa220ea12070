package pluginhost

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/internal/backoff"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// restartBackoff: the first restart comes after about a second, each further consecutive
// failure doubles the wait, up to 30 s, so that a plugin whose cause of failure is gone is
// back soon, jittered (internal/backoff) so that many failing plugins do not restart in
// step. A variable so that tests restart sooner.
var restartBackoff = backoff.Policy{Initial: time.Second, Max: 30 * time.Second}

// instance is the host side of one component: it owns the current plugin process, restarts
// it when it crashes or hangs, and survives the restarts so the runtime sees one component.
type instance struct {
	spec     config.Component // Options under mu: Reconfigure changes them
	env      component.Env
	settings Settings
	launcher *launcher
	options  []byte // under mu
	// capsOf returns the capabilities a built-in needs with the given options
	// (Factory.Capabilities); nil for an external plugin, which gets none.
	capsOf      func(map[string]any) ([]string, error)
	reconfigure sync.Mutex // one Reconfigure at a time

	restarts    prometheus.Counter
	redelivered prometheus.Counter
	up          prometheus.Gauge

	mu       sync.Mutex
	cur      *proc
	avail    chan struct{} // closed while cur is set
	started  bool
	closed   bool
	failures int // consecutive, reset by a successful call
	lastErr  error
	health   error // the component's own Health() in the current process, from the last ping
	timer    *time.Timer
}

func newInstance(spec config.Component, env component.Env, s Settings, l *launcher, options []byte) *instance {
	in := &instance{spec: spec, env: env, settings: s, launcher: l, options: options, avail: make(chan struct{})}
	in.restarts = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "flowpipe_plugin_restarts_total",
		Help: "Times the component's plugin process was restarted after it crashed, hung or failed to start.",
	})
	in.redelivered = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "flowpipe_plugin_redelivered_events_total",
		Help: "Events sent to the plugin again because the process failed before acknowledging them; the output may hold them twice.",
	})
	in.up = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "flowpipe_plugin_up",
		Help: "1 while the component's plugin process is running and answering.",
	})
	if env.Registerer != nil {
		for _, c := range []prometheus.Collector{in.restarts, in.redelivered, in.up, remoteMetrics{in}} {
			if err := env.Registerer.Register(c); err != nil {
				var are prometheus.AlreadyRegisteredError
				if !errors.As(err, &are) {
					env.Logger.Warn("register plugin metric", "error", err)
				}
			}
		}
	}
	return in
}

// adopt makes p the current process and starts watching it.
func (in *instance) adopt(p *proc) {
	// The watch's cancel is set before p is published: stop reads it.
	ctx, cancel := context.WithCancel(context.Background())
	p.watch = cancel
	in.mu.Lock()
	if in.closed {
		in.mu.Unlock()
		p.kill()
		return
	}
	in.cur = p
	close(in.avail)
	in.mu.Unlock()
	in.up.Set(1)
	if p.data != nil {
		p.data.start(func(err error) { in.fail(p, err) })
	}
	in.env.Logger.Debug("plugin process running", "plugin", in.launcher.describe, "pid", p.pid(), "version", p.desc.Version, "data_channel", p.data != nil)
	in.watch(ctx, p)
}

// watch detects a process that exits (its Watch stream breaks) or stops answering (a health
// check times out).
func (in *instance) watch(ctx context.Context, p *proc) {
	select {
	case <-p.done: // stopped before it was watched
		return
	default:
	}
	stream, err := p.comp.Watch(ctx, &pb.WatchRequest{})
	if err != nil {
		in.fail(p, fmt.Errorf("watch the plugin process: %w", err))
		return
	}
	go func() {
		_, err := stream.Recv()
		select {
		case <-p.done:
			return
		default:
		}
		in.fail(p, fmt.Errorf("lost the connection to the plugin process (it exited or crashed): %v", err))
	}()
	go func() {
		t := time.NewTicker(in.settings.PingInterval)
		defer t.Stop()
		for {
			select {
			case <-p.done:
				return
			case <-t.C:
			}
			err := in.alive(ctx, p)
			select {
			case <-p.done:
				return
			default:
			}
			if err != nil {
				in.fail(p, fmt.Errorf("the plugin is hung: %w", err))
				return
			}
		}
	}()
}

// ping checks that the plugin answers, within the given time, and takes the component's
// own health and counts from the answer: they travel while a Write is in progress.
func (in *instance) ping(ctx context.Context, p *proc, within time.Duration) error {
	cctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	resp, err := p.comp.Health(cctx, &pb.HealthRequest{})
	if status.Code(err) == codes.Unimplemented {
		_, err = p.comp.Describe(cctx, &pb.DescribeRequest{}) // a plugin from before Health
		return err
	}
	if err != nil {
		return err
	}
	applyCounts(in.env.Metrics, resp.Counts)
	var health error
	if resp.Error != "" {
		health = errors.New(resp.Error)
	}
	in.mu.Lock()
	if in.cur == p {
		in.health = health
	}
	in.mu.Unlock()
	return nil
}

// hungAfter is how many ping intervals a health check may go unanswered, while the process
// sends nothing else either, before the plugin counts as hung. One interval is no proof: on
// a busy host the plugin, or the host itself, may wait that long for a CPU.
const hungAfter = 2

// alive checks that p is alive: it answers a health check within hungAfter ping intervals
// (the interval it was due in, and the next), or, when the answer is later still, it sent
// something else meanwhile (a frame on its data channel, an answer to a call), which a
// stopped or deadlocked process does not. It returns why p is hung otherwise, or that the
// connection to it failed.
func (in *instance) alive(ctx context.Context, p *proc) error {
	heard := p.heard.Load()
	err := in.ping(ctx, p, hungAfter*in.settings.PingInterval)
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil || status.Code(err) != codes.DeadlineExceeded:
		return fmt.Errorf("health check: %w", err) // not a late answer: the connection failed
	case p.heard.Load() != heard:
		return nil // late, but it is working
	}
	return fmt.Errorf("it did not answer a health check within %d ping intervals of %s (process.ping_interval), and sent nothing else meanwhile: %v", hungAfter, in.settings.PingInterval, err)
}

// errHung is the cause of a call cancelled because the plugin stopped answering.
var errHung = errors.New("the plugin is hung")

// guard watches a call to p in progress: every call_timeout, it checks that the plugin still
// answers. A plugin that answers is waiting on its destination (a sink whose collector is
// down) and is left to finish; one that does not is hung: the call is cancelled with errHung
// and the process is replaced. done ends the watch.
func (in *instance) guard(ctx context.Context, p *proc, call string) (cctx context.Context, done func()) {
	cctx, cancel := context.WithCancelCause(ctx)
	// A timer, not a goroutine that waits on one: a call is a batch, and a goroutine started
	// per batch costs a wake-up of another thread.
	var (
		mu      sync.Mutex
		stopped bool
		t       *time.Timer
	)
	start := time.Now()
	check := func() {
		select {
		case <-p.done:
			return
		default:
		}
		err := in.alive(context.Background(), p)
		mu.Lock()
		defer mu.Unlock()
		if stopped {
			return // it returned meanwhile
		}
		if err != nil {
			cancel(errHung)
			return
		}
		in.env.Logger.Warn("plugin call still in progress; the plugin answers health checks, so it is waiting, not hung",
			"plugin", in.launcher.describe, "call", call, "for", time.Since(start).Round(time.Second))
		t.Reset(in.settings.CallTimeout)
	}
	mu.Lock()
	t = time.AfterFunc(in.settings.CallTimeout, check)
	mu.Unlock()
	return cctx, func() {
		mu.Lock()
		stopped = true
		t.Stop()
		mu.Unlock()
		cancel(nil)
	}
}

// get returns the current process, waiting while it restarts.
func (in *instance) get(ctx context.Context) (*proc, error) {
	for {
		in.mu.Lock()
		if in.closed {
			in.mu.Unlock()
			return nil, errors.New("plugin is closed")
		}
		if p := in.cur; p != nil {
			in.mu.Unlock()
			return p, nil
		}
		ch, last := in.avail, in.lastErr
		in.mu.Unlock()
		if in.launcher.inMemory {
			return nil, fmt.Errorf("in-memory plugin failed: %v", last)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("plugin is restarting after: %v: %w", last, ctx.Err())
		}
	}
}

// fail kills p because it crashed or hung, and schedules a restart.
func (in *instance) fail(p *proc, err error) {
	in.mu.Lock()
	if in.closed {
		in.mu.Unlock()
		return // Close stops the process
	}
	if in.cur != p {
		in.mu.Unlock()
		p.kill() // an earlier process, already replaced
		return
	}
	p.failed = err
	in.cur = nil
	in.health = nil
	in.avail = make(chan struct{})
	in.failures++
	n := in.failures
	in.lastErr = err
	in.mu.Unlock()
	in.up.Set(0)
	p.kill()
	if in.launcher.inMemory {
		in.env.Logger.Error("in-memory plugin failed", "error", err)
		return
	}
	in.schedule(n, err)
}

func (in *instance) schedule(failures int, err error) {
	d := restartBackoff.Delay(failures)
	in.env.Logger.Error("plugin failed; restarting it", "plugin", in.launcher.describe, "error", err, "consecutive_failures", failures, "restart_in", d.Round(time.Millisecond))
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.closed {
		return
	}
	in.timer = time.AfterFunc(d, in.restart)
}

func (in *instance) restart() {
	in.mu.Lock()
	if in.closed {
		in.mu.Unlock()
		return
	}
	started := in.started
	spec, opts := in.spec, in.options // as the last Reconfigure left them
	in.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*in.settings.StartTimeout)
	defer cancel()
	p, _, err := startProc(ctx, in.launcher, spec, in.env, in.settings, opts)
	if err == nil && started {
		err = startRPC(ctx, p)
		if err != nil {
			p.kill()
		}
	}
	in.restarts.Inc()
	if err != nil {
		in.mu.Lock()
		in.failures++
		n := in.failures
		in.lastErr = err
		in.mu.Unlock()
		in.schedule(n, err)
		return
	}
	in.env.Logger.Info("plugin restarted", "plugin", in.launcher.describe, "pid", p.pid())
	in.adopt(p)
}

func startRPC(ctx context.Context, p *proc) error {
	resp, err := p.comp.Start(ctx, &pb.StartRequest{})
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	return pb.ErrorFromProto(resp.Failure, resp.Error)
}

// succeeded records a call that worked: the plugin is healthy again.
func (in *instance) succeeded() {
	in.mu.Lock()
	in.failures = 0
	in.mu.Unlock()
}

// Start starts the component's work in the plugin (component.Starter). The runtime calls it
// once, so an unpinned third-party plugin is warned about once.
func (in *instance) Start(ctx context.Context) error {
	in.mu.Lock()
	in.started = true
	in.mu.Unlock()
	if l := in.launcher; l.path != "" && l.checksum == nil {
		sum := "(unreadable)"
		if b, err := FileSHA256(l.path); err == nil {
			sum = hex.EncodeToString(b)
		}
		in.env.Logger.Warn("plugin runs without a sha256: pin: whoever can replace its binary runs code as flowpipe; pin it in pipeline.yaml",
			"plugin", l.path, "sha256", sum)
	}
	p, err := in.get(ctx)
	if err != nil {
		return err
	}
	if err := startRPC(ctx, p); err != nil {
		return fmt.Errorf("%s: %w", in.launcher.describe, err)
	}
	return nil
}

// Health reports a plugin that keeps failing (component.HealthChecker, for /readyz).
func (in *instance) Health() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.failures >= backoff.FailingAfter {
		return fmt.Errorf("plugin keeps failing (%d times in a row), last: %v", in.failures, in.lastErr)
	}
	return in.health
}

// Close flushes and closes the component and stops its process.
func (in *instance) Close(ctx context.Context) error {
	in.mu.Lock()
	if in.closed {
		in.mu.Unlock()
		return nil
	}
	in.closed = true
	p := in.cur
	in.cur = nil
	if in.timer != nil {
		in.timer.Stop()
	}
	in.mu.Unlock()
	in.up.Set(0)
	if p == nil {
		return nil
	}
	if err := p.close(ctx); err != nil {
		p.kill()
		return fmt.Errorf("%s: %w", in.launcher.describe, err)
	}
	return nil
}

// callErr decides what a failed call means: the caller's context ended (not the plugin's
// fault), or the plugin crashed or hung, which restarts it.
// cctx is the call's context from guard.
func (in *instance) callErr(ctx, cctx context.Context, p *proc, call string, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	in.mu.Lock()
	failed := p.failed // the watch or the health checks failed it first: say why
	in.mu.Unlock()
	switch {
	case context.Cause(cctx) == errHung:
		err = fmt.Errorf("%s did not return within %s (process.call_timeout), and the plugin did not answer a health check within %d ping intervals of %s (process.ping_interval) and sent nothing else: the plugin is hung", call, in.settings.CallTimeout, hungAfter, in.settings.PingInterval)
	case failed != nil:
		err = fmt.Errorf("%s: %w", call, failed)
		return fmt.Errorf("%s: %w", in.launcher.describe, err)
	default:
		err = fmt.Errorf("%s: %w", call, err)
	}
	in.fail(p, err)
	return fmt.Errorf("%s: %w", in.launcher.describe, err)
}
