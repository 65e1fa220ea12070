package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/admin"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/pipeline"
	"github.com/flowpipe/flowpipe/internal/sdnotify"
)

// The results flowpipe_config_reloads_total counts.
const (
	reloadApplied  = "applied"  // the new file runs
	reloadRejected = "rejected" // the new file has problems (or changes a start-only setting): nothing changed
	reloadFailed   = "failed"   // the new file was valid, but applying it failed
)

// reloader applies the pipeline file again while flowpipe runs, whoever asks: SIGHUP, the
// file watcher (run --watch) and POST /-/reload on the admin listener all go through
// reload, one at a time. The new file is loaded and checked exactly as at start (the same
// loader, the same environment overrides); if anything is wrong nothing changes, and the
// problems are logged as `flowpipe validate` prints them.
type reloader struct {
	g   *globalFlags
	p   *pipeline.Pipeline
	log *slog.Logger
	ctx context.Context // the run's: cancelled when flowpipe begins to stop

	mu      sync.Mutex // held for a whole reload: reloads are serialised
	doc     *config.Document
	stopped bool // the pipeline's Run returned: no more reloads

	reloads     *prometheus.CounterVec
	lastSuccess prometheus.Gauge
	lastOK      prometheus.Gauge

	requests chan string // SIGHUP and --watch; one waiting request stands for any number
}

// newReloader registers the reload metrics in the pipeline's registry; the file loaded at
// start counts as the last successful load. requests (buffered) carries the asynchronous
// requests, SIGHUP and --watch.
func newReloader(ctx context.Context, g *globalFlags, doc *config.Document, p *pipeline.Pipeline, log *slog.Logger, requests chan string) *reloader {
	r := &reloader{g: g, p: p, log: log, ctx: ctx, doc: doc, requests: requests,
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "flowpipe_config_reloads_total",
			Help: "Reloads of the pipeline file, by result: applied, rejected (the new file has problems; nothing changed) or failed (applying it failed).",
		}, []string{"result"}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "flowpipe_config_last_reload_success_timestamp_seconds",
			Help: "When the running pipeline file was last loaded successfully (at start, or by a reload that was applied), in seconds since the epoch.",
		}),
		lastOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "flowpipe_config_last_reload_successful",
			Help: "1 if the last reload of the pipeline file was applied (or none was asked for since start), 0 if it was rejected or failed.",
		}),
	}
	for _, res := range []string{reloadApplied, reloadRejected, reloadFailed} {
		r.reloads.WithLabelValues(res)
	}
	r.lastSuccess.SetToCurrentTime()
	r.lastOK.Set(1)
	reg := p.Metrics().Registry
	for _, c := range []prometheus.Collector{r.reloads, r.lastSuccess, r.lastOK} {
		if err := reg.Register(c); err != nil {
			log.Warn("reload metrics not registered", "error", err)
		}
	}
	return r
}

// request asks the loop for a reload (SIGHUP, --watch). A request made while another waits
// is the same request: the file is read when the reload runs.
func (r *reloader) request(via string) {
	select {
	case r.requests <- via:
	default:
	}
}

// loop runs the requested reloads once the pipeline runs, until flowpipe stops.
func (r *reloader) loop() {
	select {
	case <-r.p.Running():
	case <-r.ctx.Done():
		return
	}
	for {
		select {
		case <-r.ctx.Done():
			return
		case via := <-r.requests:
			_, _ = r.reload(via)
		}
	}
}

// serveHTTP is admin.Options.Reload: POST /-/reload.
func (r *reloader) serveHTTP(context.Context) (any, error) {
	rep, err := r.reload("admin")
	switch {
	case rep == nil:
		return nil, err
	case err != nil:
		return reportJSON(rep, reloadFailed), err
	}
	return reportJSON(rep, reloadApplied), nil
}

// stop is called when the pipeline's Run returned: a reload in progress finishes first.
func (r *reloader) stop() {
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
}

// reload loads the pipeline file and applies it. The error is config.Problems when the new
// file is rejected (nothing changed), wraps admin.ErrReloadUnavailable when no reload can
// run now, and is anything else when applying the new file failed.
func (r *reloader) reload(via string) (*pipeline.ReloadReport, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	select {
	case <-r.p.Running():
	default:
		return nil, fmt.Errorf("%w: the pipeline is still starting", admin.ErrReloadUnavailable)
	}
	if r.stopped || r.ctx.Err() != nil {
		return nil, fmt.Errorf("%w: flowpipe is stopping", admin.ErrReloadUnavailable)
	}
	file := r.g.config
	began := time.Now()
	r.log.Info("reloading the pipeline file", "file", file, "via", via)
	r.notify(sdnotify.Reloading, sdnotify.MonotonicUsec(), "STATUS=reloading "+file)
	defer func() {
		// systemd (Type=notify-reload) waits for READY=1 after RELOADING=1, whatever the
		// result; a flowpipe that began to stop meanwhile has said STOPPING=1 instead.
		if r.ctx.Err() == nil {
			r.notify(sdnotify.Ready, "STATUS=pipeline running")
		}
	}()

	doc, err := r.load()
	if err == nil {
		if probs := startOnlyChanges(r.doc, doc); len(probs) > 0 {
			err = probs
		}
	}
	var rep *pipeline.ReloadReport
	if err == nil {
		rep, err = r.p.Reload(r.ctx, doc)
	}
	var probs config.Problems
	switch {
	case err == nil:
	case errors.As(err, &probs):
		for _, p := range probs {
			r.log.Error(p.String(), "reload", reloadRejected)
		}
		r.log.Error(fmt.Sprintf("reload rejected: %d problem(s) found; nothing changed, the pipeline runs on as before", len(probs)),
			"file", file, "via", via, "problems", len(probs))
		r.count(reloadRejected)
		return nil, probs
	default:
		r.log.Error("reload failed: the new pipeline file is valid, but applying it failed", "file", file, "via", via, "error", err)
		r.count(reloadFailed)
		return nil, err
	}
	// The pipeline logged the reload as a diff (a line per component started, stopped or
	// changed, and "reload applied"); it runs doc now.
	r.doc = doc
	if len(rep.Errors) > 0 {
		// Applied, but not all of it: a new source did not start, a component kept its old
		// options. The pipeline logged each; the file does not say what runs.
		r.log.Error(fmt.Sprintf("reload failed in part: %d change(s) could not be applied; see the lines above", len(rep.Errors)),
			"file", file, "via", via, "took", time.Since(began))
		r.count(reloadFailed)
		return rep, errPartialReload{rep.Errors}
	}
	r.count(reloadApplied)
	r.lastSuccess.SetToCurrentTime()
	return rep, nil
}

// errPartialReload is a reload that was applied, but not all of it (ReloadReport.Errors).
type errPartialReload struct{ errs []string }

func (e errPartialReload) Error() string {
	return "the reload was applied in part: " + strings.Join(e.errs, "; ")
}

func (r *reloader) count(result string) {
	r.reloads.WithLabelValues(result).Inc()
	if result == reloadApplied {
		r.lastOK.Set(1)
	} else {
		r.lastOK.Set(0)
	}
}

func (r *reloader) notify(states ...string) {
	if _, err := sdnotify.Notify(states...); err != nil {
		r.log.Warn("cannot notify systemd", "error", err)
	}
}

// load loads the pipeline file as run does at start. When the document itself has problems
// its components are built (and closed) too, as validate does, so that every problem is
// reported at once; an unreadable file is one problem.
func (r *reloader) load() (*config.Document, error) {
	doc, err := r.g.loadConfig()
	if err == nil {
		return doc, nil
	}
	var probs config.Problems
	if doc == nil || !errors.As(err, &probs) {
		return nil, config.Problems{{Msg: err.Error()}}
	}
	return nil, withComponentProblems(r.ctx, doc, probs, pipelineOptions(r.log))
}

// startOnlyChanges reports the settings that take effect only when flowpipe starts and that
// the new file changes: the admin listener (it serves the reload), and data_dir (where every
// component's state lives). A reload that changes one is rejected as a whole: applying the
// rest would leave a file that does not say what runs.
func startOnlyChanges(old, doc *config.Document) config.Problems {
	const why = "takes effect only when flowpipe starts: restart flowpipe to apply it, or put the old value back to reload the rest"
	var probs config.Problems
	ov, nv := reflect.ValueOf(old.Admin), reflect.ValueOf(doc.Admin)
	for i := range ov.NumField() {
		f := ov.Type().Field(i)
		if reflect.DeepEqual(ov.Field(i).Interface(), nv.Field(i).Interface()) {
			continue
		}
		key := "admin." + strings.Split(f.Tag.Get("yaml"), ",")[0]
		if f.Name == "Token" { // a secret: not in the log
			probs = append(probs, doc.Problem(key, "changed; %s", why))
			continue
		}
		probs = append(probs, doc.Problem(key, "changed from %#v to %#v; %s", ov.Field(i).Interface(), nv.Field(i).Interface(), why))
	}
	if old.DataDir != doc.DataDir {
		probs = append(probs, doc.Problem("data_dir", "changed from %q to %q; %s", old.DataDir, doc.DataDir, why))
	}
	probs.Sort()
	return probs
}

// reloadAnswer is the body of POST /-/reload's 200 answer (docs/observe.md).
type reloadAnswer struct {
	Result      string           `json:"result"`
	Started     []string         `json:"started"`
	Stopped     []string         `json:"stopped"`
	Changed     []changeAnswer   `json:"changed"`
	Kept        []string         `json:"kept"`
	HandedOver  map[string]int64 `json:"handed_over"`
	Delivered   map[string]int64 `json:"delivered"`
	Undelivered map[string]int64 `json:"undelivered"`
	Errors      []string         `json:"errors"`
}

type changeAnswer struct {
	Component string   `json:"component"`
	Keys      []string `json:"keys"`
	How       string   `json:"how"`
}

func reportJSON(rep *pipeline.ReloadReport, result string) reloadAnswer {
	if rep == nil {
		rep = &pipeline.ReloadReport{}
	}
	list := func(s []string) []string {
		if s == nil {
			return []string{}
		}
		return slices.Clone(s)
	}
	counts := func(m map[string]int64) map[string]int64 {
		if m == nil {
			return map[string]int64{}
		}
		return m
	}
	a := reloadAnswer{Result: result, Started: list(rep.Started), Stopped: list(rep.Stopped), Kept: list(rep.Kept), Errors: list(rep.Errors),
		Changed: []changeAnswer{}, HandedOver: counts(rep.HandedOver), Delivered: counts(rep.Delivered), Undelivered: counts(rep.Undelivered)}
	for _, c := range rep.Changed {
		a.Changed = append(a.Changed, changeAnswer{Component: c.Component, Keys: list(c.Keys), How: c.How})
	}
	return a
}
