package codec

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/flow"
)

// copyField sets field i of *e (in flow.Event's order) to that field of *from.
func copyField(e *flow.Event, i int, from *flow.Event) {
	reflect.ValueOf(e).Elem().Field(i).Set(reflect.ValueOf(from).Elem().Field(i))
}

var numFields = reflect.TypeFor[flow.Event]().NumField()

// checkChanges encodes the changes from sent to got and applies them to a copy of sent,
// into a new slice and in place: both must give got exactly.
func checkChanges(t *testing.T, sent, got []flow.Event) {
	t.Helper()
	data, ok := AppendChanges([]byte("prefix"), sent, got)
	if !ok {
		t.Fatalf("AppendChanges refused %d events made of %d", len(got), len(sent))
	}
	if string(data[:6]) != "prefix" {
		t.Fatal("AppendChanges did not append to dst")
	}
	data = data[6:]
	orig := slices.Clone(sent)

	out, err := ApplyChanges([]flow.Event{{Source: "already there"}}, sent, data, len(got))
	if err != nil {
		t.Fatal(err)
	}
	if out[0].Source != "already there" {
		t.Fatal("ApplyChanges did not append to dst")
	}
	if !eventsEqual(out[1:], got) {
		t.Fatalf("applied into a new slice:\n got %+v\nwant %+v", out[1:], got)
	}
	if !eventsEqual(sent, orig) {
		t.Fatal("ApplyChanges into a new slice changed the request's events")
	}

	inPlace := slices.Clone(sent)
	out, err = ApplyChanges(inPlace[:0], inPlace, data, len(got))
	if err != nil {
		t.Fatal(err)
	}
	if !eventsEqual(out, got) {
		t.Fatalf("applied in place:\n got %+v\nwant %+v", out, got)
	}
	if len(got) > 0 && &out[0] != &inPlace[0] {
		t.Fatal("ApplyChanges into sent[:0] did not change the events where they are")
	}

	// The whole batch says the same.
	whole, err := Decode(nil, Append(nil, got), len(got))
	if err != nil {
		t.Fatal(err)
	}
	if !eventsEqual(whole, got) {
		t.Fatal("the whole batch round trip differs")
	}
}

func eventsEqual(a, b []flow.Event) bool {
	return len(a) == len(b) && (len(a) == 0 || reflect.DeepEqual(a, b))
}

func TestChanges(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	base := sample(50, r)
	other := sample(50, r) // values to change fields to
	var zero flow.Event
	type tc struct {
		name   string
		mutate func([]flow.Event) []flow.Event
	}
	cases := []tc{
		{"unchanged", func(e []flow.Event) []flow.Event { return e }},
		{"community id set", func(e []flow.Event) []flow.Event {
			for i := range e {
				e[i].CommunityID = "1:" + e[i].EventID.String()
			}
			return e
		}},
		{"rule and resources", func(e []flow.Event) []flow.Event {
			for i := range e {
				e[i].RuleID, e[i].SrcResourceID, e[i].DstResourceID = "rule-9", "src-res", "dst-res"
			}
			return e
		}},
		{"strings cleared", func(e []flow.Event) []flow.Event {
			for i := range e {
				e[i].RuleID, e[i].SrcResourceID, e[i].DstResourceID, e[i].CommunityID, e[i].Source = "", "", "", "", ""
			}
			return e
		}},
		{"addresses", func(e []flow.Event) []flow.Event {
			addrs := []netip.Addr{{}, netip.MustParseAddr("192.0.2.9"), netip.MustParseAddr("2001:db8::7"),
				netip.MustParseAddr("fe80::2%wg0"), netip.MustParseAddr("::ffff:10.0.0.1")}
			for i := range e {
				e[i].SrcAddr, e[i].DstAddr = addrs[i%len(addrs)], addrs[(i+2)%len(addrs)]
			}
			return e
		}},
		{"zone changed only", func(e []flow.Event) []flow.Event {
			for i := range e {
				e[i].SrcAddr = netip.MustParseAddr("fe80::1").WithZone("eth" + string(rune('0'+i%10)))
			}
			return e
		}},
		{"numbers to zero and to max", func(e []flow.Event) []flow.Event {
			for i := range e {
				if i%2 == 0 {
					e[i].SrcPort, e[i].DstPort, e[i].RxPackets, e[i].RxBytes, e[i].TxPackets, e[i].TxBytes = 0, 0, 0, 0, 0, 0
					e[i].Timestamp, e[i].Start, e[i].End, e[i].WindowStart, e[i].WindowEnd = 0, 0, 0, 0, 0
					e[i].NumStarts, e[i].NumEnds, e[i].NumDrops = 0, 0, 0
					e[i].Type, e[i].Direction, e[i].Protocol, e[i].ICMPType, e[i].ICMPCode = 0, 0, 0, 0, 0
				} else {
					e[i].SrcPort, e[i].DstPort, e[i].RxPackets, e[i].TxBytes = 65535, 65535, ^uint64(0), ^uint64(0)
					e[i].Timestamp, e[i].Start = flow.Time(-1<<63), flow.Time(1<<63-1)
					e[i].Protocol, e[i].ICMPType, e[i].ICMPCode = 255, 255, 255
				}
			}
			return e
		}},
		{"reconstructed toggled", func(e []flow.Event) []flow.Event {
			for i := range e {
				e[i].Reconstructed = !e[i].Reconstructed
			}
			return e
		}},
		{"ids changed", func(e []flow.Event) []flow.Event {
			for i := range e {
				e[i].EventID, e[i].FlowID = uuid.New(), uuid.UUID{}
			}
			return e
		}},
		{"every field of every event", func(e []flow.Event) []flow.Event { copy(e, other); return e }},
		{"every field to zero", func(e []flow.Event) []flow.Event { clear(e); return e }},
		{"drop every third", func(e []flow.Event) []flow.Event {
			return slices.DeleteFunc(e, func(x flow.Event) bool { return x.SrcPort%3 == 0 })
		}},
		{"drop first and last, change the rest", func(e []flow.Event) []flow.Event {
			e = e[1 : len(e)-1]
			for i := range e {
				e[i].CommunityID = "kept"
			}
			return e
		}},
		{"keep only the last", func(e []flow.Event) []flow.Event { return e[len(e)-1:] }},
		{"drop all", func(e []flow.Event) []flow.Event { return e[:0] }},
		{"reordered, none dropped", func(e []flow.Event) []flow.Event { slices.Reverse(e); return e }},
		{"ids changed and some dropped", func(e []flow.Event) []flow.Event {
			for i := range e {
				e[i].EventID = uuid.UUID{}
			}
			return slices.Delete(e, 3, 10)
		}},
		{"reordered and some dropped", func(e []flow.Event) []flow.Event {
			slices.Reverse(e)
			return e[:20]
		}},
	}
	for f := range numFields {
		name := reflect.TypeFor[flow.Event]().Field(f).Name
		cases = append(cases,
			tc{name + " alone", func(e []flow.Event) []flow.Event {
				for i := range e {
					copyField(&e[i], f, &other[i])
				}
				return e
			}},
			tc{name + " alone to zero", func(e []flow.Event) []flow.Event {
				for i := range e {
					copyField(&e[i], f, &zero)
				}
				return e
			}})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := c.mutate(slices.Clone(base))
			checkChanges(t, base, got)
		})
	}
	t.Run("empty request", func(t *testing.T) { checkChanges(t, nil, nil) })
	t.Run("duplicate ids, some dropped", func(t *testing.T) {
		sent := slices.Clone(base)
		for i := range sent {
			sent[i].EventID = uuid.UUID{} // every event has the same ID
		}
		got := slices.Delete(slices.Clone(sent), 3, 10)
		for i := range got {
			got[i].RuleID = "r"
		}
		checkChanges(t, sent, got)
	})
}

// A field that changes alone costs its own bytes only: the answer to a batch whose
// enricher changed nothing is about two bytes an event.
func TestChangesAreSmall(t *testing.T) {
	base := sample(1000, rand.New(rand.NewPCG(5, 6)))
	data, _ := AppendChanges(nil, base, base)
	if len(data) > 1+4+2*len(base) {
		t.Fatalf("%d bytes for %d unchanged events", len(data), len(base))
	}
	got := slices.Clone(base)
	for i := range got {
		got[i].CommunityID = "1:hA7Xq9k3u8wYF1c2o5xL0Tn3bE4="
	}
	data, _ = AppendChanges(nil, base, got)
	if want := 1 + 4 + len(base)*(2+4+1+len(got[0].CommunityID)); len(data) > want {
		t.Fatalf("%d bytes for %d community IDs, want at most %d", len(data), len(base), want)
	}
}

func TestChangesRefused(t *testing.T) {
	base := sample(10, rand.New(rand.NewPCG(7, 8)))
	for name, got := range map[string][]flow.Event{
		"more events":   append(slices.Clone(base), base[0]),
		"twice as many": append(slices.Clone(base), base...),
	} {
		data, ok := AppendChanges([]byte("x"), base, got)
		if ok || string(data) != "x" {
			t.Errorf("%s: AppendChanges = %q, %v; want it refused and dst as it was", name, data, ok)
		}
	}
}

func TestApplyChangesRejects(t *testing.T) {
	base := sample(20, rand.New(rand.NewPCG(10, 11)))
	got := slices.Clone(base)
	got = slices.Delete(got, 4, 6)
	for i := range got {
		got[i].CommunityID, got[i].SrcAddr, got[i].Reconstructed = "c", netip.MustParseAddr("fe80::1%eth0"), !got[i].Reconstructed
	}
	good, ok := AppendChanges(nil, base, got)
	if !ok {
		t.Fatal("refused")
	}
	header := func(sent, kept uint64) []byte {
		return binary.AppendUvarint(binary.AppendUvarint([]byte{ChangesVersion}, sent), kept)
	}
	bad := map[string]struct {
		data  []byte
		count int
	}{
		"empty":               {nil, len(got)},
		"batch version":       {Append(nil, got), len(got)},
		"wrong count":         {good, len(got) - 1},
		"wrong request size":  {header(19, 0), 0},
		"kept more than sent": {append(header(20, 21), bytes.Repeat([]byte{0, 0}, 21)...), 21},
		"skip past the end":   {append(header(20, 2), 0, 0, 19, 0), 2},
		"unknown field bit":   {append(header(20, 1), 0, 0x80, 0x80, 0x80, 0x80, 0x01), 1},
		"trailing bytes":      {append(slices.Clone(good), 0), len(got)},
		"empty zone": {append(append(append(header(20, 1), 0), binary.AppendUvarint(nil, chSrcAddr)...),
			17, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0), 1},
	}
	bad["bad reconstructed"] = struct {
		data  []byte
		count int
	}{append(append(append(header(20, 1), 0), binary.AppendUvarint(nil, chReconstructed)...), 2), 1}
	for n := range len(good) - 1 {
		bad[fmt.Sprintf("truncated at %d", n)] = struct {
			data  []byte
			count int
		}{good[:n], len(got)}
	}
	for name, c := range bad {
		work := slices.Clone(base)
		out, err := ApplyChanges(work[:0], work, c.data, c.count)
		if err == nil {
			t.Errorf("%s: no error", name)
			continue
		}
		if len(out) != 0 || !eventsEqual(work, base) {
			t.Errorf("%s: a rejected answer changed the events", name)
		}
	}
}

// fuzzEvents makes events and a mutation of them from the fuzzer's input.
func fuzzEvents(seed uint64, ops []byte) (sent, got []flow.Event) {
	r := rand.New(rand.NewPCG(seed, seed>>7))
	n := 0
	if len(ops) > 0 {
		n = int(ops[0]) % 40
		ops = ops[1:]
	}
	sent = sample(n, r)
	other := sample(n+1, r)
	var zero flow.Event
	got = slices.Clone(sent)
	for len(ops) >= 2 && len(got) > 0 {
		i, op := int(ops[0])%len(got), ops[1]
		ops = ops[2:]
		f := int(op>>2) % numFields
		switch op & 3 {
		case 0:
			copyField(&got[i], f, &other[i])
		case 1:
			copyField(&got[i], f, &zero)
		case 2:
			got = slices.Delete(got, i, i+1)
		case 3:
			copyField(&got[i], f, &got[(i+1)%len(got)])
		}
	}
	return sent, got
}

// FuzzChanges: a random batch, a random enrichment of it (fields set, cleared or copied,
// events dropped); applying its changes gives the enriched batch exactly.
func FuzzChanges(f *testing.F) {
	f.Add(uint64(1), []byte{10, 0, 4, 1, 5, 2, 6, 3, 7})
	f.Add(uint64(2), []byte{39, 1, 2, 1, 2, 1, 2, 5, 88, 7, 1})
	f.Add(uint64(3), []byte{})
	f.Fuzz(func(t *testing.T, seed uint64, ops []byte) {
		sent, got := fuzzEvents(seed, ops)
		checkChanges(t, sent, got)
	})
}

// FuzzApplyChanges: any bytes as an answer are applied whole or rejected, never a panic,
// and a rejected answer changes nothing.
func FuzzApplyChanges(f *testing.F) {
	sent, got := fuzzEvents(4, []byte{12, 1, 9, 2, 66, 3, 20, 4, 1})
	good, _ := AppendChanges(nil, sent, got)
	f.Add(good, len(got))
	f.Add(good[:len(good)/2], len(got))
	f.Fuzz(func(t *testing.T, data []byte, count int) {
		work := slices.Clone(sent)
		out, err := ApplyChanges(work[:0], work, data, count)
		if err != nil {
			if len(out) != 0 || !eventsEqual(work, sent) {
				t.Fatal("a rejected answer changed the events")
			}
			return
		}
		if len(out) != count {
			t.Fatalf("%d events applied, the answer said %d", len(out), count)
		}
	})
}

func BenchmarkChanges(b *testing.B) {
	sent := typical(1024)
	got := slices.Clone(sent)
	for i := range got {
		got[i].CommunityID = "1:hA7Xq9k3u8wYF1c2o5xL0Tn3bE4="
	}
	data, _ := AppendChanges(nil, sent, got)
	b.Run("append", func(b *testing.B) {
		buf := make([]byte, 0, 2*len(data))
		for b.Loop() {
			buf, _ = AppendChanges(buf[:0], sent, got)
		}
		b.SetBytes(int64(len(data)))
	})
	b.Run("check", func(b *testing.B) {
		for b.Loop() {
			if err := walkChanges(nil, sent, data, len(got)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("apply", func(b *testing.B) {
		// Applied where the events are, as the host does; applying again gives the same.
		work := slices.Clone(sent)
		for b.Loop() {
			if _, err := ApplyChanges(work[:0], work, data, len(got)); err != nil {
				b.Fatal(err)
			}
		}
		b.SetBytes(int64(len(data)))
	})
}

// ChangesSize bounds every answer: the largest change is every field of an event.
func TestChangesSize(t *testing.T) {
	r := rand.New(rand.NewPCG(12, 13))
	sent := make([]flow.Event, 300) // all zero: every field of got differs
	got := sample(300, r)
	for i := range got {
		got[i].SrcAddr = netip.MustParseAddr("fe80::1%a-long-zone-name")
		got[i].RxPackets, got[i].RxBytes, got[i].TxPackets, got[i].TxBytes = ^uint64(0), ^uint64(0), ^uint64(0), ^uint64(0)
		got[i].NumStarts, got[i].NumEnds, got[i].NumDrops = ^uint64(0), ^uint64(0), ^uint64(0)
		got[i].Reconstructed, got[i].ICMPCode = true, 1
	}
	for _, g := range [][]flow.Event{got, got[:1], got[:0], got[:150]} {
		data, _ := AppendChanges(nil, sent, g)
		if len(data) > ChangesSize(g) {
			t.Fatalf("%d events: %d bytes, ChangesSize said at most %d", len(g), len(data), ChangesSize(g))
		}
	}
}
