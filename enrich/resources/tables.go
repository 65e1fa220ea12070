package resources

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/gaissmai/bart"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Tables is what an operator (or a management server, through tables_file) says about the
// network: the overlay, the resources, the routes and the rules. It is written inline in the
// enricher's options or in a separate YAML/JSON file with the same keys.
type Tables struct {
	// Overlay is the private (VPN) network; an address inside it is a peer, never a resource.
	Overlay []string `yaml:"overlay"`
	// Resources are named destinations reachable through the overlay.
	Resources []Resource `yaml:"resources"`
	// Routes are prefixes routed through a peer; default routes and those marked exit_node
	// go through an exit node.
	Routes []Route `yaml:"routes"`
	// Rules are matched in order; the first match names the rule behind a flow.
	Rules []Rule `yaml:"rules"`
}

// Resource is a named set of prefixes.
type Resource struct {
	ID       string   `yaml:"id" required:"true"`
	Prefixes []string `yaml:"prefixes"`
	// Domains document a DNS resource; flows carry addresses, so they do not take part in
	// matching.
	Domains []string `yaml:"domains"`
}

// Route is a prefix routed through a peer.
type Route struct {
	Prefix   string `yaml:"prefix" required:"true"`
	ExitNode bool   `yaml:"exit_node"`
}

// Rule is one firewall rule. An omitted field matches anything.
type Rule struct {
	ID string `yaml:"id" required:"true"`
	// Action is accept or drop: a drop rule explains drop events, an accept rule every other
	// event, so that a denied flow is never attributed to a rule that would have let it pass.
	Action    string   `yaml:"action"`
	Protocols []string `yaml:"protocols"` // tcp, udp, icmp, icmpv6, sctp or a protocol number
	Src       []string `yaml:"src"`       // prefixes, addresses or resource IDs
	Dst       []string `yaml:"dst"`
	Ports     []string `yaml:"ports"` // destination ports: 443, "8000-8999"
	Direction string   `yaml:"direction"`
}

func (t *Tables) empty() bool {
	return len(t.Overlay) == 0 && len(t.Resources) == 0 && len(t.Routes) == 0 && len(t.Rules) == 0
}

// target is what the longest matching prefix of an address leads to.
type target struct {
	// resource is the resource's ID, "" for a route. Keeping the string header in the trie's
	// value (rather than an index into a slice of IDs) saves a cache miss per lookup.
	resource string
	exit     bool // an exit-node route
}

// compiled is the form of Tables that Enrich reads. It is immutable once built, so that many
// goroutines can read it while a reload builds its successor.
type compiled struct {
	// The overlay is usually one or two prefixes, which a loop checks faster than a trie;
	// overlaySet serves larger overlays.
	overlay     []netip.Prefix
	overlaySet  *bart.Lite
	lpm         *bart.Table[target]
	resourceIDs []string
	rules       []rule
	ruleIndex   *ruleIndex // nil: scan every rule
	prefixes    int        // for logs
}

type action uint8

const (
	actionAny action = iota
	actionAccept
	actionDrop
)

type portRange struct{ lo, hi uint16 }

type rule struct {
	id        string
	action    action
	anyProto  bool
	protos    [4]uint64 // bitset of IANA protocol numbers
	src, dst  *bart.Lite
	ports     []portRange
	direction flow.Direction
}

func (r *rule) matches(ev *flow.Event) bool {
	switch r.action {
	case actionAccept:
		if ev.Type == flow.TypeDrop {
			return false
		}
	case actionDrop:
		if ev.Type != flow.TypeDrop {
			return false
		}
	}
	if !r.anyProto && r.protos[ev.Protocol>>6]&(1<<(ev.Protocol&63)) == 0 {
		return false
	}
	if r.direction != flow.DirectionUnknown && r.direction != ev.Direction {
		return false
	}
	if r.ports != nil {
		if !hasPorts(ev.Protocol) {
			return false
		}
		in := false
		for _, pr := range r.ports {
			if ev.DstPort >= pr.lo && ev.DstPort <= pr.hi {
				in = true
				break
			}
		}
		if !in {
			return false
		}
	}
	if r.src != nil && !r.src.Contains(ev.SrcAddr.Unmap()) {
		return false
	}
	if r.dst != nil && !r.dst.Contains(ev.DstAddr.Unmap()) {
		return false
	}
	return true
}

// hasPorts reports the protocols whose flows have ports.
func hasPorts(proto uint8) bool {
	switch proto {
	case flow.ProtoTCP, flow.ProtoUDP, flow.ProtoSCTP, 33 /* DCCP */, 136 /* UDP-Lite */ :
		return true
	}
	return false
}

var protoNames = map[string]uint8{
	"icmp": flow.ProtoICMP, "tcp": flow.ProtoTCP, "udp": flow.ProtoUDP,
	"icmpv6": flow.ProtoICMPv6, "ipv6-icmp": flow.ProtoICMPv6, "sctp": flow.ProtoSCTP,
}

// parsePrefix accepts a prefix in canonical form or a bare address (a /32 or /128).
func parsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("invalid prefix %q: want an address or a prefix such as 10.0.0.0/8 or fd00::/8", s)
		}
		if a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("invalid prefix %q: zones are not allowed", s)
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("invalid prefix %q: want a prefix such as 10.0.0.0/8 or fd00::/8", s)
	}
	if m := p.Masked(); m != p {
		return netip.Prefix{}, fmt.Errorf("prefix %q has host bits set; did you mean %s?", s, m)
	}
	if p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("prefix %q is an IPv4-mapped IPv6 prefix; write the IPv4 prefix", s)
	}
	return p, nil
}

// looksLikeAddress tells a mistyped prefix ("10.0.0.300/8", "fd00::/200") from a resource ID.
func looksLikeAddress(s string) bool {
	if strings.Contains(s, "/") || strings.Contains(s, ":") {
		return true
	}
	dots := strings.Count(s, ".")
	if dots != 3 {
		return false
	}
	for _, r := range s {
		if r != '.' && (r < '0' || r > '9') {
			return false
		}
	}
	return true
}

func parsePorts(s string) (portRange, error) {
	lo, hi, isRange := strings.Cut(strings.TrimSpace(s), "-")
	p1, err := parsePort(lo)
	if err != nil {
		return portRange{}, err
	}
	if !isRange {
		return portRange{p1, p1}, nil
	}
	p2, err := parsePort(hi)
	if err != nil {
		return portRange{}, err
	}
	if p2 < p1 {
		return portRange{}, fmt.Errorf("empty port range %q: the first port must not be above the last", s)
	}
	return portRange{p1, p2}, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("invalid port %q: want 1-65535, or a range such as \"8000-8999\"", s)
	}
	return uint16(n), nil
}

// compile checks t and builds its lookup form. Every problem is reported, each with its key
// path under base (for example "rules[2].ports[0]").
func compile(t *Tables, base string) (*compiled, config.FieldErrors) {
	var errs config.FieldErrors
	c := &compiled{lpm: new(bart.Table[target])}
	path := func(format string, args ...any) string { return config.Join(base, fmt.Sprintf(format, args...)) }

	if len(t.Overlay) > 0 {
		seen := map[netip.Prefix]int{}
		for i, s := range t.Overlay {
			p, err := parsePrefix(s)
			if err != nil {
				errs.Add(path("overlay[%d]", i), "%s", err)
				continue
			}
			if j, dup := seen[p]; dup {
				errs.Add(path("overlay[%d]", i), "duplicate prefix %s (also overlay[%d])", p, j)
				continue
			}
			seen[p] = i
			c.overlay = append(c.overlay, p)
		}
		if len(c.overlay) > 4 {
			c.overlaySet = new(bart.Lite)
			for _, p := range c.overlay {
				c.overlaySet.Insert(p)
			}
		}
	}

	// Resources and routes share one longest-prefix-match table: as in a routing table, the
	// most specific entry decides, whether it names a resource or a route.
	owner := map[netip.Prefix]string{}
	addLPM := func(p netip.Prefix, tg target, where string) {
		if prev, dup := owner[p]; dup {
			errs.Add(where, "duplicate prefix %s (also at %s); each prefix may belong to one resource or route", p, prev)
			return
		}
		owner[p] = where
		c.lpm.Insert(p, tg)
		c.prefixes++
	}
	resourceIdx := map[string]int{}
	resourcePrefixes := map[string][]netip.Prefix{}
	for i, r := range t.Resources {
		if r.ID == "" {
			errs.Add(path("resources[%d].id", i), "must not be empty")
			continue
		}
		if j, dup := resourceIdx[r.ID]; dup {
			errs.Add(path("resources[%d].id", i), "duplicate resource ID %q (also resources[%d])", r.ID, j)
			continue
		}
		resourceIdx[r.ID] = i
		c.resourceIDs = append(c.resourceIDs, r.ID)
		for k, s := range r.Prefixes {
			where := path("resources[%d].prefixes[%d]", i, k)
			p, err := parsePrefix(s)
			if err != nil {
				errs.Add(where, "%s", err)
				continue
			}
			addLPM(p, target{resource: r.ID}, where)
			resourcePrefixes[r.ID] = append(resourcePrefixes[r.ID], p)
		}
	}
	for i, r := range t.Routes {
		where := path("routes[%d].prefix", i)
		p, err := parsePrefix(r.Prefix)
		if err != nil {
			errs.Add(where, "%s", err)
			continue
		}
		addLPM(p, target{exit: r.ExitNode || p.Bits() == 0}, where)
	}

	for i, r := range t.Rules {
		cr := rule{id: r.ID}
		if r.ID == "" {
			errs.Add(path("rules[%d].id", i), "must not be empty")
		}
		switch strings.ToLower(r.Action) {
		case "":
		case "accept":
			cr.action = actionAccept
		case "drop":
			cr.action = actionDrop
		default:
			errs.Add(path("rules[%d].action", i), "unknown action %q (want accept or drop)", r.Action)
		}
		switch strings.ToLower(r.Direction) {
		case "":
		case "ingress":
			cr.direction = flow.Ingress
		case "egress":
			cr.direction = flow.Egress
		default:
			errs.Add(path("rules[%d].direction", i), "unknown direction %q (want ingress or egress)", r.Direction)
		}
		cr.anyProto = len(r.Protocols) == 0
		portless := len(r.Protocols) > 0
		for k, s := range r.Protocols {
			n, ok := protoNames[strings.ToLower(s)]
			if !ok {
				v, err := strconv.ParseUint(s, 10, 8)
				if err != nil {
					errs.Add(path("rules[%d].protocols[%d]", i, k), "unknown protocol %q (want tcp, udp, icmp, icmpv6, sctp or a number 0-255)", s)
					continue
				}
				n = uint8(v)
			}
			cr.protos[n>>6] |= 1 << (n & 63)
			if hasPorts(n) {
				portless = false
			}
		}
		for k, s := range r.Ports {
			pr, err := parsePorts(s)
			if err != nil {
				errs.Add(path("rules[%d].ports[%d]", i, k), "%s", err)
				continue
			}
			cr.ports = append(cr.ports, pr)
		}
		if len(r.Ports) > 0 && portless {
			errs.Add(path("rules[%d].ports", i), "this rule can never match: ports are set but none of its protocols has ports")
		}
		cr.src = compileEnds(r.Src, path("rules[%d].src", i), resourcePrefixes, resourceIdx, &errs)
		cr.dst = compileEnds(r.Dst, path("rules[%d].dst", i), resourcePrefixes, resourceIdx, &errs)
		c.rules = append(c.rules, cr)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	c.ruleIndex = buildRuleIndex(c.rules)
	return c, nil
}

// compileEnds turns a rule's src or dst list into one prefix set; nil means any address.
func compileEnds(list []string, base string, resourcePrefixes map[string][]netip.Prefix, known map[string]int, errs *config.FieldErrors) *bart.Lite {
	if len(list) == 0 {
		return nil
	}
	set := new(bart.Lite)
	for k, s := range list {
		where := fmt.Sprintf("%s[%d]", base, k)
		if _, ok := known[s]; ok {
			for _, p := range resourcePrefixes[s] {
				set.Insert(p)
			}
			continue
		}
		if looksLikeAddress(s) {
			p, err := parsePrefix(s)
			if err != nil {
				errs.Add(where, "%s", err)
				continue
			}
			set.Insert(p)
			continue
		}
		ids := make([]string, 0, len(known))
		for id := range known {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		if len(ids) > 10 {
			ids = append(ids[:10], "...")
		}
		errs.Add(where, "unknown resource %q: not a prefix and no resource has this ID (resources: %s)", s, strings.Join(ids, ", "))
	}
	return set
}

// lookup resolves one end of a flow: the resource it belongs to ("" if none) and whether it
// is reached through an exit node. Overlay addresses are peers and are not looked up.
func (c *compiled) lookup(a netip.Addr) (resource string, exit bool) {
	if !a.IsValid() {
		return "", false
	}
	a = a.Unmap()
	if c.overlaySet != nil {
		if c.overlaySet.Contains(a) {
			return "", false
		}
	} else {
		for _, p := range c.overlay {
			if p.Contains(a) {
				return "", false
			}
		}
	}
	tg, ok := c.lpm.Lookup(a)
	if !ok {
		return "", false
	}
	return tg.resource, tg.exit
}

// ruleFor is the ID of the first rule that matches ev, or "".
func (c *compiled) ruleFor(ev *flow.Event) string {
	if c.ruleIndex != nil {
		for _, i := range c.ruleIndex.candidates(ev) {
			if c.rules[i].matches(ev) {
				return c.rules[i].id
			}
		}
		return ""
	}
	return c.ruleForScan(ev)
}

// ruleForScan checks every rule in order: the definition that the index must agree with.
func (c *compiled) ruleForScan(ev *flow.Event) string {
	for i := range c.rules {
		if c.rules[i].matches(ev) {
			return c.rules[i].id
		}
	}
	return ""
}
