package resources

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// TestRuleIndexAgreesWithScan: for random rule sets (overlapping single ports and ranges,
// port-less rules, protocols, directions, actions) and random events, the index must pick
// the same first match as checking every rule in order.
func TestRuleIndexAgreesWithScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	protos := []string{"tcp", "udp", "icmp", "sctp", "47"}
	port := func() uint16 {
		return uint16([]int{1, 22, 53, 80, 443, 1000, 8000, 8080, 65535, 0}[rng.IntN(10)] + rng.IntN(3))
	}
	for round := 0; round < 200; round++ {
		var tb Tables
		for i := 0; i < 1+rng.IntN(30); i++ {
			r := Rule{ID: fmt.Sprintf("r%d", i)}
			for k := 0; k < rng.IntN(3); k++ {
				p := port()
				if p == 0 {
					p = 1
				}
				if rng.IntN(2) == 0 {
					r.Ports = append(r.Ports, fmt.Sprint(p))
				} else {
					hi := min(int(p)+rng.IntN(5000), 65535)
					r.Ports = append(r.Ports, fmt.Sprintf("%d-%d", p, hi))
				}
			}
			if rng.IntN(3) == 0 {
				r.Protocols = []string{protos[rng.IntN(4)], protos[rng.IntN(5)]}
			}
			if len(r.Ports) > 0 && len(r.Protocols) > 0 {
				r.Protocols = append(r.Protocols, "udp") // a rule with ports needs a protocol with ports
			}
			r.Direction = []string{"", "ingress", "egress"}[rng.IntN(3)]
			r.Action = []string{"", "accept", "drop"}[rng.IntN(3)]
			if rng.IntN(4) == 0 {
				r.Dst = []string{"10.0.0.0/8"}
			}
			tb.Rules = append(tb.Rules, r)
		}
		c, errs := compile(&tb, "")
		if len(errs) > 0 {
			t.Fatalf("round %d: %v", round, errs)
		}
		if c.ruleIndex == nil {
			t.Fatal("no index built")
		}
		for k := 0; k < 500; k++ {
			ev := flow.Event{
				Type:      flow.Type(1 + rng.IntN(3)),
				Protocol:  []uint8{flow.ProtoTCP, flow.ProtoUDP, flow.ProtoICMP, flow.ProtoSCTP, 47}[rng.IntN(5)],
				Direction: flow.Direction(rng.IntN(3)),
				SrcAddr:   netip.MustParseAddr("100.64.0.1"),
				DstAddr:   netip.AddrFrom4([4]byte{byte(9 + rng.IntN(2)), 0, 0, 1}),
				DstPort:   port() + uint16(rng.IntN(2)),
			}
			if got, want := c.ruleFor(&ev), c.ruleForScan(&ev); got != want {
				t.Fatalf("round %d: index says %q, scan says %q for %+v\nrules: %+v", round, got, want, ev, tb.Rules)
			}
		}
	}
}
