package ipfix

import (
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// BenchmarkPack is the encoder alone: 1,024 events of the recording packed into 1,452-byte
// UDP messages, per event.
func BenchmarkPack(b *testing.B) {
	rec := recording(b)
	evs := make([]flow.Event, 0, 1024)
	for len(evs) < 1024 {
		evs = append(evs, exported(rec, "start,end,aggregate")...)
	}
	evs = evs[:1024]
	s := &Sink{tmpls: templates(64999)}
	var seq uint32
	p := packer{max: 1500 - 48, seq: &seq, tmpls: s.tmpls}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i += len(evs) {
		p.reset(p.buf)
		for j := range evs {
			p.add(s.template(&evs[j]), &evs[j])
		}
		p.closeMessage()
	}
}
