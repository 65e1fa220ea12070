package resources

import (
	"slices"

	"github.com/flowpipe/flowpipe/core/flow"
)

// ruleIndex narrows the rules a flow can match by its destination port, so that a flow is
// checked against the rules that could match it rather than against every rule: with
// hundreds of rules, most of them restricted to a few ports, that is the difference between
// a few and a few hundred checks per event. Candidates stay in rule order, so the first match
// is the same as with a scan of every rule.
type ruleIndex struct {
	// bounds[i] is the first port of segment i (bounds[0] is 0); within a segment every port
	// has the same candidates, lists[i].
	bounds []uint16
	lists  [][]int32
	// portless are the candidates of flows without ports: the rules without ports.
	portless []int32
}

// maxIndexEntries bounds the index's memory (4 bytes an entry); past it the rules are scanned.
const maxIndexEntries = 1 << 22

func buildRuleIndex(rules []rule) *ruleIndex {
	ix := &ruleIndex{}
	bounds := []uint16{0}
	for i := range rules {
		if rules[i].ports == nil {
			ix.portless = append(ix.portless, int32(i))
			continue
		}
		for _, pr := range rules[i].ports {
			bounds = append(bounds, pr.lo)
			if pr.hi < 65535 {
				bounds = append(bounds, pr.hi+1)
			}
		}
	}
	slices.Sort(bounds)
	ix.bounds = slices.Compact(bounds)
	ix.lists = make([][]int32, len(ix.bounds))
	entries := 0
	for i := range rules {
		if rules[i].ports == nil {
			for s := range ix.lists {
				ix.lists[s] = append(ix.lists[s], int32(i))
			}
			entries += len(ix.lists)
		} else {
			for _, pr := range rules[i].ports {
				first := ix.segment(pr.lo)
				last := ix.segment(pr.hi)
				for s := first; s <= last; s++ {
					// A rule listed for several overlapping ranges is a candidate once.
					if l := ix.lists[s]; len(l) == 0 || l[len(l)-1] != int32(i) {
						ix.lists[s] = append(l, int32(i))
						entries++
					}
				}
			}
		}
		if entries > maxIndexEntries {
			return nil
		}
	}
	return ix
}

// segment is the index of the segment holding port.
func (ix *ruleIndex) segment(port uint16) int {
	i, found := slices.BinarySearch(ix.bounds, port)
	if !found {
		i--
	}
	return i
}

func (ix *ruleIndex) candidates(ev *flow.Event) []int32 {
	if !hasPorts(ev.Protocol) {
		return ix.portless
	}
	return ix.lists[ix.segment(ev.DstPort)]
}
