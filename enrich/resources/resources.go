// Package resources is the `type: resources` enricher: it answers which rule let a flow
// through and which resource is at each end, and drops the noise an operator asks to drop
// (DNS flows, exit-node flows).
//
// Resource IDs come from a longest-prefix match over resources and routes (bart, a multibit
// trie with constant-time lookups), skipping addresses inside the overlay, which are peers.
// The tables can live in a file that a management server rewrites; it is watched and swapped
// atomically, so Enrich never sees half a table and never stops.
package resources

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Config is the options of `type: resources`.
type Config struct {
	Tables `yaml:",inline"`
	// TablesFile holds the tables instead of the options (YAML or JSON with the keys overlay,
	// resources, routes, rules); it is re-read when it changes.
	TablesFile string `yaml:"tables_file"`
	// ReloadInterval is how often tables_file is checked for changes.
	ReloadInterval time.Duration `yaml:"reload_interval"`
	// DNSCollection false drops DNS flows: UDP or TCP to port 53 or to any of DNSPorts.
	DNSCollection bool     `yaml:"dns_collection"`
	DNSPorts      []uint16 `yaml:"dns_ports"`
	// ExitNodeCollection false drops flows whose source or destination is best matched by an
	// exit-node route.
	ExitNodeCollection bool `yaml:"exit_node_collection"`
}

// DefaultConfig collects everything and checks tables_file every two seconds.
func DefaultConfig() *Config {
	return &Config{ReloadInterval: 2 * time.Second, DNSCollection: true, ExitNodeCollection: true}
}

// Validate reports every problem in the options, each at its key path.
func (c *Config) Validate() error {
	_, errs := compile(&c.Tables, "")
	if c.TablesFile != "" && !c.Tables.empty() {
		errs.Add("tables_file", "set the tables either inline (overlay, resources, routes, rules) or in tables_file, not both")
	}
	if c.ReloadInterval <= 0 {
		errs.Add("reload_interval", "must be positive, such as \"2s\"")
	}
	for i, p := range c.DNSPorts {
		if p == 0 {
			errs.Add(fmt.Sprintf("dns_ports[%d]", i), "invalid port 0: want 1-65535")
		}
	}
	return errs.Err()
}

// Factory is the `type: resources` enricher factory.
func Factory() component.Factory {
	f := component.NewEnricherFactory("resources",
		"rule IDs, resource IDs (longest prefix match), DNS and exit-node filtering",
		DefaultConfig, New)
	f.Reasons.Filtered = []string{"dns", "exit_node"}
	return f
}

// Enricher is the resources enricher. Enrich is safe for concurrent use; the tables it reads
// are replaced as a whole by a reload.
type Enricher struct {
	env      component.Env
	log      *slog.Logger
	tables   atomic.Pointer[compiled]
	dnsPorts [1024]uint64 // bitset of destination ports that make a UDP/TCP flow DNS
	dropDNS  bool
	dropExit bool

	file     *tableFile // nil without tables_file
	interval time.Duration
	reloads  *prometheus.CounterVec
	loaded   prometheus.Gauge

	stop chan struct{}
	done sync.WaitGroup
	once sync.Once
}

// New builds the enricher; with tables_file it reads the file now (an unreadable or invalid
// file is an error), and Start watches it until Close.
func New(env component.Env, c *Config) (component.Enricher, error) {
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	if env.Metrics == nil {
		env.Metrics = component.NopMetrics{}
	}
	e := &Enricher{
		env:      env,
		log:      env.Logger,
		dropDNS:  !c.DNSCollection,
		dropExit: !c.ExitNodeCollection,
		stop:     make(chan struct{}),
	}
	e.setDNSPort(53)
	for _, p := range c.DNSPorts {
		e.setDNSPort(p)
	}
	if err := e.registerMetrics(); err != nil {
		return nil, err
	}
	if c.TablesFile == "" {
		t, errs := compile(&c.Tables, "")
		if len(errs) > 0 {
			return nil, errs
		}
		e.tables.Store(t)
		e.markLoaded()
		return e, nil
	}
	e.file = &tableFile{path: env.Path(c.TablesFile)}
	t, _, err := e.file.load(true)
	if err != nil {
		var ps config.Problems
		if errors.As(err, &ps) {
			return nil, ps // positioned in the tables file
		}
		return nil, config.FieldErrors{{Path: "tables_file", Msg: err.Error()}}
	}
	e.tables.Store(t)
	e.markLoaded()
	e.interval = c.ReloadInterval
	return e, nil
}

// Start watches tables_file (building the enricher only reads it, so that `flowpipe
// validate` checks the file without starting anything).
func (e *Enricher) Start(context.Context) error {
	if e.file == nil {
		return nil
	}
	t := e.tables.Load()
	e.log.Info("resource tables loaded; watching for changes", "file", e.file.path, "prefixes", t.prefixes, "resources", len(t.resourceIDs), "rules", len(t.rules))
	e.done.Add(1)
	go e.watch(e.interval)
	return nil
}

func (e *Enricher) registerMetrics() error {
	e.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "flowpipe_resources_table_reloads_total",
		Help: "Reloads of the resources enricher's tables_file, by result (ok, error).",
	}, []string{"result"})
	e.loaded = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "flowpipe_resources_table_loaded_timestamp_seconds",
		Help: "When the tables in force were loaded (Unix seconds).",
	})
	return e.env.Register(e.reloads, e.loaded)
}

func (e *Enricher) markLoaded() { e.loaded.Set(float64(time.Now().UnixNano()) / 1e9) }

func (e *Enricher) setDNSPort(p uint16) { e.dnsPorts[p>>6] |= 1 << (p & 63) }

func (e *Enricher) isDNS(ev *flow.Event) bool {
	return (ev.Protocol == flow.ProtoUDP || ev.Protocol == flow.ProtoTCP) &&
		e.dnsPorts[ev.DstPort>>6]&(1<<(ev.DstPort&63)) != 0
}

// Enrich sets src_resource_id, dst_resource_id and rule_id where the source left them empty,
// and removes the flows the filters drop, counting them by reason ("dns", "exit_node").
func (e *Enricher) Enrich(_ context.Context, b *flow.Batch) error {
	t := e.tables.Load() // one table for the whole batch, even if a reload lands meanwhile
	evs := b.Events
	kept, dns, exit := 0, 0, 0
	for i := range evs {
		ev := &evs[i]
		if e.dropDNS && e.isDNS(ev) {
			dns++
			continue
		}
		srcRes, srcExit := t.lookup(ev.SrcAddr)
		dstRes, dstExit := t.lookup(ev.DstAddr)
		if e.dropExit && (srcExit || dstExit) {
			exit++
			continue
		}
		if ev.SrcResourceID == "" {
			ev.SrcResourceID = srcRes
		}
		if ev.DstResourceID == "" {
			ev.DstResourceID = dstRes
		}
		if ev.RuleID == "" {
			ev.RuleID = t.ruleFor(ev)
		}
		if kept != i {
			evs[kept] = *ev
		}
		kept++
	}
	if kept != len(evs) {
		clear(evs[kept:]) // let the dropped events' strings be collected
		b.Events = evs[:kept]
	}
	if dns > 0 {
		e.env.Metrics.Filtered("dns", dns)
	}
	if exit > 0 {
		e.env.Metrics.Filtered("exit_node", exit)
	}
	return nil
}

// Reload re-reads tables_file now, whether or not it changed, and swaps the tables in if the
// file is valid. Without tables_file it does nothing.
func (e *Enricher) Reload() error {
	if e.file == nil {
		return nil
	}
	return e.reload(true)
}

func (e *Enricher) reload(force bool) error {
	t, changed, err := e.file.load(force)
	if err != nil {
		e.reloads.WithLabelValues("error").Inc()
		e.env.Metrics.Errors("tables_reload", 1)
		e.log.Error("resource tables NOT reloaded; the previous tables stay in force", "file", e.file.path, "error", err)
		return err
	}
	if !changed {
		return nil
	}
	e.tables.Store(t)
	e.reloads.WithLabelValues("ok").Inc()
	e.markLoaded()
	e.log.Info("resource tables reloaded", "file", e.file.path, "prefixes", t.prefixes, "resources", len(t.resourceIDs), "rules", len(t.rules))
	return nil
}

// watch polls the file's metadata: polling by path (rather than an inotify watch on the
// inode) keeps working when an editor or a management agent replaces the file by renaming a
// new one over it, and when the directory is a bind mount or a ConfigMap volume.
func (e *Enricher) watch(every time.Duration) {
	defer e.done.Done()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-e.stop:
			return
		case <-tick.C:
			_ = e.reload(false)
		}
	}
}

// Close stops watching tables_file.
func (e *Enricher) Close(context.Context) error {
	e.once.Do(func() { close(e.stop) })
	e.done.Wait()
	return nil
}

var (
	_ component.Starter = (*Enricher)(nil)
	_ component.Closer  = (*Enricher)(nil)
)
