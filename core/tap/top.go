package tap

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
)

// GroupKeys are the keys `flowpipe top --by` accepts.
var GroupKeys = []string{"src", "dst", "sport", "dport", "proto", "rule", "resource", "src-resource", "dst-resource", "type", "direction", "source"}

// ParseGroupBy parses a comma-separated --by list.
func ParseGroupBy(s string) ([]string, error) {
	var by []string
	for _, k := range strings.Split(s, ",") {
		k = strings.TrimSpace(k)
		if k == "" {
			continue
		}
		if !slices.Contains(GroupKeys, k) {
			return nil, fmt.Errorf("--by %s: unknown key (keys: %s)", k, strings.Join(GroupKeys, ", "))
		}
		by = append(by, k)
	}
	if len(by) == 0 {
		return nil, fmt.Errorf("--by: name at least one key (keys: %s)", strings.Join(GroupKeys, ", "))
	}
	return by, nil
}

func keyValue(k string, e *flow.Event) string {
	switch k {
	case "src":
		return e.SrcAddr.String()
	case "dst":
		return e.DstAddr.String()
	case "sport":
		if flow.IsICMP(e.Protocol) {
			return "-"
		}
		return strconv.Itoa(int(e.SrcPort))
	case "dport":
		if flow.IsICMP(e.Protocol) {
			return "-"
		}
		return strconv.Itoa(int(e.DstPort))
	case "proto":
		return ProtoName(e.Protocol)
	case "rule":
		return e.RuleID
	case "resource":
		return e.SrcResourceID + " → " + e.DstResourceID
	case "src-resource":
		return e.SrcResourceID
	case "dst-resource":
		return e.DstResourceID
	case "type":
		return e.Type.String()
	case "direction":
		return e.Direction.String()
	case "source":
		return e.Source
	}
	return ""
}

// Stat is the totals of one group (or of everything).
type Stat struct {
	Flows   uint64 `json:"flows"` // flow events (records)
	Bytes   uint64 `json:"bytes"` // rx + tx
	Packets uint64 `json:"packets"`
}

func (s *Stat) add(e *flow.Event) {
	s.Flows++
	s.Bytes += e.RxBytes + e.TxBytes
	s.Packets += e.RxPackets + e.TxPackets
}

func (s *Stat) merge(o *Stat) {
	s.Flows += o.Flows
	s.Bytes += o.Bytes
	s.Packets += o.Packets
}

// Row is one group of a snapshot.
type Row struct {
	Key []string `json:"key"` // one value per By key
	Stat
}

// Snapshot is the top talkers over a window.
type Snapshot struct {
	At      time.Time `json:"at"`
	Window  string    `json:"window"`
	By      []string  `json:"by"`
	Total   Stat      `json:"total"`
	Groups  int       `json:"groups"`
	ByBytes []Row     `json:"by_bytes"`
	ByFlows []Row     `json:"by_flows"`
	Skipped uint64    `json:"skipped"` // matching events the aggregation could not take
}

// maxGroups bounds the groups of one second; more events are counted under OtherKey.
const maxGroups = 100_000

// OtherKey is the group of events beyond maxGroups distinct groups in one second.
const OtherKey = "(other)"

// Top aggregates events into per-second buckets and reports the groups with the most bytes
// and the most flows over a sliding window. It is not safe for concurrent use.
type Top struct {
	by      []string
	window  time.Duration
	buckets map[int64]map[string]*Stat
	sb      strings.Builder
}

// NewTop makes an aggregation grouped by the keys of by over window.
func NewTop(by []string, window time.Duration) *Top {
	if window < time.Second {
		window = time.Second
	}
	return &Top{by: by, window: window, buckets: map[int64]map[string]*Stat{}}
}

// Add counts e, seen at seen.
func (t *Top) Add(seen flow.Time, e *flow.Event) {
	sec := int64(seen) / int64(time.Second)
	b := t.buckets[sec]
	if b == nil {
		b = map[string]*Stat{}
		t.buckets[sec] = b
	}
	t.sb.Reset()
	for i, k := range t.by {
		if i > 0 {
			t.sb.WriteByte(0)
		}
		t.sb.WriteString(keyValue(k, e))
	}
	key := t.sb.String()
	s := b[key]
	if s == nil {
		if len(b) >= maxGroups {
			key = OtherKey
			s = b[key]
		}
		if s == nil {
			s = &Stat{}
			b[key] = s
		}
	}
	s.add(e)
}

// Snapshot evicts what is older than the window before now and returns the n largest groups
// by bytes and by flows (ties broken by key).
func (t *Top) Snapshot(now time.Time, n int) Snapshot {
	oldest := now.Add(-t.window).Unix()
	merged := map[string]*Stat{}
	snap := Snapshot{At: now.UTC(), Window: t.window.String(), By: t.by}
	for sec, b := range t.buckets {
		if sec <= oldest {
			delete(t.buckets, sec)
			continue
		}
		for k, s := range b {
			m := merged[k]
			if m == nil {
				m = &Stat{}
				merged[k] = m
			}
			m.merge(s)
			snap.Total.merge(s)
		}
	}
	rows := make([]Row, 0, len(merged))
	for k, s := range merged {
		key := strings.Split(k, "\x00")
		if k == OtherKey {
			key = []string{OtherKey}
		}
		rows = append(rows, Row{Key: key, Stat: *s})
	}
	snap.Groups = len(rows)
	byKey := func(a, b Row) int { return slices.Compare(a.Key, b.Key) }
	slices.SortFunc(rows, func(a, b Row) int {
		return cmp.Or(cmp.Compare(b.Bytes, a.Bytes), cmp.Compare(b.Flows, a.Flows), byKey(a, b))
	})
	snap.ByBytes = slices.Clone(rows[:min(n, len(rows))])
	slices.SortFunc(rows, func(a, b Row) int {
		return cmp.Or(cmp.Compare(b.Flows, a.Flows), cmp.Compare(b.Bytes, a.Bytes), byKey(a, b))
	})
	snap.ByFlows = slices.Clone(rows[:min(n, len(rows))])
	return snap
}
