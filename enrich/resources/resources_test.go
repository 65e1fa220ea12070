package resources

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// countingMetrics records what the enricher counts.
type countingMetrics struct {
	mu                       sync.Mutex
	filtered, dropped, error map[string]int
}

func newCounting() *countingMetrics {
	return &countingMetrics{filtered: map[string]int{}, dropped: map[string]int{}, error: map[string]int{}}
}

func (m *countingMetrics) Filtered(r string, n int) { m.mu.Lock(); m.filtered[r] += n; m.mu.Unlock() }
func (m *countingMetrics) Dropped(r string, n int)  { m.mu.Lock(); m.dropped[r] += n; m.mu.Unlock() }
func (m *countingMetrics) Errors(r string, n int)   { m.mu.Lock(); m.error[r] += n; m.mu.Unlock() }
func (m *countingMetrics) get(kind, r string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return map[string]map[string]int{"filtered": m.filtered, "dropped": m.dropped, "errors": m.error}[kind][r]
}

// build decodes options the way the pipeline loader does (strict decoding, then Validate)
// and builds the enricher.
func build(t *testing.T, opts map[string]any, m component.Metrics) *Enricher {
	t.Helper()
	f := Factory()
	cfg := f.NewConfig()
	if errs := config.Decode(opts, cfg, ""); len(errs) > 0 {
		t.Fatalf("decode: %v", errs)
	}
	if err := cfg.(*Config).Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	if m == nil {
		m = component.NopMetrics{}
	}
	c, err := f.New(component.Env{Name: "res", Kind: component.KindEnricher, Type: "resources", Metrics: m}, cfg)
	if err != nil {
		t.Fatalf("new: %v", err)
	}
	e := c.(*Enricher)
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	return e
}

var a = netip.MustParseAddr

var lookupTables = map[string]any{
	"overlay": []any{"100.64.0.0/10", "fd7a:115c::/32"},
	"resources": []any{
		map[string]any{"id": "web", "prefixes": []any{"10.1.0.0/16"}},
		map[string]any{"id": "db", "prefixes": []any{"10.1.2.0/24", "10.9.9.9"}},
		map[string]any{"id": "shadowed", "prefixes": []any{"100.64.5.0/24"}},
		map[string]any{"id": "lab", "prefixes": []any{"172.16.5.0/24"}},
		map[string]any{"id": "v6net", "prefixes": []any{"fd00:1::/64"}},
		map[string]any{"id": "v6host", "prefixes": []any{"fd00:1::1:0:0:0/80"}},
		map[string]any{"id": "docs", "domains": []any{"docs.example.com"}},
	},
	"routes": []any{
		map[string]any{"prefix": "0.0.0.0/0"},
		map[string]any{"prefix": "::/0"},
		map[string]any{"prefix": "192.168.0.0/16", "exit_node": true},
		map[string]any{"prefix": "172.16.0.0/12"},
	},
}

func TestLookup(t *testing.T) {
	e := build(t, lookupTables, nil)
	tb := e.tables.Load()
	for _, tc := range []struct {
		name     string
		addr     netip.Addr
		resource string
		exit     bool
	}{
		{"resource", a("10.1.5.5"), "web", false},
		{"longest prefix wins", a("10.1.2.3"), "db", false},
		{"bare address is a host prefix", a("10.9.9.9"), "db", false},
		{"next to the host prefix", a("10.9.9.8"), "", true},
		{"overlay address is a peer", a("100.64.1.1"), "", false},
		{"overlay exempts a resource inside it", a("100.64.5.7"), "", false},
		{"IPv6 overlay", a("fd7a:115c::5"), "", false},
		{"default route is an exit-node route", a("8.8.8.8"), "", true},
		{"route marked exit_node", a("192.168.1.1"), "", true},
		{"plain route is not exit node", a("172.16.1.1"), "", false},
		{"resource inside a route beats the route", a("172.16.5.5"), "lab", false},
		{"IPv6 resource", a("fd00:1::5"), "v6net", false},
		{"IPv6 longest prefix", a("fd00:1::1:0:0:5"), "v6host", false},
		{"IPv6 default route", a("2001:db8::1"), "", true},
		{"IPv4-mapped IPv6 matches IPv4 prefixes", a("::ffff:10.1.2.3"), "db", false},
		{"no address", netip.Addr{}, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, exit := tb.lookup(tc.addr)
			if res != tc.resource || exit != tc.exit {
				t.Errorf("lookup(%v) = %q, exit=%v; want %q, exit=%v", tc.addr, res, exit, tc.resource, tc.exit)
			}
		})
	}

	// Without default routes an unknown address is nothing at all.
	e2 := build(t, map[string]any{"resources": lookupTables["resources"]}, nil)
	if res, exit := e2.tables.Load().lookup(a("8.8.8.8")); res != "" || exit {
		t.Errorf("no routes: lookup(8.8.8.8) = %q, %v", res, exit)
	}
}

func TestEnrichSetsResourceIDs(t *testing.T) {
	e := build(t, lookupTables, nil)
	evs := []flow.Event{
		{SrcAddr: a("100.64.0.7"), DstAddr: a("10.1.2.3"), Protocol: flow.ProtoTCP, DstPort: 5432},
		{SrcAddr: a("10.1.0.9"), DstAddr: a("fd00:1::5"), Protocol: flow.ProtoTCP, DstPort: 80},
		{SrcAddr: a("10.1.0.9"), DstAddr: a("10.1.2.3"), Protocol: flow.ProtoTCP, SrcResourceID: "from-source", DstPort: 80},
	}
	b := flow.NewBatch(evs, nil)
	if err := e.Enrich(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	want := [][2]string{{"", "db"}, {"web", "v6net"}, {"from-source", "db"}}
	for i, w := range want {
		if got := [2]string{b.Events[i].SrcResourceID, b.Events[i].DstResourceID}; got != w {
			t.Errorf("event %d: resource IDs %q, want %q", i, got, w)
		}
	}
}

func rulesOpts() map[string]any {
	return map[string]any{
		"resources": []any{
			map[string]any{"id": "db", "prefixes": []any{"10.1.2.0/24", "fd00:db::/64"}},
			map[string]any{"id": "web", "prefixes": []any{"10.1.3.0/24"}},
		},
		"rules": []any{
			map[string]any{"id": "r-drop-telnet", "action": "drop", "protocols": []any{"tcp"}, "ports": []any{23}},
			map[string]any{"id": "r-db", "action": "accept", "protocols": []any{"tcp"}, "dst": []any{"db"}, "ports": []any{5432, "6000-6010"}},
			map[string]any{"id": "r-web-in", "protocols": []any{"tcp"}, "dst": []any{"web"}, "ports": []any{"80", "443"}, "direction": "ingress"},
			map[string]any{"id": "r-ping", "protocols": []any{"icmp", "icmpv6"}, "src": []any{"10.0.0.0/8", "fd00::/16"}},
			map[string]any{"id": "r-dns", "protocols": []any{"udp", "tcp"}, "ports": []any{53}},
			map[string]any{"id": "r-from-web", "src": []any{"web"}},
			map[string]any{"id": "r-gre", "protocols": []any{47}},
			map[string]any{"id": "r-any-port-high", "ports": []any{"60000-65535"}},
		},
	}
}

func TestRules(t *testing.T) {
	e := build(t, rulesOpts(), nil)
	tcp := func(src, dst string, dport uint16, dir flow.Direction) flow.Event {
		return flow.Event{Type: flow.TypeStart, Protocol: flow.ProtoTCP, SrcAddr: a(src), DstAddr: a(dst), SrcPort: 40000, DstPort: dport, Direction: dir}
	}
	with := func(ev flow.Event, f func(*flow.Event)) flow.Event { f(&ev); return ev }
	for _, tc := range []struct {
		name string
		ev   flow.Event
		want string
	}{
		{"single port, resource as dst", tcp("100.64.0.1", "10.1.2.9", 5432, flow.Egress), "r-db"},
		{"port range low end", tcp("100.64.0.1", "10.1.2.9", 6000, flow.Egress), "r-db"},
		{"port range high end", tcp("100.64.0.1", "10.1.2.9", 6010, flow.Egress), "r-db"},
		{"just past the range", tcp("100.64.0.1", "10.1.2.9", 6011, flow.Egress), ""},
		{"resource's IPv6 prefix", tcp("fd00:1::1", "fd00:db::9", 5432, flow.Egress), "r-db"},
		{"accept rule does not explain a drop", with(tcp("100.64.0.1", "10.1.2.9", 5432, flow.Egress), func(e *flow.Event) { e.Type = flow.TypeDrop }), ""},
		{"drop rule explains a drop", with(tcp("100.64.0.1", "10.1.2.9", 23, flow.Ingress), func(e *flow.Event) { e.Type = flow.TypeDrop }), "r-drop-telnet"},
		{"drop rule does not explain an accepted flow", tcp("100.64.0.1", "10.1.2.9", 23, flow.Ingress), ""},
		{"direction matches", tcp("100.64.0.1", "10.1.3.4", 443, flow.Ingress), "r-web-in"},
		{"direction does not match, later rule", tcp("10.1.3.4", "10.1.3.5", 443, flow.Egress), "r-from-web"},
		{"protocol list, IPv4", flow.Event{Protocol: flow.ProtoICMP, SrcAddr: a("10.5.5.5"), DstAddr: a("100.64.0.1"), ICMPType: 8}, "r-ping"},
		{"protocol list, IPv6", flow.Event{Protocol: flow.ProtoICMPv6, SrcAddr: a("fd00:5::5"), DstAddr: a("fd7a::1"), ICMPType: 128}, "r-ping"},
		{"src prefix does not match", flow.Event{Protocol: flow.ProtoICMP, SrcAddr: a("11.5.5.5"), DstAddr: a("100.64.0.1")}, ""},
		{"first match wins over a later match", with(tcp("10.1.3.4", "10.1.2.9", 5432, flow.Egress), func(*flow.Event) {}), "r-db"},
		{"UDP port", flow.Event{Protocol: flow.ProtoUDP, SrcAddr: a("100.64.0.1"), DstAddr: a("1.1.1.1"), DstPort: 53}, "r-dns"},
		{"protocol number", flow.Event{Protocol: 47, SrcAddr: a("100.64.0.1"), DstAddr: a("1.1.1.1")}, "r-gre"},
		{"rule with ports skips port-less flows", flow.Event{Protocol: 47, SrcAddr: a("100.64.0.1"), DstAddr: a("1.1.1.1"), DstPort: 61000}, "r-gre"},
		{"rule with only ports matches any protocol with ports", flow.Event{Protocol: flow.ProtoSCTP, SrcAddr: a("100.64.0.1"), DstAddr: a("1.1.1.1"), DstPort: 61000}, "r-any-port-high"},
		{"ICMP never matches a rule with ports", flow.Event{Protocol: flow.ProtoICMP, SrcAddr: a("11.0.0.1"), DstAddr: a("1.1.1.1"), ICMPType: 8}, ""},
		{"source's rule ID is kept", with(tcp("100.64.0.1", "10.1.2.9", 5432, flow.Egress), func(e *flow.Event) { e.RuleID = "from-source" }), "from-source"},
		{"IPv4-mapped source matches an IPv4 resource", tcp("::ffff:10.1.3.4", "9.9.9.9", 1, flow.Egress), "r-from-web"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := flow.NewBatch([]flow.Event{tc.ev}, nil)
			if err := e.Enrich(context.Background(), b); err != nil {
				t.Fatal(err)
			}
			if got := b.Events[0].RuleID; got != tc.want {
				t.Errorf("rule_id = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestFilters(t *testing.T) {
	evs := func() []flow.Event {
		return []flow.Event{
			{Protocol: flow.ProtoUDP, SrcAddr: a("100.64.0.1"), DstAddr: a("10.1.0.1"), DstPort: 53},   // dns
			{Protocol: flow.ProtoTCP, SrcAddr: a("100.64.0.1"), DstAddr: a("10.1.0.1"), DstPort: 53},   // dns over TCP
			{Protocol: flow.ProtoUDP, SrcAddr: a("100.64.0.1"), DstAddr: a("10.1.0.1"), DstPort: 5353}, // dns_ports
			{Protocol: flow.ProtoUDP, SrcAddr: a("10.1.0.1"), DstAddr: a("100.64.0.1"), SrcPort: 53, DstPort: 40000},
			{Protocol: flow.ProtoSCTP, SrcAddr: a("100.64.0.1"), DstAddr: a("10.1.0.1"), DstPort: 53},
			{Protocol: flow.ProtoTCP, SrcAddr: a("100.64.0.1"), DstAddr: a("8.8.8.8"), DstPort: 443},           // exit via default
			{Protocol: flow.ProtoTCP, SrcAddr: a("192.168.7.7"), DstAddr: a("100.64.0.1"), DstPort: 22},        // exit as source
			{Protocol: flow.ProtoICMPv6, SrcAddr: a("fd7a:115c::1"), DstAddr: a("2001:db8::1"), ICMPType: 128}, // exit IPv6
			{Protocol: flow.ProtoTCP, SrcAddr: a("100.64.0.1"), DstAddr: a("10.1.0.1"), DstPort: 443},
		}
	}
	base := func() map[string]any {
		m := map[string]any{}
		for k, v := range lookupTables {
			m[k] = v
		}
		m["dns_ports"] = []any{5353}
		return m
	}
	for _, tc := range []struct {
		name       string
		opts       map[string]any
		keep       []int
		dns, exitN int
	}{
		{"collect everything", map[string]any{}, []int{0, 1, 2, 3, 4, 5, 6, 7, 8}, 0, 0},
		{"no DNS", map[string]any{"dns_collection": false}, []int{3, 4, 5, 6, 7, 8}, 3, 0},
		{"no exit node", map[string]any{"exit_node_collection": false}, []int{0, 1, 2, 3, 4, 8}, 0, 3},
		{"neither", map[string]any{"dns_collection": false, "exit_node_collection": false}, []int{3, 4, 8}, 3, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := base()
			for k, v := range tc.opts {
				opts[k] = v
			}
			m := newCounting()
			e := build(t, opts, m)
			in := evs()
			b := flow.NewBatch(evs(), nil)
			if err := e.Enrich(context.Background(), b); err != nil {
				t.Fatal(err)
			}
			if len(b.Events) != len(tc.keep) {
				t.Fatalf("kept %d events, want %d", len(b.Events), len(tc.keep))
			}
			for i, k := range tc.keep {
				if b.Events[i].DstAddr != in[k].DstAddr || b.Events[i].DstPort != in[k].DstPort || b.Events[i].Protocol != in[k].Protocol {
					t.Errorf("kept event %d is %v:%d, want input %d (order must be kept)", i, b.Events[i].DstAddr, b.Events[i].DstPort, k)
				}
			}
			if got := m.get("filtered", "dns"); got != tc.dns {
				t.Errorf("filtered dns = %d, want %d", got, tc.dns)
			}
			if got := m.get("filtered", "exit_node"); got != tc.exitN {
				t.Errorf("filtered exit_node = %d, want %d", got, tc.exitN)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts map[string]any
		want map[string]string // path -> part of the message
	}{
		{"invalid prefixes", map[string]any{
			"overlay":   []any{"100.64.0.0/33"},
			"resources": []any{map[string]any{"id": "x", "prefixes": []any{"10.0.0.300/8", "10.0.0.1/8", "fd00::%eth0"}}},
			"routes":    []any{map[string]any{"prefix": "nonsense"}},
		}, map[string]string{
			"overlay[0]":               "invalid prefix",
			"resources[0].prefixes[0]": "invalid prefix",
			"resources[0].prefixes[1]": "did you mean 10.0.0.0/8",
			"resources[0].prefixes[2]": "invalid prefix",
			"routes[0].prefix":         "invalid prefix",
		}},
		{"duplicate prefixes and IDs", map[string]any{
			"overlay": []any{"100.64.0.0/10", "100.64.0.0/10"},
			"resources": []any{
				map[string]any{"id": "a", "prefixes": []any{"10.0.0.0/8"}},
				map[string]any{"id": "b", "prefixes": []any{"10.0.0.0/8"}},
				map[string]any{"id": "a"},
			},
			"routes": []any{map[string]any{"prefix": "10.0.0.0/8"}},
		}, map[string]string{
			"overlay[1]":               "duplicate prefix",
			"resources[1].prefixes[0]": "also at resources[0].prefixes[0]",
			"resources[2].id":          "duplicate resource ID",
			"routes[0].prefix":         "duplicate prefix",
		}},
		{"rules", map[string]any{
			"resources": []any{map[string]any{"id": "db", "prefixes": []any{"10.1.2.0/24"}}},
			"rules": []any{
				map[string]any{"id": "r0", "src": []any{"dbx"}, "dst": []any{"10.1.2.0/33"}},
				map[string]any{"id": "r1", "ports": []any{"9000-8000", 0, 70000, "http"}},
				map[string]any{"id": "r2", "protocols": []any{"icmp"}, "ports": []any{22}},
				map[string]any{"id": "r3", "action": "reject", "direction": "inbound", "protocols": []any{"tcpp"}},
				map[string]any{"id": ""},
			},
		}, map[string]string{
			"rules[0].src[0]":       `unknown resource "dbx"`,
			"rules[0].dst[0]":       "invalid prefix",
			"rules[1].ports[0]":     "empty port range",
			"rules[1].ports[1]":     "invalid port",
			"rules[1].ports[2]":     "invalid port",
			"rules[1].ports[3]":     "invalid port",
			"rules[2].ports":        "can never match",
			"rules[3].action":       "unknown action",
			"rules[3].direction":    "unknown direction",
			"rules[3].protocols[0]": "unknown protocol",
			"rules[4].id":           "must not be empty",
		}},
		{"options", map[string]any{
			"tables_file":     "tables.yaml",
			"overlay":         []any{"100.64.0.0/10"},
			"reload_interval": "0s",
			"dns_ports":       []any{0},
		}, map[string]string{
			"tables_file":     "not both",
			"reload_interval": "must be positive",
			"dns_ports[0]":    "invalid port 0",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			if errs := config.Decode(tc.opts, cfg, ""); len(errs) > 0 {
				t.Fatalf("decode: %v", errs)
			}
			err := cfg.Validate()
			fe, ok := err.(config.FieldErrors)
			if !ok {
				t.Fatalf("Validate() = %v (%T), want config.FieldErrors", err, err)
			}
			got := map[string]string{}
			for _, e := range fe {
				got[e.Path] += e.Msg + "; "
			}
			for path, part := range tc.want {
				if !strings.Contains(got[path], part) {
					t.Errorf("%s: got %q, want a message containing %q", path, got[path], part)
				}
			}
			if len(got) != len(tc.want) {
				t.Errorf("got problems at %d paths, want %d: %v", len(got), len(tc.want), fe)
			}
		})
	}
}

func testEnv() component.Env {
	return component.Env{Name: "res", Kind: component.KindEnricher, Type: "resources", Metrics: component.NopMetrics{}}
}
