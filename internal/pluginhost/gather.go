package pluginhost

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"

	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// remoteMetrics exposes the metrics a component registered inside its plugin process as if
// it ran in process: at each scrape it asks the current process (Gather) and turns the
// families into constant metrics. The host's Registerer adds the component and kind labels.
// It is an unchecked collector: what a plugin registers is known only to the plugin.
type remoteMetrics struct {
	in *instance
}

func (m remoteMetrics) Describe(chan<- *prometheus.Desc) {}

func (m remoteMetrics) Collect(ch chan<- prometheus.Metric) {
	m.in.mu.Lock()
	p := m.in.cur
	m.in.mu.Unlock()
	if p == nil {
		return // restarting: its metrics come back with it
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := p.comp.Gather(ctx, &pb.GatherRequest{})
	if err != nil {
		m.in.env.Logger.Debug("gather plugin metrics", "error", err)
		return
	}
	for _, raw := range resp.MetricFamilies {
		var mf dto.MetricFamily
		if proto.Unmarshal(raw, &mf) != nil {
			continue
		}
		for _, metric := range mf.Metric {
			if c, err := constMetric(&mf, metric); err == nil {
				ch <- c
			}
		}
	}
}

func constMetric(mf *dto.MetricFamily, m *dto.Metric) (prometheus.Metric, error) {
	names := make([]string, 0, len(m.Label))
	values := make([]string, 0, len(m.Label))
	for _, l := range m.Label {
		names = append(names, l.GetName())
		values = append(values, l.GetValue())
	}
	desc := prometheus.NewDesc(mf.GetName(), mf.GetHelp(), names, nil)
	switch mf.GetType() {
	case dto.MetricType_COUNTER:
		return prometheus.NewConstMetric(desc, prometheus.CounterValue, m.GetCounter().GetValue(), values...)
	case dto.MetricType_GAUGE:
		return prometheus.NewConstMetric(desc, prometheus.GaugeValue, m.GetGauge().GetValue(), values...)
	case dto.MetricType_HISTOGRAM:
		h := m.GetHistogram()
		buckets := map[float64]uint64{}
		for _, b := range h.GetBucket() {
			buckets[b.GetUpperBound()] = b.GetCumulativeCount()
		}
		return prometheus.NewConstHistogram(desc, h.GetSampleCount(), h.GetSampleSum(), buckets, values...)
	case dto.MetricType_SUMMARY:
		s := m.GetSummary()
		q := map[float64]float64{}
		for _, v := range s.GetQuantile() {
			q[v.GetQuantile()] = v.GetValue()
		}
		return prometheus.NewConstSummary(desc, s.GetSampleCount(), s.GetSampleSum(), q, values...)
	}
	return prometheus.NewConstMetric(desc, prometheus.UntypedValue, m.GetUntyped().GetValue(), values...)
}
