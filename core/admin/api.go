package admin

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/tap"
)

// Node is one component of the pipeline, as /api/pipeline reports it.
type Node struct {
	Name      string `json:"name"`
	Kind      string `json:"kind"`
	Type      string `json:"type,omitempty"`
	Plugin    string `json:"plugin,omitempty"`
	Isolation string `json:"isolation"`
	// Disabled is set for a component written with enabled: false (or in a pipeline with
	// enabled: false at the top): it is in the file, checked, and not running.
	Disabled bool `json:"disabled,omitempty"`
}

// Graph is the pipeline in stages: sources, each enricher, sinks. Every node of a stage
// feeds every node of the next.
type Graph struct {
	Stages [][]Node `json:"stages"`
}

// GraphOf lays doc out as stages; defaultIsolation is what a built-in without isolation:
// gets.
func GraphOf(doc *config.Document, defaultIsolation string) Graph {
	node := func(c config.Component) Node {
		iso := c.Isolation
		if iso == "" {
			iso = defaultIsolation
		}
		if c.Plugin != "" {
			iso = "process"
		}
		return Node{Name: c.Name, Kind: string(c.Kind), Type: c.Type, Plugin: c.Plugin, Isolation: iso, Disabled: !c.Enabled || !doc.Enabled}
	}
	var g Graph
	var st []Node
	for _, c := range doc.Sources {
		st = append(st, node(c))
	}
	g.Stages = append(g.Stages, st)
	for _, c := range doc.Enrichers {
		g.Stages = append(g.Stages, []Node{node(c)})
	}
	st = nil
	for _, c := range doc.Sinks {
		st = append(st, node(c))
	}
	g.Stages = append(g.Stages, st)
	return g
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	writeJSONBody(w, v)
}

func writeJSONBody(w http.ResponseWriter, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func (s *Server) servePipeline(w http.ResponseWriter, _ *http.Request) {
	out := struct {
		Graph
		TapPoints []string `json:"tap_points"`
		Fanout    string   `json:"fanout"`
		TapRing   int      `json:"tap_ring"`
	}{Graph: s.graph(), Fanout: tap.Fanout, TapPoints: []string{}}
	if s.opts.Taps != nil {
		out.TapPoints = s.opts.Taps.Names()
		out.TapRing = s.opts.Taps.RingSize()
	}
	writeJSON(w, out)
}

// ComponentStats is one component's counters in /api/components.
type ComponentStats struct {
	Name          string             `json:"name"`
	Kind          string             `json:"kind"`
	In            float64            `json:"in"`
	Out           float64            `json:"out"`
	Dropped       map[string]float64 `json:"dropped"`
	Filtered      map[string]float64 `json:"filtered"`
	Errors        map[string]float64 `json:"errors"`
	QueueEvents   *float64           `json:"queue_events,omitempty"`
	QueueBatches  *float64           `json:"queue_batches,omitempty"`
	Retries       *float64           `json:"retries,omitempty"`
	PluginUp      *float64           `json:"plugin_up,omitempty"`
	Restarts      *float64           `json:"plugin_restarts,omitempty"`
	Redelivered   *float64           `json:"plugin_redelivered,omitempty"`
	TapSubscribed int                `json:"tap_subscribers"`
}

// Stats reads every component's counters from the metric registry.
func (s *Server) Stats() ([]*ComponentStats, error) {
	byName := map[string]*ComponentStats{}
	var order []*ComponentStats
	get := func(name, kind string) *ComponentStats {
		c := byName[name]
		if c == nil {
			c = &ComponentStats{Name: name, Kind: kind, Dropped: map[string]float64{}, Filtered: map[string]float64{}, Errors: map[string]float64{}}
			byName[name] = c
			order = append(order, c)
		}
		if c.Kind == "" {
			c.Kind = kind
		}
		return c
	}
	for _, st := range s.graph().Stages {
		for _, n := range st {
			get(n.Name, n.Kind)
		}
	}
	fams, err := s.opts.Registry.Gather()
	if err != nil {
		return nil, err
	}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			var name, kind, reason string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "component":
					name = l.GetValue()
				case "kind":
					kind = l.GetValue()
				case "reason":
					reason = l.GetValue()
				}
			}
			if name == "" {
				continue
			}
			v := value(m)
			c := get(name, kind)
			switch f.GetName() {
			case "flowpipe_events_in_total":
				c.In = v
			case "flowpipe_events_out_total":
				c.Out = v
			case "flowpipe_events_dropped_total":
				c.Dropped[reason] = v
			case "flowpipe_events_filtered_total":
				c.Filtered[reason] = v
			case "flowpipe_errors_total":
				c.Errors[reason] = v
			case "flowpipe_sink_queue_events":
				c.QueueEvents = &v
			case "flowpipe_sink_queue_batches":
				c.QueueBatches = &v
			case "flowpipe_sink_retries_total":
				c.Retries = &v
			case "flowpipe_plugin_up":
				c.PluginUp = &v
			case "flowpipe_plugin_restarts_total":
				c.Restarts = &v
			case "flowpipe_plugin_redelivered_events_total":
				c.Redelivered = &v
			}
		}
	}
	if s.opts.Taps != nil {
		for _, c := range order {
			if h, ok := s.opts.Taps.Lookup(c.Name); ok {
				c.TapSubscribed = h.Subscribers()
			}
		}
	}
	return order, nil
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	return 0
}

func (s *Server) serveComponents(w http.ResponseWriter, _ *http.Request) {
	stats, err := s.Stats()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	writeJSON(w, struct {
		At         time.Time         `json:"at"`
		Components []*ComponentStats `json:"components"`
	}{time.Now().UTC(), stats})
}

// Meta is a control line of the tap stream: {"tap":{...}}. Event lines are the file sink's
// JSON (docs/schema.md).
type Meta struct {
	At        string `json:"at,omitempty"`
	Kind      string `json:"kind,omitempty"`
	Ring      *int   `json:"ring,omitempty"`
	Following bool   `json:"following,omitempty"`
	Skipped   uint64 `json:"skipped,omitempty"`
	Removed   bool   `json:"removed,omitempty"` // the last line: a reload removed the component
}

// subscriberBuffer is how many matching events a tap subscriber may have not yet taken.
const subscriberBuffer = 8192

// maxStreams bounds the tap and top streams served at once: each holds a subscriber buffer.
const maxStreams = 64

func (s *Server) hub(w http.ResponseWriter, r *http.Request) (*tap.Hub, tap.Request, bool) {
	req, err := tap.ParseRequest(r.URL.Query())
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return nil, req, false
	}
	if s.opts.Taps == nil {
		http.Error(w, "this flowpipe serves no tap points", http.StatusNotFound)
		return nil, req, false
	}
	at := req.At
	if at == "" {
		at = tap.Fanout
	}
	h, ok := s.opts.Taps.Lookup(at)
	if !ok {
		names := slices.DeleteFunc(s.opts.Taps.Names(), func(n string) bool { return n == tap.Fanout })
		http.Error(w, "no tap point "+at+" (components: "+joinNames(names)+")", http.StatusNotFound)
		return nil, req, false
	}
	return h, req, true
}

func joinNames(ns []string) string {
	out := ""
	for i, n := range ns {
		if i > 0 {
			out += ", "
		}
		out += n
	}
	return out
}

func (s *Server) serveTap(w http.ResponseWriter, r *http.Request) {
	if s.streams.Add(1) > maxStreams {
		s.streams.Add(-1)
		http.Error(w, fmt.Sprintf("%d tap and top streams are open already; close one", maxStreams), http.StatusServiceUnavailable)
		return
	}
	defer s.streams.Add(-1)
	h, req, ok := s.hub(w, r)
	if !ok {
		return
	}
	backlog := req.Last > 0 || !req.Since.IsZero()
	follow := req.Follow || !backlog
	since := flow.TimeOf(req.Since)
	var sub *tap.Sub
	var recs []tap.Record
	if follow {
		sub, recs = h.Subscribe(req.Filter, subscriberBuffer, backlog, since, req.Last)
		defer sub.Close()
	} else {
		recs = h.Last(req.Filter, since, req.Last)
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	rc := http.NewResponseController(w)
	bw := bufio.NewWriterSize(w, 64<<10)
	var enc flow.Encoder
	var line []byte
	meta := func(m Meta) {
		b, _ := json.Marshal(struct {
			Tap Meta `json:"tap"`
		}{m})
		bw.Write(append(b, '\n'))
	}
	events := func(rs []tap.Record) {
		for i := range rs {
			line = enc.AppendJSON(line[:0], &rs[i].Event)
			bw.Write(append(line, '\n'))
		}
	}
	ring := s.opts.Taps.RingSize()
	meta(Meta{At: h.Name(), Kind: h.Kind(), Ring: &ring})
	events(recs)
	if !follow {
		bw.Flush()
		return
	}
	meta(Meta{Following: true})
	ctx := r.Context()
	for {
		if err := bw.Flush(); err != nil {
			return
		}
		_ = rc.Flush()
		recs, skipped, err := sub.Next(ctx)
		if errors.Is(err, tap.ErrRemoved) {
			meta(Meta{Removed: true})
			bw.Flush()
			return
		}
		if err != nil {
			return
		}
		events(recs)
		if skipped > 0 {
			meta(Meta{Skipped: skipped})
		}
	}
}

// topInterval is how often /api/top sends a snapshot.
const topInterval = time.Second

func (s *Server) serveTop(w http.ResponseWriter, r *http.Request) {
	if s.streams.Add(1) > maxStreams {
		s.streams.Add(-1)
		http.Error(w, fmt.Sprintf("%d tap and top streams are open already; close one", maxStreams), http.StatusServiceUnavailable)
		return
	}
	defer s.streams.Add(-1)
	h, req, ok := s.hub(w, r)
	if !ok {
		return
	}
	top := tap.NewTop(req.By, req.Window)
	since := flow.TimeOf(time.Now().Add(-req.Window))
	if req.Once {
		for _, rec := range h.Last(req.Filter, since, 0) {
			top.Add(rec.Seen, &rec.Event)
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(top.Snapshot(time.Now(), req.N))
		return
	}
	sub, recs := h.Subscribe(req.Filter, subscriberBuffer, true, since, 0)
	defer sub.Close()
	for i := range recs {
		top.Add(recs[i].Seen, &recs[i].Event)
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	ctx := r.Context()
	tick := time.NewTicker(topInterval)
	defer tick.Stop()
	var skipped uint64
	type taken struct {
		recs    []tap.Record
		skipped uint64
	}
	records := make(chan taken)
	next := make(chan struct{}, 1)
	// One goroutine takes records, so that a quiet tap point does not hold up the ticks.
	go func() {
		defer close(records)
		for {
			recs, sk, err := sub.Next(ctx)
			if err != nil {
				return
			}
			select {
			case records <- taken{recs, sk}:
			case <-ctx.Done():
				return
			}
			select {
			case <-next:
			case <-ctx.Done():
				return
			}
		}
	}()
	send := func() bool {
		snap := top.Snapshot(time.Now(), req.N)
		snap.Skipped = skipped
		if enc.Encode(snap) != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if !send() {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case t, ok := <-records:
			if !ok {
				return
			}
			for i := range t.recs {
				top.Add(t.recs[i].Seen, &t.recs[i].Event)
			}
			skipped += t.skipped
			next <- struct{}{}
		case <-tick.C:
			if !send() {
				return
			}
		}
	}
}
