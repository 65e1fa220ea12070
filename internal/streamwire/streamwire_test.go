package streamwire_test

import (
	"errors"
	"net/netip"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
	"github.com/flowpipe/flowpipe/internal/streamwire"
	streampb "github.com/flowpipe/flowpipe/proto/stream"
)

func events(n int) []flow.Event {
	ids := flow.NewIDGen()
	ev := make([]flow.Event, n)
	for i := range ev {
		ev[i] = flow.Event{EventID: ids.New(), FlowID: ids.New(), Timestamp: flow.Time(1e18 + i), Type: flow.TypeStart,
			Protocol: flow.ProtoTCP, SrcAddr: netip.MustParseAddr("100.64.0.1"), DstAddr: netip.MustParseAddr("100.64.0.2"),
			SrcPort: uint16(i), DstPort: 443, RuleID: "r", TxBytes: uint64(i)}
	}
	return ev
}

// The hand-written encoding is what the generated code reads, and the other way round.
func TestAgainstGeneratedCode(t *testing.T) {
	ev := events(5)
	wire := streamwire.AppendBatch(nil, 42, ev)
	var g streampb.Batch
	if err := proto.Unmarshal(wire, &g); err != nil {
		t.Fatal(err)
	}
	if g.Seq != 42 || g.Count != 5 || string(g.Events) != string(codec.Append(nil, ev)) {
		t.Fatalf("generated code read %v", &g)
	}
	// Per-event encodings put together after the version byte are the batch encoding.
	parts := []byte{codec.Version}
	for i := range ev {
		parts = codec.AppendEvent(parts, &ev[i])
	}
	if string(parts) != string(g.Events) {
		t.Fatal("Version + AppendEvent of each event differs from codec.Append")
	}

	gen, err := proto.Marshal(&streampb.Batch{Seq: 7, Count: 5, Events: parts})
	if err != nil {
		t.Fatal(err)
	}
	var m streamwire.Batch
	m.UnmarshalWire(gen)
	if m.Invalid != nil || m.Seq != 7 || len(m.Events) != 5 || m.Events[3] != ev[3] || m.Size != len(gen) {
		t.Fatalf("decoded %+v", m)
	}
	open, _ := proto.Marshal(&streampb.Batch{})
	if got := streamwire.AppendBatchHeader(nil, 0, 0, 0); len(got) != 0 || len(open) != 0 {
		t.Fatalf("opening message %x, generated %x; want both empty", got, open)
	}

	ack, _ := proto.Marshal(&streampb.BatchAck{Seq: 1 << 40})
	if string(streamwire.AppendAck(nil, 1<<40)) != string(ack) {
		t.Fatal("BatchAck encodings differ")
	}
	var a streamwire.Ack
	if err := a.UnmarshalWire(ack); err != nil || a.Seq != 1<<40 {
		t.Fatalf("ack %v %v", a, err)
	}
}

func TestMalformed(t *testing.T) {
	good := codec.Append(nil, events(2))
	for name, msg := range map[string]*streampb.Batch{
		"count too high":   {Seq: 1, Count: 3, Events: good},
		"count too low":    {Seq: 1, Count: 1, Events: good},
		"no count":         {Seq: 1, Events: good},
		"events in open":   {Seq: 0, Count: 2, Events: good},
		"unknown version":  {Seq: 1, Count: 2, Events: append([]byte{9}, good[1:]...)},
		"truncated":        {Seq: 1, Count: 2, Events: good[:len(good)-3]},
		"huge count":       {Seq: 1, Count: 1 << 31, Events: good},
		"count, no events": {Seq: 1, Count: 1},
	} {
		b, _ := proto.Marshal(msg)
		var m streamwire.Batch
		if err := m.UnmarshalWire(b); err != nil {
			t.Fatalf("%s: UnmarshalWire failed (%v) instead of setting Invalid", name, err)
		}
		if !errors.Is(m.Invalid, streamwire.ErrMalformed) {
			t.Errorf("%s: Invalid = %v, want ErrMalformed", name, m.Invalid)
		}
	}
	var m streamwire.Batch
	m.UnmarshalWire([]byte{0x0a}) // a tag with no value
	if m.Invalid == nil {
		t.Error("truncated field accepted")
	}
}

// FuzzBatch: any bytes decode to a batch or to Invalid, never a panic; what decodes
// re-encodes to a batch that decodes to the same events.
func FuzzBatch(f *testing.F) {
	f.Add(streamwire.AppendBatch(nil, 1, events(3)))
	f.Add([]byte{})
	f.Add([]byte{0x08, 0x01, 0x10, 0x01, 0x1a, 0x01, 0x03})
	f.Fuzz(func(t *testing.T, b []byte) {
		var m streamwire.Batch
		if err := m.UnmarshalWire(b); err != nil {
			t.Fatal(err)
		}
		if m.Invalid != nil {
			return
		}
		var again streamwire.Batch
		again.UnmarshalWire(streamwire.AppendBatch(nil, m.Seq, m.Events))
		if again.Invalid != nil || again.Seq != m.Seq || len(again.Events) != len(m.Events) {
			t.Fatalf("re-encoded batch decodes as %+v", again)
		}
		for i := range m.Events {
			if again.Events[i] != m.Events[i] {
				t.Fatalf("event %d changed: %+v -> %+v", i, m.Events[i], again.Events[i])
			}
		}
	})
}
