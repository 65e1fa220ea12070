// Package metrics holds flowpipe's Prometheus metrics: the families every component shares
// (events in, out, dropped and filtered by reason, errors, retries, queue depth, batch
// acknowledgement latency) and a per-component view with its labels resolved once, so that
// the hot path costs one atomic add per batch.
package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Set is one pipeline's metrics, registered in one Prometheus registry.
type Set struct {
	Registry *prometheus.Registry

	eventsIn   *prometheus.CounterVec
	eventsOut  *prometheus.CounterVec
	dropped    *prometheus.CounterVec
	filtered   *prometheus.CounterVec
	errors     *prometheus.CounterVec
	retries    *prometheus.CounterVec
	queueEv    *prometheus.GaugeVec
	queueBatch *prometheus.GaugeVec
	ackLatency *prometheus.HistogramVec
}

// New makes a metric set in a fresh registry that also carries the Go and process collectors.
func New() *Set {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	labels := []string{"component", "kind"}
	s := &Set{
		Registry: reg,
		eventsIn: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "flowpipe_events_in_total", Help: "Events received by a component.",
		}, labels),
		eventsOut: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "flowpipe_events_out_total", Help: "Events a component passed on (sources: emitted; enrichers: kept; sinks: written durably).",
		}, labels),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "flowpipe_events_dropped_total", Help: "Events lost, by component and reason.",
		}, append(labels, "reason")),
		filtered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "flowpipe_events_filtered_total", Help: "Events removed on purpose by an enricher's filter, by reason.",
		}, append(labels, "reason")),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "flowpipe_errors_total", Help: "Failed operations, by component and reason.",
		}, append(labels, "reason")),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "flowpipe_sink_retries_total", Help: "Batch writes a sink retried after a failure.",
		}, []string{"component"}),
		queueEv: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "flowpipe_sink_queue_events", Help: "Events waiting in a sink's queue.",
		}, []string{"component"}),
		queueBatch: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "flowpipe_sink_queue_batches", Help: "Batches waiting in a sink's queue.",
		}, []string{"component"}),
		ackLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "flowpipe_batch_ack_seconds",
			Help:    "Time from a source emitting a batch to its acknowledgement.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18),
		}, []string{"component"}),
	}
	reg.MustRegister(s.eventsIn, s.eventsOut, s.dropped, s.filtered, s.errors, s.retries, s.queueEv, s.queueBatch, s.ackLatency)
	return s
}

// Component is the metrics of one named component. Its methods are safe for concurrent use.
type Component struct {
	set        *Set
	name, kind string

	In, Out  prometheus.Counter
	Retries  prometheus.Counter
	QueueEv  prometheus.Gauge
	QueueBat prometheus.Gauge
	AckLat   prometheus.Observer

	mu       sync.Mutex
	dropped  map[string]prometheus.Counter
	filtered map[string]prometheus.Counter
	errs     map[string]prometheus.Counter
}

// Component returns the metrics of a component; kind is "source", "enricher" or "sink".
func (s *Set) Component(name, kind string) *Component {
	c := &Component{
		set: s, name: name, kind: kind,
		In:       s.eventsIn.WithLabelValues(name, kind),
		Out:      s.eventsOut.WithLabelValues(name, kind),
		dropped:  map[string]prometheus.Counter{},
		filtered: map[string]prometheus.Counter{},
		errs:     map[string]prometheus.Counter{},
	}
	if kind == "sink" {
		c.Retries = s.retries.WithLabelValues(name)
		c.QueueEv = s.queueEv.WithLabelValues(name)
		c.QueueBat = s.queueBatch.WithLabelValues(name)
	}
	if kind == "source" {
		c.AckLat = s.ackLatency.WithLabelValues(name)
	}
	return c
}

func (c *Component) counter(m map[string]prometheus.Counter, vec *prometheus.CounterVec, reason string) prometheus.Counter {
	c.mu.Lock()
	defer c.mu.Unlock()
	ctr, ok := m[reason]
	if !ok {
		ctr = vec.WithLabelValues(c.name, c.kind, reason)
		m[reason] = ctr
	}
	return ctr
}

// Dropped counts n events lost for reason.
func (c *Component) Dropped(reason string, n int) {
	c.counter(c.dropped, c.set.dropped, reason).Add(float64(n))
}

// Filtered counts n events removed on purpose for reason.
func (c *Component) Filtered(reason string, n int) {
	c.counter(c.filtered, c.set.filtered, reason).Add(float64(n))
}

// Errors counts n failed operations for reason.
func (c *Component) Errors(reason string, n int) {
	c.counter(c.errs, c.set.errors, reason).Add(float64(n))
}

// Registerer registers component-specific metrics with the labels component and kind added.
func (c *Component) Registerer() prometheus.Registerer {
	return prometheus.WrapRegistererWith(prometheus.Labels{"component": c.name, "kind": c.kind}, c.set.Registry)
}

// DropCounter is the counter of events dropped for reason.
func (c *Component) DropCounter(reason string) prometheus.Counter {
	return c.counter(c.dropped, c.set.dropped, reason)
}

// FilterCounter is the counter of events filtered for reason.
func (c *Component) FilterCounter(reason string) prometheus.Counter {
	return c.counter(c.filtered, c.set.filtered, reason)
}

// Publish makes the counters of these reasons exist at 0 before their first event, so that
// an alert on, say, flowpipe_events_dropped_total{reason="queue_full"} can be written ahead of
// time. The runtime publishes every reason it counts for each component it builds.
func (c *Component) Publish(dropped, filtered, errors []string) {
	for _, r := range dropped {
		c.counter(c.dropped, c.set.dropped, r)
	}
	for _, r := range filtered {
		c.counter(c.filtered, c.set.filtered, r)
	}
	for _, r := range errors {
		c.counter(c.errs, c.set.errors, r)
	}
}
