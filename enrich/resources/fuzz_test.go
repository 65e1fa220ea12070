package resources

import (
	"net/netip"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// FuzzParseTables feeds arbitrary tables files (outside input: a management server writes
// them) to the parser: it must return tables or an error, never panic, and tables it accepts
// must be usable.
func FuzzParseTables(f *testing.F) {
	for _, s := range []string{
		tablesV1, tablesV2, "{}", "null", "[]", "resources: [",
		`{"rules": [{"id": "x", "dst": ["nope"], "ports": ["1-2", 3, "0"]}]}`,
		"overlay: [10.0.0.0/8, \"fd00::/8\", 10.0.0.1/8]\nroutes: [{prefix: 0.0.0.0/0}, {prefix: \"::/0\", exit_node: true}]",
		"resources: [{id: a, prefixes: [1.2.3.4, \"::ffff:1.2.3.0/120\"]}]\nrules: [{id: r, src: [a], protocols: [tcp, 47, icmpv6], direction: ingress, action: drop}]",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := parseTables("fuzz.yaml", data)
		if err != nil {
			if c != nil {
				t.Fatal("tables and an error")
			}
			return
		}
		for _, addr := range []string{"10.1.2.3", "1.2.3.4", "fd00::1", "::ffff:1.2.3.4"} {
			a := netip.MustParseAddr(addr)
			c.lookup(a)
			c.ruleFor(&flow.Event{Protocol: flow.ProtoTCP, SrcAddr: a, DstAddr: a, DstPort: 1, Direction: flow.Ingress, Type: flow.TypeDrop})
		}
	})
}
