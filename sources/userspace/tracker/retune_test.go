package tracker

import (
	"testing"
	"time"

	"github.com/google/uuid"
)

// TestRetune: new limits and timeouts keep the open connections and their flow IDs; a lower
// max_entries evicts the excess with their ends; a shorter timeout applies to connections
// already open.
func TestRetune(t *testing.T) {
	tr := New(Config{MaxEntries: 100})
	for i := range 10 {
		tr.ProcessAt(udpPkt(addrA, addrB, uint16(1000+i), 53, 10), sec)
	}
	starts, _, _ := drain(t, tr)
	ids := map[uint16]uuid.UUID{}
	for _, s := range starts {
		ids[s.SrcPort] = s.FlowID
	}
	tr.Retune(Config{MaxEntries: 4, Timeouts: Timeouts{UDPUnreplied: 5 * time.Second}, BatchHint: 2}, 2*sec)
	_, ends, _ := drain(t, tr)
	if len(ends) != 6 || tr.Len() != 4 {
		t.Fatalf("%d ends, %d connections left; want 6 evicted with their ends and 4 kept", len(ends), tr.Len())
	}
	for _, e := range ends {
		if e.FlowID != ids[e.SrcPort] {
			t.Errorf("end of port %d has flow ID %v, its start %v", e.SrcPort, e.FlowID, ids[e.SrcPort])
		}
	}
	// The kept ones still count packets under their flow ID, and end by the new timeout
	// (5 s, not the default 30 s).
	kept := map[uint16]bool{}
	for p := range ids {
		kept[p] = true
	}
	for _, e := range ends {
		delete(kept, e.SrcPort)
	}
	for p := range kept {
		if m := tr.ProcessAt(udpPkt(addrA, addrB, p, 53, 10), 3*sec); m != MatchOriginal {
			t.Fatalf("port %d after Retune: %v, want its connection (original)", p, m)
		}
	}
	if n := tr.Expire(3*sec + 5*sec); n != 4 {
		t.Fatalf("expired %d connections at the new 5 s timeout, want 4", n)
	}
	_, ends, _ = drain(t, tr)
	for _, e := range ends {
		if !kept[e.SrcPort] || e.FlowID != ids[e.SrcPort] || e.TxPackets != 2 {
			t.Errorf("end %+v: want a kept connection's flow ID and both its packets", e)
		}
	}
}
