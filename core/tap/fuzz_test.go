package tap

import (
	"net/netip"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// FuzzParseGroup: the filter syntax comes from users and from HTTP queries. Parsing never
// panics, and a parsed group written back parses to a group that matches the same events.
func FuzzParseGroup(f *testing.F) {
	for _, s := range []string{"src=10.0.0.0/8 !dst-port=53,853 proto=udp", "ip=fd00::1", "type=drop rule=r1", "!resource=a,b", "port=0", "proto=255", "direction=ingress", "=", "!", "src=", "x=y"} {
		f.Add(s)
	}
	e := flow.Event{SrcAddr: netip.MustParseAddr("10.1.2.3"), DstAddr: netip.MustParseAddr("fd00::1"), SrcPort: 53, DstPort: 853, Protocol: flow.ProtoUDP, Type: flow.TypeDrop, RuleID: "r1", SrcResourceID: "a"}
	f.Fuzz(func(t *testing.T, s string) {
		g, err := ParseGroup(s)
		if err != nil {
			return
		}
		again, err := ParseGroup(g.String())
		if err != nil {
			t.Fatalf("%q wrote %q, which does not parse: %v", s, g.String(), err)
		}
		if g.Match(&e) != again.Match(&e) {
			t.Fatalf("%q and its string form %q disagree", s, g.String())
		}
	})
}
