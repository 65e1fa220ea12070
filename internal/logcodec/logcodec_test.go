package logcodec

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/flow"
)

// events makes n events with every field a format can carry set.
func events(n int) []flow.Event {
	out := make([]flow.Event, n)
	for i := range out {
		out[i] = flow.Event{
			EventID: uuid.New(), FlowID: uuid.New(),
			Timestamp: flow.Time(1_700_000_000_000_000_000 + int64(i)),
			SrcAddr:   netip.MustParseAddr("100.64.0.1"), DstAddr: netip.MustParseAddr("fd00::2"),
			SrcPort: uint16(40000 + i), DstPort: 443,
			Type: flow.TypeEnd, Direction: flow.Egress, Protocol: flow.ProtoTCP,
			RxPackets: 3, RxBytes: 300, TxPackets: 4, TxBytes: 4000,
			RuleID: "rule-1", SrcResourceID: "res-a", DstResourceID: "res-b",
		}
	}
	return out
}

func TestRoundTripEachFormat(t *testing.T) {
	in := events(500)
	for _, f := range Formats {
		t.Run(string(f), func(t *testing.T) {
			chunks, err := Split(f, in, 8<<10)
			if err != nil {
				t.Fatal(err)
			}
			if len(chunks) < 2 {
				t.Fatalf("500 events in %d message(s) of at most 8 KiB", len(chunks))
			}
			var out []flow.Event
			for i, c := range chunks {
				if len(c.Payload) > 8<<10 {
					t.Fatalf("message %d is %d bytes", i, len(c.Payload))
				}
				if got, ok := FormatOf(f.ContentType()); !ok || got != f {
					t.Fatalf("content type %q names %q", f.ContentType(), got)
				}
				n := len(out)
				out, err = Decode(f, out, c.Payload)
				if err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
				if len(out)-n != len(c.Events) {
					t.Fatalf("message %d: %d events decoded, %d sent", i, len(out)-n, len(c.Events))
				}
			}
			if len(out) != len(in) {
				t.Fatalf("%d events back, %d sent", len(out), len(in))
			}
			for i := range in {
				if out[i] != in[i] {
					t.Fatalf("event %d:\n got %+v\nwant %+v", i, out[i], in[i])
				}
			}
			again, _ := Split(f, in, 8<<10)
			if MsgID(again[1].Events) != MsgID(chunks[1].Events) || MsgID(chunks[0].Events) == MsgID(chunks[1].Events) {
				t.Fatal("message IDs are not a function of the events")
			}
		})
	}
}

func TestBadMessagesAreErrors(t *testing.T) {
	in := events(20)
	for _, f := range Formats {
		p, err := Encode(f, in)
		if err != nil {
			t.Fatal(err)
		}
		// Cut inside an event: json and protobuf cut between events are shorter valid batches.
		for _, cut := range []int{1, len(p)/2 + 7, len(p) - 1} {
			if out, err := Decode(f, nil, p[:cut]); err == nil {
				t.Errorf("%s truncated to %d of %d bytes: %d events, no error", f, cut, len(p), len(out))
			}
		}
		if _, err := Decode(f, nil, nil); err == nil {
			t.Errorf("%s: empty message accepted", f)
		}
		for _, g := range Formats {
			if g == f {
				continue
			}
			if out, err := Decode(g, nil, p); err == nil {
				t.Errorf("%s message decoded as %s: %d events", f, g, len(out))
			}
		}
	}
	if _, err := Decode(JSON, nil, []byte("not json\n")); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("garbage JSON: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	for _, fm := range Formats {
		p, _ := Encode(fm, events(3))
		f.Add(string(fm), p)
	}
	f.Fuzz(func(t *testing.T, format string, p []byte) {
		fm := Format(format)
		if !fm.Valid() {
			return
		}
		out, err := Decode(fm, nil, p)
		if err != nil && len(out) != 0 {
			t.Fatalf("error with %d events appended", len(out))
		}
	})
}
