package flow

import (
	"encoding/json"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/google/uuid"
)

func sampleEvents() []Event {
	ids := NewIDGen()
	ts := TimeOf(time.Date(2026, 11, 26, 4, 18, 45, 123456789, time.UTC))
	return []Event{
		{
			EventID: ids.New(), FlowID: ids.New(), Type: TypeEnd, Timestamp: ts, Start: ts - 5e9, End: ts,
			Direction: Egress, Protocol: ProtoTCP,
			SrcAddr: netip.MustParseAddr("10.0.0.1"), DstAddr: netip.MustParseAddr("198.51.100.7"),
			SrcPort: 40000, DstPort: 443, RxPackets: 10, RxBytes: 5000, TxPackets: 8, TxBytes: 900,
			RuleID: "rule-1", SrcResourceID: "", DstResourceID: "res-\"quoted\"\n", CommunityID: "1:abc=", Source: "ct",
			Reconstructed: true,
		},
		{
			EventID: ids.New(), FlowID: ids.New(), Type: TypeStart, Timestamp: ts, Direction: Ingress,
			Protocol: ProtoICMPv6, SrcAddr: netip.MustParseAddr("2001:db8::1"), DstAddr: netip.MustParseAddr("fd00::2"),
			ICMPType: 128, ICMPCode: 0, Source: "us",
		},
		{
			EventID: ids.New(), FlowID: ids.New(), Type: TypeAggregate, Timestamp: ts, Protocol: ProtoUDP,
			SrcAddr: netip.MustParseAddr("10.0.0.1"), DstAddr: netip.MustParseAddr("10.0.0.53"), DstPort: 53,
			WindowStart: ts - 60e9, WindowEnd: ts, NumStarts: 3, NumEnds: 2, NumDrops: 1, TxBytes: 1 << 40,
			RuleID: "ünïcode ✓", Source: "agg",
		},
		{EventID: ids.New(), FlowID: ids.New(), Type: TypeDrop, Timestamp: ts, Protocol: 47, // GRE: no ports
			SrcAddr: netip.MustParseAddr("192.0.2.1"), DstAddr: netip.MustParseAddr("192.0.2.2"), RuleID: "deny-all"},
	}
}

func TestJSONRoundTrip(t *testing.T) {
	for i, e := range sampleEvents() {
		line := AppendJSON(nil, &e)
		if !json.Valid(line) {
			t.Fatalf("event %d: invalid JSON: %s", i, line)
		}
		var back Event
		if err := ParseJSON(line, &back); err != nil {
			t.Fatalf("event %d: parse %s: %v", i, line, err)
		}
		if back != e {
			t.Errorf("event %d: round trip changed the event:\n got %+v\nwant %+v", i, back, e)
		}
	}
}

func TestJSONKeys(t *testing.T) {
	evs := sampleEvents()
	keys := func(e Event) []string {
		var m map[string]any
		if err := json.Unmarshal(AppendJSON(nil, &e), &m); err != nil {
			t.Fatal(err)
		}
		var out []string
		for k := range m {
			out = append(out, k)
		}
		return out
	}
	has := func(ks []string, k string) bool {
		for _, x := range ks {
			if x == k {
				return true
			}
		}
		return false
	}
	tcp := keys(evs[0])
	for _, k := range []string{"event_id", "flow_id", "type", "timestamp", "start", "end", "direction", "protocol", "src_ip", "dst_ip", "src_port", "dst_port", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rule_id", "src_resource_id", "dst_resource_id", "community_id", "source"} {
		if !has(tcp, k) {
			t.Errorf("TCP event lacks %q", k)
		}
	}
	for _, k := range []string{"icmp_type", "icmp_code", "window_start", "num_starts"} {
		if has(tcp, k) {
			t.Errorf("TCP event has %q", k)
		}
	}
	icmp := keys(evs[1])
	for _, k := range []string{"src_port", "dst_port", "start", "end", "community_id"} {
		if has(icmp, k) {
			t.Errorf("ICMPv6 start event has %q", k)
		}
	}
	if !has(icmp, "icmp_type") || !has(icmp, "icmp_code") {
		t.Errorf("ICMPv6 event lacks icmp_type/icmp_code: %v", icmp)
	}
	agg := keys(evs[2])
	for _, k := range []string{"window_start", "window_end", "num_starts", "num_ends", "num_drops"} {
		if !has(agg, k) {
			t.Errorf("aggregate lacks %q", k)
		}
	}
}

func TestEncoderReusesSecondsCorrectly(t *testing.T) {
	var enc Encoder
	base := TimeOf(time.Date(2026, 11, 26, 23, 59, 59, 0, time.UTC))
	for _, d := range []Time{0, 1, 999_999_999, 1_000_000_000, 1_000_000_001, -1, 86400e9} {
		got := string(enc.appendTime(nil, base+d))
		want := (base + d).Time().Format("2006-01-02T15:04:05.000000000Z")
		if got != want {
			t.Errorf("%d: got %s want %s", d, got, want)
		}
	}
}

func TestAppendTimeMatchesTimeFormat(t *testing.T) {
	for _, tm := range []time.Time{
		time.Date(1970, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(2000, 2, 29, 23, 59, 59, 999999999, time.UTC),
		time.Date(2026, 11, 26, 4, 18, 45, 1, time.UTC),
		time.Date(2100, 3, 1, 12, 0, 0, 500, time.UTC),
		time.Date(1969, 12, 31, 23, 59, 59, 999999999, time.UTC),
	} {
		got := string(AppendTime(nil, TimeOf(tm)))
		want := tm.Format("2006-01-02T15:04:05.000000000Z")
		if tm.Unix() == 0 && tm.Nanosecond() == 0 {
			want = "1970-01-01T00:00:00.000000000Z"
		}
		if got != want {
			t.Errorf("AppendTime(%v) = %s, want %s", tm, got, want)
		}
	}
}

func TestParseJSONErrorsNameTheKey(t *testing.T) {
	good := string(AppendJSON(nil, &sampleEvents()[0]))
	cases := map[string]string{
		strings.Replace(good, `"type":"end"`, `"type":"finish"`, 1):              "type",
		strings.Replace(good, `"src_ip":"10.0.0.1"`, `"src_ip":"10.0.0.300"`, 1): "src_ip",
		strings.Replace(good, `"protocol":6`, `"protocol":600`, 1):               "protocol",
		strings.Replace(good, `"rule_id"`, `"rule"`, 1):                          "rule",
		`{"flow_id":"` + uuid.NewString() + `"}`:                                 "event_id",
		strings.Replace(good, `"timestamp":"2026`, `"timestamp":"26`, 1):         "timestamp",
	}
	for line, key := range cases {
		var e Event
		err := ParseJSON([]byte(line), &e)
		if err == nil {
			t.Errorf("no error for a bad %s: %s", key, line)
			continue
		}
		if !strings.Contains(err.Error(), key) {
			t.Errorf("error for a bad %s does not name it: %v", key, err)
		}
	}
}

// The queued cost of an event is its size: events are stored by value in batches.
func TestEventSizeBudget(t *testing.T) {
	if s := unsafe.Sizeof(Event{}); s > 320 {
		t.Fatalf("flow.Event is %d bytes; the budget is 320", s)
	}
}

func FuzzParseJSON(f *testing.F) {
	for _, e := range sampleEvents() {
		f.Add(AppendJSON(nil, &e))
	}
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"event_id":1}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		var e Event
		if ParseJSON(line, &e) != nil {
			return
		}
		// Whatever parses must survive a round trip through the writer.
		out := AppendJSON(nil, &e)
		var back Event
		if err := ParseJSON(out, &back); err != nil {
			t.Fatalf("re-parse of %s: %v", out, err)
		}
		if back != e {
			t.Fatalf("round trip changed %+v into %+v", e, back)
		}
	})
}

func BenchmarkAppendJSON(b *testing.B) {
	evs := sampleEvents()
	buf := make([]byte, 0, 1024)
	var enc Encoder
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		buf = enc.AppendJSON(buf[:0], &evs[i%2])
	}
	b.SetBytes(int64(len(buf)))
}

func BenchmarkIDGen(b *testing.B) {
	g := NewIDGen()
	b.ReportAllocs()
	for b.Loop() {
		_ = g.New()
	}
}

func BenchmarkUUIDNew(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		_ = uuid.New()
	}
}

// The hand-written address formatting writes what netip does, for every shape of zero runs.
func TestAppendAddrMatchesNetip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	check := func(a netip.Addr) {
		want := `"` + a.String() + `"`
		if !a.IsValid() {
			want = `""`
		}
		if got := string(appendAddr(nil, a)); got != want {
			t.Fatalf("%s: got %s, want %s", a, got, want)
		}
	}
	check(netip.Addr{})
	check(netip.MustParseAddr("fe80::1%eth0"))
	check(netip.MustParseAddr("::ffff:1.2.3.4"))
	for range 200000 {
		var b [16]byte
		for i := range b {
			if r.IntN(3) == 0 { // mostly zero groups, in runs of every length
				b[i] = byte(r.Uint32() >> uint(r.IntN(8)))
			}
		}
		check(netip.AddrFrom16(b))
		check(netip.AddrFrom4([4]byte(b[:4])))
	}
}

// The UUID formatting writes what uuid.UUID.String does, for random IDs and every hex digit
// in every position.
func TestAppendUUIDMatchesString(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	check := func(u uuid.UUID) {
		if got, want := string(AppendUUID(nil, u)), u.String(); got != want {
			t.Fatalf("got %s, want %s", got, want)
		}
	}
	for range 100000 {
		var u uuid.UUID
		for i := range u {
			u[i] = byte(r.Uint32())
		}
		check(u)
	}
	for b := range 256 {
		var u uuid.UUID
		for i := range u {
			u[i] = byte(b)
		}
		check(u)
	}
}
