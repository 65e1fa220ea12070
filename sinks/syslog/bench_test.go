package syslog

import (
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/schema"
)

// BenchmarkMessage is the encoder alone, per event: one RFC 5424 message with structured
// data, or with an ECS JSON body.
func BenchmarkMessage(b *testing.B) {
	rec := recording(b)
	for _, body := range []string{"structured_data", "json"} {
		b.Run(body, func(b *testing.B) {
			h := header{pri: []byte("<134>1 "), middle: []byte(" agent-1 flowpipe 4242 "), sdID: "flow@32473", json: body == "json"}
			enc := schema.Encoder{Format: schema.ECS}
			var te flow.Encoder
			buf := make([]byte, 0, 4096)
			b.ReportAllocs()
			for i := range b.N {
				buf = h.appendMessage(buf[:0], &enc, &te, &rec[i%len(rec)])
			}
		})
	}
}
