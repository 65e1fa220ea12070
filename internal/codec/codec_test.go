package codec

import (
	"math/rand/v2"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/google/uuid"
	"google.golang.org/protobuf/proto"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec/pbevent"
)

// sample returns n events covering every field and address form.
func sample(n int, r *rand.Rand) []flow.Event {
	addrs := []netip.Addr{
		{},
		netip.MustParseAddr("10.1.2.3"),
		netip.MustParseAddr("fd00::1"),
		netip.MustParseAddr("::ffff:192.0.2.1"),
		netip.MustParseAddr("fe80::1%eth0"),
	}
	rules := []string{"", "rule-allow-web", "rule-deny-all"}
	evs := make([]flow.Event, n)
	for i := range evs {
		e := &evs[i]
		e.EventID = uuid.New()
		e.FlowID = uuid.New()
		e.Timestamp = flow.Time(r.Int64())
		e.Start = flow.Time(-r.Int64N(1 << 40))
		e.End = flow.Time(r.Int64N(1 << 50))
		e.SrcAddr = addrs[r.IntN(len(addrs))]
		e.DstAddr = addrs[r.IntN(len(addrs))]
		e.SrcPort = uint16(r.Uint32())
		e.DstPort = uint16(r.Uint32())
		e.Type = flow.Type(r.IntN(5))
		e.Direction = flow.Direction(r.IntN(3))
		e.Protocol = uint8(r.Uint32())
		e.ICMPType = uint8(r.Uint32())
		e.ICMPCode = uint8(r.Uint32())
		e.RxPackets, e.RxBytes, e.TxPackets, e.TxBytes = r.Uint64(), r.Uint64N(1<<20), r.Uint64N(100), r.Uint64N(1<<30)
		e.RuleID = rules[r.IntN(len(rules))]
		e.SrcResourceID = "res-" + strings.Repeat("x", r.IntN(4))
		e.CommunityID = "1:abc="
		e.DstResourceID = rules[r.IntN(len(rules))]
		e.Source = "conntrack"
		e.WindowStart, e.WindowEnd = flow.Time(r.Int64()), flow.Time(-1)
		e.NumStarts, e.NumEnds, e.NumDrops = r.Uint64(), 1, r.Uint64N(3)
		e.Reconstructed = r.IntN(4) == 0
	}
	return evs
}

func TestRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 7, 1000} {
		in := sample(n, r)
		data := Append(nil, in)
		if len(data) > Size(in) {
			t.Fatalf("n=%d: encoded %d bytes, Size said at most %d", n, len(data), Size(in))
		}
		prefix := []flow.Event{{Source: "already there"}}
		out, err := Decode(prefix, data, n)
		if err != nil {
			t.Fatalf("n=%d: %v", n, err)
		}
		if len(out) != n+1 || out[0].Source != "already there" {
			t.Fatalf("n=%d: Decode did not append to dst", n)
		}
		if n > 0 && !reflect.DeepEqual(out[1:], in) {
			for i := range in {
				if !reflect.DeepEqual(out[i+1], in[i]) {
					t.Fatalf("n=%d: event %d differs:\n got %+v\nwant %+v", n, i, out[i+1], in[i])
				}
			}
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	good := Append(nil, sample(3, rand.New(rand.NewPCG(3, 4))))
	cases := map[string]struct {
		data  []byte
		count int
		want  string
	}{
		"empty":        {nil, 0, "empty"},
		"version":      {append([]byte{9}, good[1:]...), 3, "unknown batch encoding version 9"},
		"too many":     {good, 4, "event 3: truncated"},
		"too few":      {good, 2, "bytes after the last"},
		"truncated":    {good[:len(good)-3], 3, "event 2"},
		"huge count":   {good, 1 << 30, "cannot fit"},
		"negative":     {good, -1, "cannot fit"},
		"bad addr tag": {badTag(good), 3, "bad address tag"},
	}
	for name, c := range cases {
		_, err := Decode(nil, c.data, c.count)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error containing %q", name, err, c.want)
		}
	}
}

// badTag corrupts the first event's source address tag (after the version byte and the
// fixed part).
func badTag(good []byte) []byte {
	b := append([]byte(nil), good...)
	b[1+fixedSize] = 99
	return b
}

func FuzzDecode(f *testing.F) {
	r := rand.New(rand.NewPCG(5, 6))
	for _, n := range []int{0, 1, 2} {
		f.Add(Append(nil, sample(n, r)), n)
	}
	f.Add([]byte{1}, 1)
	f.Fuzz(func(t *testing.T, data []byte, count int) {
		evs, err := Decode(nil, data, count)
		if err != nil {
			return
		}
		// Whatever decodes must survive a round trip unchanged.
		again, err := Decode(nil, Append(nil, evs), len(evs))
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if len(evs) > 0 && !reflect.DeepEqual(again, evs) {
			t.Fatalf("round trip changed events")
		}
	})
}

// BenchmarkEncoding compares the packed encoding with one protobuf message per event, both
// ways (encode on one side, decode on the other), for a batch of 1000 typical events.
func BenchmarkEncoding(b *testing.B) {
	evs := sample(1000, rand.New(rand.NewPCG(7, 8)))
	b.Run("packed", func(b *testing.B) {
		var buf []byte
		out := make([]flow.Event, 0, len(evs))
		b.ReportAllocs()
		for b.Loop() {
			buf = Append(buf[:0], evs)
			var err error
			if out, err = Decode(out[:0], buf, len(evs)); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(len(buf))/float64(len(evs)), "bytes/event")
		b.ReportMetric(float64(b.N*len(evs))/b.Elapsed().Seconds(), "events/s")
	})
	b.Run("protobuf-per-event", func(b *testing.B) {
		var buf []byte
		out := make([]flow.Event, 0, len(evs))
		b.ReportAllocs()
		for b.Loop() {
			msg := &pbevent.Events{Events: make([]*pbevent.Event, len(evs))}
			for i := range evs {
				msg.Events[i] = toPB(&evs[i])
			}
			var err error
			if buf, err = (proto.MarshalOptions{}).MarshalAppend(buf[:0], msg); err != nil {
				b.Fatal(err)
			}
			var back pbevent.Events
			if err := proto.Unmarshal(buf, &back); err != nil {
				b.Fatal(err)
			}
			out = out[:0]
			for _, p := range back.Events {
				out = append(out, fromPB(p))
			}
		}
		b.ReportMetric(float64(len(buf))/float64(len(evs)), "bytes/event")
		b.ReportMetric(float64(b.N*len(evs))/b.Elapsed().Seconds(), "events/s")
	})
}

func toPB(e *flow.Event) *pbevent.Event {
	src, _ := e.SrcAddr.MarshalBinary()
	dst, _ := e.DstAddr.MarshalBinary()
	return &pbevent.Event{
		EventId: e.EventID[:], FlowId: e.FlowID[:],
		Timestamp: int64(e.Timestamp), Start: int64(e.Start), End: int64(e.End),
		SrcAddr: src, DstAddr: dst, SrcPort: uint32(e.SrcPort), DstPort: uint32(e.DstPort),
		Type: uint32(e.Type), Direction: uint32(e.Direction), Protocol: uint32(e.Protocol),
		IcmpType: uint32(e.ICMPType), IcmpCode: uint32(e.ICMPCode),
		RxPackets: e.RxPackets, RxBytes: e.RxBytes, TxPackets: e.TxPackets, TxBytes: e.TxBytes,
		RuleId: e.RuleID, SrcResourceId: e.SrcResourceID, DstResourceId: e.DstResourceID,
		CommunityId: e.CommunityID, Source: e.Source,
		WindowStart: int64(e.WindowStart), WindowEnd: int64(e.WindowEnd),
		NumStarts: e.NumStarts, NumEnds: e.NumEnds, NumDrops: e.NumDrops,
	}
}

func fromPB(p *pbevent.Event) flow.Event {
	var e flow.Event
	e.EventID = uuid.UUID(p.EventId)
	e.FlowID = uuid.UUID(p.FlowId)
	e.Timestamp, e.Start, e.End = flow.Time(p.Timestamp), flow.Time(p.Start), flow.Time(p.End)
	_ = e.SrcAddr.UnmarshalBinary(p.SrcAddr)
	_ = e.DstAddr.UnmarshalBinary(p.DstAddr)
	e.SrcPort, e.DstPort = uint16(p.SrcPort), uint16(p.DstPort)
	e.Type, e.Direction, e.Protocol = flow.Type(p.Type), flow.Direction(p.Direction), uint8(p.Protocol)
	e.ICMPType, e.ICMPCode = uint8(p.IcmpType), uint8(p.IcmpCode)
	e.RxPackets, e.RxBytes, e.TxPackets, e.TxBytes = p.RxPackets, p.RxBytes, p.TxPackets, p.TxBytes
	e.RuleID, e.SrcResourceID, e.DstResourceID, e.CommunityID, e.Source = p.RuleId, p.SrcResourceId, p.DstResourceId, p.CommunityId, p.Source
	e.WindowStart, e.WindowEnd = flow.Time(p.WindowStart), flow.Time(p.WindowEnd)
	e.NumStarts, e.NumEnds, e.NumDrops = p.NumStarts, p.NumEnds, p.NumDrops
	return e
}

// typical are events like the generate and conntrack sources make: no enrichment strings.
func typical(n int) []flow.Event {
	evs := sample(n, rand.New(rand.NewPCG(9, 10)))
	for i := range evs {
		e := &evs[i]
		e.SrcAddr, e.DstAddr = netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), netip.MustParseAddr("192.0.2.1")
		e.Timestamp, e.Start, e.End = flow.Time(1_700_000_000_000_000_000+int64(i)), flow.Time(1_700_000_000_000_000_000), 0
		e.RxPackets, e.RxBytes, e.TxPackets, e.TxBytes = uint64(i%100), uint64(i*1500), 3, 4000
		e.RuleID, e.SrcResourceID, e.DstResourceID, e.CommunityID, e.Source = "", "", "", "", "gen"
		e.WindowStart, e.WindowEnd, e.NumStarts, e.NumEnds, e.NumDrops = 0, 0, 0, 0, 0
	}
	return evs
}

func BenchmarkAppend(b *testing.B) {
	evs := typical(1024)
	var buf []byte
	for b.Loop() {
		buf = Append(buf[:0], evs)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(evs)), "ns/event")
	b.ReportMetric(float64(len(buf))/float64(len(evs)), "bytes/event")
}

func BenchmarkDecode(b *testing.B) {
	evs := typical(1024)
	buf := Append(nil, evs)
	out := make([]flow.Event, 0, len(evs))
	for b.Loop() {
		var err error
		if out, err = Decode(out[:0], buf, len(evs)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(evs)), "ns/event")
}

// TestSampleCoversEveryField guards the round trip test: a field added to flow.Event that
// the sample never sets (and the codec might not carry) fails here.
func TestSampleCoversEveryField(t *testing.T) {
	evs := sample(1000, rand.New(rand.NewPCG(11, 12)))
	typ := reflect.TypeFor[flow.Event]()
	for i := range typ.NumField() {
		set := false
		for j := range evs {
			if !reflect.ValueOf(evs[j]).Field(i).IsZero() {
				set = true
				break
			}
		}
		if !set {
			t.Errorf("sample never sets flow.Event.%s: set it there and carry it in the codec", typ.Field(i).Name)
		}
	}
}

// AppendPart cuts a batch into parts that each fit the limit (but for a single event that
// alone exceeds it) and that decode, in order, to the batch.
func TestAppendPart(t *testing.T) {
	evs := sample(500, rand.New(rand.NewPCG(13, 14)))
	evs[7].RuleID = strings.Repeat("r", 3000) // one event larger than the limit
	const limit = 2000
	var got []flow.Event
	parts := 0
	for rest := evs; len(rest) > 0; parts++ {
		buf, n := AppendPart([]byte("x"), rest, limit)
		if buf[0] != 'x' || n < 1 {
			t.Fatalf("part %d: prefix lost or no event encoded (n %d)", parts, n)
		}
		if len(buf)-1 > limit && n != 1 {
			t.Fatalf("part %d: %d events in %d bytes, over the limit of %d", parts, n, len(buf)-1, limit)
		}
		if whole := Append(nil, rest[:n]); string(whole) != string(buf[1:]) {
			t.Fatalf("part %d differs from Append of its events", parts)
		}
		var err error
		if got, err = Decode(got, buf[1:], n); err != nil {
			t.Fatal(err)
		}
		rest = rest[n:]
	}
	if parts < 10 || !reflect.DeepEqual(got, evs) {
		t.Fatalf("%d parts; decoded equal: %v", parts, reflect.DeepEqual(got, evs))
	}
	if all, n := AppendPart(nil, evs, -1); n != len(evs) || string(all) != string(Append(nil, evs)) {
		t.Fatal("AppendPart without a limit differs from Append")
	}
}

// TestValidate: Validate accepts what Decode accepts and rejects what it rejects, with the
// same error, says whether every event names its source, and allocates nothing.
func TestValidate(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	good := Append(nil, sample(3, r))
	for name, c := range map[string]struct {
		data  []byte
		count int
	}{
		"good": {good, 3}, "empty": {nil, 0}, "version": {append([]byte{9}, good[1:]...), 3},
		"too many": {good, 4}, "too few": {good, 2}, "truncated": {good[:len(good)-3], 3},
		"huge count": {good, 1 << 30}, "negative": {good, -1}, "bad addr tag": {badTag(good), 3},
	} {
		_, verr := Validate(c.data, c.count)
		_, derr := Decode(nil, c.data, c.count)
		if (verr == nil) != (derr == nil) || (verr != nil && verr.Error() != derr.Error()) {
			t.Errorf("%s: Validate says %v, Decode %v", name, verr, derr)
		}
	}
	evs := sample(5, r)
	if sourced, err := Validate(Append(nil, evs), 5); err != nil || !sourced {
		t.Fatalf("every event named its source: sourced %v, %v", sourced, err)
	}
	evs[3].Source = ""
	if sourced, err := Validate(Append(nil, evs), 5); err != nil || sourced {
		t.Fatalf("event 3 names no source: sourced %v, %v", sourced, err)
	}
	big := Append(nil, sample(1000, r))
	if a := testing.AllocsPerRun(10, func() { _, _ = Validate(big, 1000) }); a != 0 {
		t.Fatalf("Validate allocated %v times", a)
	}
}

// FuzzValidate: Validate and Decode agree on every input.
func FuzzValidate(f *testing.F) {
	r := rand.New(rand.NewPCG(9, 10))
	for _, n := range []int{0, 1, 2, 5} {
		f.Add(Append(nil, sample(n, r)), n)
	}
	f.Add([]byte{Version}, 0)
	f.Add(badTag(Append(nil, sample(2, r))), 2)
	f.Fuzz(func(t *testing.T, data []byte, count int) {
		sourced, verr := Validate(data, count)
		evs, derr := Decode(nil, data, count)
		if (verr == nil) != (derr == nil) || (verr != nil && verr.Error() != derr.Error()) {
			t.Fatalf("Validate says %v, Decode %v", verr, derr)
		}
		if derr != nil {
			return
		}
		all := true
		for i := range evs {
			all = all && evs[i].Source != ""
		}
		if sourced != all {
			t.Fatalf("Validate says sourced %v, the events %v", sourced, all)
		}
	})
}

func BenchmarkValidate(b *testing.B) {
	evs := typical(1024)
	buf := Append(nil, evs)
	for b.Loop() {
		if _, err := Validate(buf, len(evs)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(evs)), "ns/event")
}
