package flowwire

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/flowpipe/flowpipe/core/flow"
	pb "github.com/flowpipe/flowpipe/proto/flow"
)

func sampleEvents() []flow.Event {
	ids := flow.NewIDGen()
	ts := flow.Time(time.Date(2026, 11, 26, 4, 30, 0, 123456789, time.UTC).UnixNano())
	return []flow.Event{
		{
			EventID: ids.New(), FlowID: ids.New(), Timestamp: ts, Type: flow.TypeStart,
			Direction: flow.Egress, Protocol: flow.ProtoTCP,
			SrcAddr: netip.MustParseAddr("100.64.0.1"), DstAddr: netip.MustParseAddr("100.64.0.2"),
			SrcPort: 40000, DstPort: 443, RxPackets: 3, TxPackets: 4, RxBytes: 300, TxBytes: 4000,
			RuleID: "rule-1", SrcResourceID: "res-a", DstResourceID: "res-b",
		},
		{
			EventID: ids.New(), FlowID: ids.New(), Timestamp: ts + 1, Type: flow.TypeEnd,
			Direction: flow.Ingress, Protocol: flow.ProtoICMPv6,
			SrcAddr: netip.MustParseAddr("fd00::1"), DstAddr: netip.MustParseAddr("fd00::2"),
			ICMPType: 128, ICMPCode: 0,
		},
		{
			EventID: ids.New(), FlowID: ids.New(), Timestamp: ts + 2, Type: flow.TypeDrop,
			Protocol: flow.ProtoUDP, SrcAddr: netip.MustParseAddr("10.0.0.1"), DstAddr: netip.MustParseAddr("10.0.0.2"),
			DstPort: 53,
		},
		{
			EventID: ids.New(), FlowID: ids.New(), Timestamp: ts + 3, Type: flow.TypeAggregate,
			Protocol: flow.ProtoTCP, WindowStart: ts - 60e9, WindowEnd: ts,
			NumStarts: 10, NumEnds: 9, NumDrops: 1, RxBytes: 1 << 40,
		},
		{EventID: ids.New()}, // everything unknown: no timestamp, no addresses
	}
}

// toPB builds the generated message for e, independently of AppendEvent.
func toPB(e *flow.Event, key []byte) *pb.FlowEvent {
	ts := func(t flow.Time) *timestamppb.Timestamp {
		if t == 0 {
			return nil
		}
		return timestamppb.New(t.Time())
	}
	addr := func(a netip.Addr) []byte {
		if !a.IsValid() {
			return nil
		}
		return a.AsSlice()
	}
	typ := map[flow.Type]pb.Type{flow.TypeStart: pb.Type_TYPE_START, flow.TypeEnd: pb.Type_TYPE_END, flow.TypeDrop: pb.Type_TYPE_DROP}[e.Type]
	ff := &pb.FlowFields{
		FlowId: e.FlowID[:], Type: typ, RuleId: []byte(e.RuleID), Direction: pb.Direction(e.Direction),
		Protocol: uint32(e.Protocol), SourceIp: addr(e.SrcAddr), DestIp: addr(e.DstAddr),
		RxPackets: e.RxPackets, TxPackets: e.TxPackets, RxBytes: e.RxBytes, TxBytes: e.TxBytes,
		SourceResourceId: []byte(e.SrcResourceID), DestResourceId: []byte(e.DstResourceID),
	}
	if flow.IsICMP(e.Protocol) {
		ff.ConnectionInfo = &pb.FlowFields_IcmpInfo{IcmpInfo: &pb.ICMPInfo{IcmpType: uint32(e.ICMPType), IcmpCode: uint32(e.ICMPCode)}}
	} else {
		ff.ConnectionInfo = &pb.FlowFields_PortInfo{PortInfo: &pb.PortInfo{SourcePort: uint32(e.SrcPort), DestPort: uint32(e.DstPort)}}
	}
	m := &pb.FlowEvent{EventId: e.EventID[:], Timestamp: ts(e.Timestamp), PublicKey: key, FlowFields: ff}
	ff.NumOfStarts, ff.NumOfEnds, ff.NumOfDrops = e.NumStarts, e.NumEnds, e.NumDrops
	m.WindowStart, m.WindowEnd = ts(e.WindowStart), ts(e.WindowEnd)
	return m
}

func TestAppendEventMatchesGeneratedCode(t *testing.T) {
	key := []byte("peer-public-key-32-bytes-long...")
	for i, e := range sampleEvents() {
		got := AppendEvent(nil, &e, key)
		var dec pb.FlowEvent
		if err := proto.Unmarshal(got, &dec); err != nil {
			t.Fatalf("event %d: generated code cannot decode our encoding: %v", i, err)
		}
		if want := toPB(&e, key); !proto.Equal(&dec, want) {
			t.Errorf("event %d:\n got %v\nwant %v", i, &dec, want)
		}
	}
}

func TestDecodeEventFromGeneratedCode(t *testing.T) {
	key := []byte("k")
	for i, e := range sampleEvents() {
		b, err := proto.Marshal(toPB(&e, key))
		if err != nil {
			t.Fatal(err)
		}
		var m Message
		if err := DecodeEvent(b, &m); err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if m.Initiator || !bytes.Equal(m.PublicKey, key) {
			t.Errorf("event %d: initiator %v key %q", i, m.Initiator, m.PublicKey)
		}
		if m.Event != e {
			t.Errorf("event %d:\n got %+v\nwant %+v", i, m.Event, e)
		}
	}
}

func TestInitiatorAndAck(t *testing.T) {
	var m Message
	if err := DecodeEvent(AppendInitiator(nil), &m); err != nil || !m.Initiator {
		t.Fatalf("initiator: %v %+v", err, m)
	}
	b, _ := proto.Marshal(&pb.FlowEvent{IsInitiator: true})
	if !bytes.Equal(b, AppendInitiator(nil)) {
		t.Errorf("initiator encoding %x, generated %x", AppendInitiator(nil), b)
	}
	id := uuid.New()
	b, _ = proto.Marshal(&pb.FlowEventAck{EventId: id[:]})
	if !bytes.Equal(b, AppendAck(nil, id)) {
		t.Errorf("ack encoding %x, generated %x", AppendAck(nil, id), b)
	}
	got, init, err := DecodeAck(b)
	if err != nil || init || got != id {
		t.Errorf("DecodeAck = %v %v %v", got, init, err)
	}
	b, _ = proto.Marshal(&pb.FlowEventAck{IsInitiator: true})
	if !bytes.Equal(b, AppendInitiatorAck(nil)) {
		t.Errorf("initiator ack encoding %x, generated %x", AppendInitiatorAck(nil), b)
	}
	if _, init, err := DecodeAck(b); err != nil || !init {
		t.Errorf("DecodeAck(initiator) = %v %v", init, err)
	}
	if _, _, err := DecodeAck(nil); err == nil {
		t.Error("empty ack accepted")
	}
}

func TestDecodeEventRejects(t *testing.T) {
	good := toPB(&sampleEvents()[0], nil)
	cases := map[string]func(m *pb.FlowEvent){
		"no event_id":        func(m *pb.FlowEvent) { m.EventId = nil },
		"short event_id":     func(m *pb.FlowEvent) { m.EventId = []byte{1, 2, 3} },
		"3-byte source_ip":   func(m *pb.FlowEvent) { m.FlowFields.SourceIp = []byte{1, 2, 3} },
		"port above 65535":   func(m *pb.FlowEvent) { m.FlowFields.GetPortInfo().DestPort = 70000 },
		"protocol above 255": func(m *pb.FlowEvent) { m.FlowFields.Protocol = 300 },
		"bad flow_id":        func(m *pb.FlowEvent) { m.FlowFields.FlowId = []byte{1} },
		"negative nanos":     func(m *pb.FlowEvent) { m.Timestamp.Nanos = -1 },
		"icmp type above 255": func(m *pb.FlowEvent) {
			m.FlowFields.ConnectionInfo = &pb.FlowFields_IcmpInfo{IcmpInfo: &pb.ICMPInfo{IcmpType: 256}}
		},
	}
	for name, mutate := range cases {
		m := proto.Clone(good).(*pb.FlowEvent)
		mutate(m)
		b, _ := proto.Marshal(m)
		var got Message
		if err := DecodeEvent(b, &got); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err = %v, want ErrMalformed", name, err)
		}
	}
	var got Message
	if err := DecodeEvent([]byte{0x0a, 0x10, 1}, &got); !errors.Is(err, ErrMalformed) {
		t.Errorf("truncated: err = %v", err)
	}
}

func TestUnknownFieldsAreSkipped(t *testing.T) {
	e := sampleEvents()[0]
	b := AppendEvent(nil, &e, nil)
	b = append(b, 0xa0, 0x06, 0x01)             // field 100, varint 1
	b = append(b, 0xaa, 0x06, 0x02, 0x41, 0x42) // field 101, bytes "AB"
	var m Message
	if err := DecodeEvent(b, &m); err != nil || m.Event != e {
		t.Fatalf("err %v, event %+v", err, m.Event)
	}
}

func FuzzDecodeEvent(f *testing.F) {
	for _, e := range sampleEvents() {
		f.Add(AppendEvent(nil, &e, []byte("key")))
	}
	f.Add(AppendInitiator(nil))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var m Message
		err := DecodeEvent(b, &m)
		if err != nil || m.Initiator {
			return
		}
		// What we accept, the generated code accepts too, and re-encoding is stable.
		var ref pb.FlowEvent
		if perr := proto.Unmarshal(b, &ref); perr != nil {
			t.Fatalf("DecodeEvent accepted what protobuf rejects (%v): %x", perr, b)
		}
		again := AppendEvent(nil, &m.Event, m.PublicKey)
		var m2 Message
		if err := DecodeEvent(again, &m2); err != nil {
			t.Fatalf("re-encoding does not decode: %v", err)
		}
		if m2.Event != m.Event {
			t.Fatalf("round trip changed the event:\n%+v\n%+v", m.Event, m2.Event)
		}
	})
}

func BenchmarkAppendEvent(b *testing.B) {
	e := sampleEvents()[0]
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendEvent(buf[:0], &e, nil)
	}
}

func BenchmarkDecodeEvent(b *testing.B) {
	e := sampleEvents()[0]
	buf := AppendEvent(nil, &e, nil)
	var m Message
	b.ReportAllocs()
	for b.Loop() {
		if err := DecodeEvent(buf, &m); err != nil {
			b.Fatal(err)
		}
	}
}
