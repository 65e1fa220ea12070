package ipfix

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
)

// recording reads testdata/recording.jsonl, a file-sink recording of every kind of event
// the sink treats differently (IPv4 and IPv6, TCP, UDP, ICMP, ICMPv6, start, end, drop,
// aggregate, counters above 2^32), as the replay source would.
func recording(t testing.TB) []flow.Event {
	t.Helper()
	return componenttest.ReadJSONLines(t, "testdata/recording.jsonl")
}

// exported is the subset of the recording a sink with these event types sends, in order.
func exported(evs []flow.Event, types string) []flow.Event {
	set, _ := parseEvents(types)
	var out []flow.Event
	for _, e := range evs {
		if set[e.Type] {
			out = append(out, e)
		}
	}
	return out
}

func testEnv(m component.Metrics) component.Env {
	if m == nil {
		m = component.NopMetrics{}
	}
	return component.Env{Name: "ipfix", Kind: component.KindSink, Type: "ipfix", Logger: slog.Default(), Metrics: m}
}

func newSink(t testing.TB, mod func(c *Config), m component.Metrics) *Sink {
	t.Helper()
	c := defaults()
	mod(c)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := New(testEnv(m), c)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	return s
}

// checkRecord compares every element of a decoded record with the event it came from.
func checkRecord(t *testing.T, r record, e *flow.Event, pen uint32) {
	t.Helper()
	errorf := func(format string, args ...any) {
		t.Helper()
		t.Errorf("event %s (%s %s→%s): "+format, append([]any{e.EventID, e.Type, e.SrcAddr, e.DstAddr}, args...)...)
	}
	v6 := e.SrcAddr.Is6()
	srcID, dstID, icmpID := uint16(ieSourceIPv4Address), uint16(ieDestinationIPv4Address), uint16(ieICMPTypeCodeIPv4)
	if v6 {
		srcID, dstID, icmpID = ieSourceIPv6Address, ieDestinationIPv6Address, ieICMPTypeCodeIPv6
	}
	if got := r.addr(srcID); got != e.SrcAddr {
		errorf("source address %s", got)
	}
	if got := r.addr(dstID); got != e.DstAddr {
		errorf("destination address %s", got)
	}
	if got := r.uint(0, ieSourceTransportPort); got != uint64(e.SrcPort) {
		errorf("source port %d", got)
	}
	if got := r.uint(0, ieDestinationTransportPort); got != uint64(e.DstPort) {
		errorf("destination port %d", got)
	}
	if got := r.uint(0, ieProtocolIdentifier); got != uint64(e.Protocol) {
		errorf("protocol %d", got)
	}
	if got := r.uint(0, icmpID); got != uint64(e.ICMPType)<<8|uint64(e.ICMPCode) {
		errorf("icmp type/code %#x", got)
	}
	if got := r.uint(0, ieFlowDirection); got != uint64(direction(e.Direction)) {
		errorf("flowDirection %d", got)
	}
	if got := r.uint(0, ieFlowStartMilliseconds); got != uint64(startOf(e)/1e6) {
		errorf("flowStartMilliseconds %d", got)
	}
	sp, sb := e.SrcCounters()
	dp, db := e.DstCounters()
	switch e.Type {
	case flow.TypeEnd, flow.TypeAggregate:
		octets, packets, reason := uint16(ieOctetTotalCount), uint16(iePacketTotalCount), uint64(reasonEndOfFlow)
		if e.Type == flow.TypeAggregate {
			octets, packets, reason = ieOctetDeltaCount, iePacketDeltaCount, reasonActiveTimeout
		}
		if got := r.uint(0, ieFlowEndMilliseconds); got != uint64(endOf(e)/1e6) {
			errorf("flowEndMilliseconds %d", got)
		}
		if got := r.uint(0, ieFlowEndReason); got != reason {
			errorf("flowEndReason %d", got)
		}
		for _, c := range []struct {
			name string
			key  fieldKey
			want uint64
		}{{"octets", fieldKey{0, octets}, sb}, {"packets", fieldKey{0, packets}, sp},
			{"reverse octets", fieldKey{reversePEN, octets}, db}, {"reverse packets", fieldKey{reversePEN, packets}, dp}} {
			if got := r.uint(c.key.pen, c.key.id); got != c.want {
				errorf("%s %d, want %d", c.name, got, c.want)
			}
			if len(r.values[c.key]) != 8 {
				errorf("%s is %d bytes, want 8", c.name, len(r.values[c.key]))
			}
		}
	case flow.TypeStart:
		if _, ok := r.values[fieldKey{0, ieOctetTotalCount}]; ok {
			errorf("a start record carries counters")
		}
	}
	if pen != 0 {
		for id, want := range map[uint16]string{ieRuleID: e.RuleID, ieSrcResourceID: e.SrcResourceID, ieDstResourceID: e.DstResourceID} {
			if got := string(r.values[fieldKey{pen, id}]); got != want {
				errorf("enterprise element %d = %q, want %q", id, got, want)
			}
		}
	} else if len(r.values) != len(templateOf(r.template).fields) {
		errorf("unexpected elements")
	}
}

func templateOf(id uint16) template {
	for _, t := range templates(0) {
		if t.id == id {
			return t
		}
	}
	return template{}
}

// Over UDP: every datagram fits the MTU, templates come first, sequence numbers count the
// data records before each message, and every element of every record reads back.
func TestUDPRoundTripEveryElement(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	const mtu = 576
	s := newSink(t, func(c *Config) {
		c.Address, c.MTU, c.ObservationDomainID, c.EnterpriseNumber, c.Events = pc.LocalAddr().String(), mtu, 4242, 64999, "start,end,aggregate"
	}, nil)
	rec := recording(t)
	var batch []flow.Event
	for range 20 { // enough records for several datagrams
		batch = append(batch, rec...)
	}
	if err := s.Write(context.Background(), flow.NewBatch(batch, nil)); err != nil {
		t.Fatal(err)
	}
	want := exported(batch, "start,end,aggregate")
	d := newDecoder()
	var got []record
	var seq uint32
	buf := make([]byte, 65536)
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for len(got) < len(want) {
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("after %d of %d records: %v", len(got), len(want), err)
		}
		if n > mtu-48 {
			t.Fatalf("datagram of %d bytes exceeds mtu %d", n, mtu)
		}
		m, rest, err := d.message(buf[:n])
		if err != nil || len(rest) != 0 {
			t.Fatalf("decode: %v (%d bytes left)", err, len(rest))
		}
		if m.header.domain != 4242 {
			t.Fatalf("observation domain %d", m.header.domain)
		}
		if m.header.seq != seq {
			t.Fatalf("sequence %d, want %d", m.header.seq, seq)
		}
		seq += uint32(m.header.dataRecords)
		got = append(got, m.records...)
	}
	for i := range want {
		checkRecord(t, got[i], &want[i], 64999)
	}
}

func TestEventsOptionFiltersAndCounts(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	m := &componenttest.Metrics{}
	s := newSink(t, func(c *Config) { c.Address, c.Events = pc.LocalAddr().String(), "end" }, m)
	rec := recording(t)
	if err := s.Write(context.Background(), flow.NewBatch(rec, nil)); err != nil {
		t.Fatal(err)
	}
	want := exported(rec, "end")
	if got := m.FilteredCount("ipfix_event_type"); got != len(rec)-len(want) {
		t.Errorf("filtered %d, want %d", got, len(rec)-len(want))
	}
	d := newDecoder()
	buf := make([]byte, 65536)
	var got []record
	pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for len(got) < len(want) {
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		msg, _, err := d.message(buf[:n])
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, msg.records...)
	}
	for i := range want {
		checkRecord(t, got[i], &want[i], 0)
	}
}

func TestValidate(t *testing.T) {
	c := defaults()
	c.Address, c.Transport, c.MTU, c.Events, c.CAFile, c.CertFile = "nohost", "sctp", 100, "end,drop", "ca.pem", "c.pem"
	err := c.Validate()
	for _, want := range []string{`address: want host:port, got "nohost"`, `transport: unknown transport "sctp"`,
		"mtu: 100 is out of range", `events: unknown event type "drop"`, "cert_file: cert_file and key_file go together",
		"ca_file, cert_file and server_name need transport: tls"} {
		if err == nil || !contains(err.Error(), want) {
			t.Errorf("error %v does not say %q", err, want)
		}
	}
}

func contains(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && (s[:len(sub)] == sub || contains(s[1:], sub)))
}

// Over UDP the templates are sent at start and again every template_refresh, with no batch
// needed: a collector that restarted learns them without waiting for traffic.
func TestUDPTemplatesRefreshOnTimer(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	newSink(t, func(c *Config) { c.Address, c.TemplateRefresh = pc.LocalAddr().String(), 200*time.Millisecond }, nil)
	buf := make([]byte, 65536)
	pc.SetReadDeadline(time.Now().Add(20 * time.Second))
	for i := range 3 { // at start, then twice on the timer
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("template message %d: %v", i+1, err)
		}
		m, _, err := newDecoder().message(buf[:n])
		if err != nil || m.header.templateSets != 1 || m.header.dataRecords != 0 {
			t.Fatalf("message %d is not a template message: %+v %v", i+1, m, err)
		}
	}
}
