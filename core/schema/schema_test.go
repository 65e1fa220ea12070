package schema

import (
	"bufio"
	"bytes"
	"encoding/json"
	"math"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/flow"
)

// field is one line of a vendored field list.
type field struct {
	typ     string
	allowed map[string]bool // nil: any value
}

func loadFields(t *testing.T, path string) map[string]field {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]field{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		parts := strings.Fields(line)
		fd := field{typ: parts[1]}
		if len(parts) > 2 {
			rest := strings.TrimSpace(line[strings.Index(line, parts[1])+len(parts[1]):])
			fd.allowed = map[string]bool{}
			for _, v := range strings.Split(rest, ",") {
				fd.allowed[strings.TrimSpace(v)] = true
			}
		}
		out[parts[0]] = fd
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// sample is one event of every kind the mappings treat differently.
func sample() []flow.Event {
	ids := flow.NewIDGen()
	t0 := flow.TimeOf(time.Date(2026, 11, 26, 4, 30, 21, 120_000_000, time.UTC))
	t1 := t0 + flow.Time(7718*time.Millisecond)
	base := flow.Event{Timestamp: t1, Start: t0, End: t1, Protocol: flow.ProtoTCP, Direction: flow.Egress,
		SrcAddr: netip.MustParseAddr("10.0.0.19"), DstAddr: netip.MustParseAddr("203.0.113.71"), SrcPort: 56872, DstPort: 443,
		TxPackets: 10, TxBytes: 1250, RxPackets: 12, RxBytes: 9120, Source: "kernel"}
	var evs []flow.Event
	add := func(f func(e *flow.Event)) {
		e := base
		e.EventID, e.FlowID = ids.New(), ids.New()
		f(&e)
		evs = append(evs, e)
	}
	add(func(e *flow.Event) {
		e.Type, e.End, e.TxPackets, e.TxBytes, e.RxPackets, e.RxBytes = flow.TypeStart, 0, 0, 0, 0, 0
	})
	add(func(e *flow.Event) {
		e.Type, e.RuleID, e.SrcResourceID, e.DstResourceID = flow.TypeEnd, "rule-7", "res-a", "res-web"
		e.CommunityID = "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
		e.TxBytes = 1 << 40 // above 2^32
	})
	add(func(e *flow.Event) {
		e.Type, e.Direction, e.Protocol = flow.TypeEnd, flow.Ingress, flow.ProtoUDP
		e.SrcAddr, e.DstAddr = netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")
		e.Reconstructed = true
	})
	add(func(e *flow.Event) {
		e.Type, e.Protocol, e.SrcPort, e.DstPort, e.ICMPType, e.ICMPCode = flow.TypeDrop, flow.ProtoICMP, 0, 0, 8, 0
		e.Direction, e.RuleID = flow.DirectionUnknown, "deny-all"
	})
	add(func(e *flow.Event) {
		e.Type, e.Protocol, e.ICMPType, e.ICMPCode = flow.TypeEnd, flow.ProtoICMPv6, 128, 0
		e.SrcAddr, e.DstAddr = netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2")
	})
	add(func(e *flow.Event) {
		e.Type, e.WindowStart, e.WindowEnd = flow.TypeAggregate, t0, t0+flow.Time(time.Minute)
		e.NumStarts, e.NumEnds, e.NumDrops = 3, 2, 1
	})
	add(func(e *flow.Event) { e.Type, e.Protocol = flow.TypeEnd, flow.ProtoSCTP })
	return evs
}

// flatten turns a decoded document into dotted paths; an object below stop (e.g. unmapped)
// stays one value.
func flatten(prefix string, v any, out map[string]any, stop map[string]bool) {
	m, ok := v.(map[string]any)
	if !ok || stop[prefix] {
		out[prefix] = v
		return
	}
	for k, sub := range m {
		p := k
		if prefix != "" {
			p = prefix + "." + k
		}
		flatten(p, sub, out, stop)
	}
}

func decode(t *testing.T, line []byte) map[string]any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber()
	var doc map[string]any
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, line)
	}
	return doc
}

func integer(v any, lo, hi float64) bool {
	n, ok := v.(json.Number)
	if !ok {
		return false
	}
	i, err := strconv.ParseInt(n.String(), 10, 64)
	return err == nil && float64(i) >= lo && float64(i) <= hi
}

// typeOK checks a value against an ECS or OCSF data type.
func typeOK(typ string, v any) bool {
	switch typ {
	case "keyword", "string_t":
		_, ok := v.(string)
		return ok
	case "long", "long_t", "timestamp_t":
		return integer(v, math.MinInt64, math.MaxInt64)
	case "integer_t":
		return integer(v, math.MinInt32, math.MaxInt32)
	case "port_t":
		return integer(v, 0, 65535)
	case "ip", "ip_t":
		s, ok := v.(string)
		if !ok {
			return false
		}
		_, err := netip.ParseAddr(s)
		return err == nil
	case "date":
		s, ok := v.(string)
		if !ok {
			return false
		}
		_, err := time.Parse(time.RFC3339Nano, s)
		return err == nil
	case "object_t":
		_, ok := v.(map[string]any)
		return ok
	}
	return false
}

func checkAgainst(t *testing.T, f Format, list string, custom string, stop map[string]bool) {
	fields := loadFields(t, list)
	seen := map[string]bool{}
	enc := Encoder{Format: f}
	for _, e := range sample() {
		line := enc.Append(nil, &e)
		flat := map[string]any{}
		flatten("", decode(t, line), flat, stop)
		for path, v := range flat {
			if custom != "" && strings.HasPrefix(path, custom+".") {
				continue
			}
			fd, ok := fields[path]
			if !ok {
				t.Errorf("%s %s event: %s is not in %s", f, e.Type, path, list)
				continue
			}
			seen[path] = true
			vals := []any{v}
			if arr, isArr := v.([]any); isArr && fd.typ == "keyword" { // ECS: any field may hold an array
				vals = arr
			}
			for _, v := range vals {
				if !typeOK(fd.typ, v) {
					t.Errorf("%s %s event: %s = %v (%T), want ECS/OCSF type %s", f, e.Type, path, v, v, fd.typ)
				}
				if fd.allowed != nil && !fd.allowed[strings.TrimSpace(toString(v))] {
					t.Errorf("%s %s event: %s = %v, not an allowed value", f, e.Type, path, v)
				}
			}
		}
	}
	var unused []string
	for p := range fields {
		if !seen[p] {
			unused = append(unused, p)
		}
	}
	sort.Strings(unused)
	if len(unused) > 0 {
		t.Errorf("%s: listed fields the mapping never wrote: %v", f, unused)
	}
}

func toString(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case json.Number:
		return v.String()
	}
	return ""
}

func TestECSFieldsAreECS(t *testing.T) {
	checkAgainst(t, ECS, "testdata/ecs-8.11-fields.txt", "flowpipe", nil)
}

func TestOCSFFieldsAreOCSF(t *testing.T) {
	checkAgainst(t, OCSF, "testdata/ocsf-1.1-network-activity.txt", "", map[string]bool{"unmapped": true})
}

// get returns the value at a dotted path of a decoded document.
func get(doc map[string]any, path string) any {
	var v any = doc
	for _, k := range strings.Split(path, ".") {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[k]
	}
	if n, ok := v.(json.Number); ok {
		return n.String()
	}
	return v
}

func expect(t *testing.T, doc map[string]any, want map[string]any) {
	t.Helper()
	for path, w := range want {
		got := get(doc, path)
		if gs, ok := got.([]any); ok {
			got = strings.Trim(strings.Join(strings.Fields(strings.Trim(strings.ReplaceAll(strings.ReplaceAll(toJSON(gs), `"`, ""), ",", " "), "[]")), ","), " ")
		}
		if w == nil {
			if got != nil {
				t.Errorf("%s = %v, want absent", path, got)
			}
			continue
		}
		if got != w {
			t.Errorf("%s = %v, want %v", path, got, w)
		}
	}
}

func toJSON(v any) string { b, _ := json.Marshal(v); return string(b) }

// The values, not only the names: each mapping carries every field of the event where the
// documentation says it does.
func TestECSValues(t *testing.T) {
	evs := sample()
	enc := Encoder{Format: ECS}
	end := decode(t, enc.Append(nil, &evs[1]))
	expect(t, end, map[string]any{
		"@timestamp": "2026-11-26T04:30:28.838000000Z", "ecs.version": ECSVersion,
		"event.kind": "event", "event.category": "network", "event.type": "connection,end", "event.action": "flow-end",
		"event.id": evs[1].EventID.String(), "event.start": "2026-11-26T04:30:21.120000000Z", "event.end": "2026-11-26T04:30:28.838000000Z",
		"event.duration": "7718000000", "event.dataset": "flowpipe.flow", "event.provider": "kernel", "event.outcome": nil,
		// egress: the host is the source; it sent tx.
		"source.ip": "10.0.0.19", "source.port": "56872", "source.bytes": strconv.FormatUint(1<<40, 10), "source.packets": "10",
		"destination.ip": "203.0.113.71", "destination.port": "443", "destination.bytes": "9120", "destination.packets": "12",
		"network.transport": "tcp", "network.iana_number": "6", "network.type": "ipv4", "network.direction": "egress",
		"network.community_id": "1:LQU9qZlK+B5F3KDmev6m5PMibrg=", "network.bytes": strconv.FormatUint(1<<40+9120, 10), "network.packets": "22",
		"rule.id": "rule-7", "flowpipe.flow_id": evs[1].FlowID.String(), "flowpipe.src_resource_id": "res-a", "flowpipe.dst_resource_id": "res-web",
	})
	in := decode(t, enc.Append(nil, &evs[2]))
	// ingress: the remote initiator is the source; what it sent the host received.
	expect(t, in, map[string]any{"source.ip": "2001:db8::1", "source.bytes": "9120", "source.packets": "12", "destination.bytes": "1250",
		"network.type": "ipv6", "network.direction": "ingress", "network.transport": "udp", "flowpipe.reconstructed": true, "rule": nil})
	drop := decode(t, enc.Append(nil, &evs[3]))
	expect(t, drop, map[string]any{"event.type": "connection,denied", "event.outcome": "failure", "source.port": nil,
		"flowpipe.icmp_type": "8", "flowpipe.icmp_code": "0", "network.transport": "icmp", "network.direction": "unknown", "rule.id": "deny-all"})
	agg := decode(t, enc.Append(nil, &evs[5]))
	expect(t, agg, map[string]any{"event.type": "connection,info", "event.start": "2026-11-26T04:30:21.120000000Z",
		"event.end": "2026-11-26T04:31:21.120000000Z", "flowpipe.num_starts": "3", "flowpipe.num_ends": "2", "flowpipe.num_drops": "1"})
	start := decode(t, enc.Append(nil, &evs[0]))
	expect(t, start, map[string]any{"event.type": "connection,start", "event.end": nil, "event.duration": nil})
}

func TestOCSFValues(t *testing.T) {
	evs := sample()
	enc := Encoder{Format: OCSF}
	end := decode(t, enc.Append(nil, &evs[1]))
	t0 := strconv.FormatInt(time.Date(2026, 11, 26, 4, 30, 21, 120_000_000, time.UTC).UnixMilli(), 10)
	t1 := strconv.FormatInt(time.Date(2026, 11, 26, 4, 30, 28, 838_000_000, time.UTC).UnixMilli(), 10)
	expect(t, end, map[string]any{
		"class_uid": "4001", "category_uid": "4", "activity_id": "2", "activity_name": "Close", "type_uid": "400102",
		"type_name": "Network Activity: Close", "severity_id": "1", "time": t1, "start_time": t0, "end_time": t1, "duration": "7718",
		"metadata.version": OCSFVersion, "metadata.uid": evs[1].EventID.String(), "metadata.product.name": "flowpipe",
		"src_endpoint.ip": "10.0.0.19", "src_endpoint.port": "56872", "src_endpoint.uid": "res-a",
		"dst_endpoint.ip": "203.0.113.71", "dst_endpoint.port": "443", "dst_endpoint.uid": "res-web",
		"connection_info.uid": evs[1].FlowID.String(), "connection_info.protocol_num": "6", "connection_info.protocol_name": "tcp",
		"connection_info.protocol_ver_id": "4", "connection_info.direction_id": "2", "connection_info.direction": "Outbound",
		"connection_info.community_uid": "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
		"traffic.bytes_out":             strconv.FormatUint(1<<40, 10), "traffic.packets_out": "10", "traffic.bytes_in": "9120", "traffic.packets_in": "12",
		"traffic.bytes": strconv.FormatUint(1<<40+9120, 10), "traffic.packets": "22", "firewall_rule.uid": "rule-7", "unmapped.source": "kernel",
	})
	expect(t, decode(t, enc.Append(nil, &evs[0])), map[string]any{"activity_id": "1", "type_uid": "400101", "end_time": nil})
	expect(t, decode(t, enc.Append(nil, &evs[2])), map[string]any{"connection_info.direction_id": "1", "connection_info.protocol_ver_id": "6",
		"traffic.bytes_out": "9120", "traffic.bytes_in": "1250", "unmapped.reconstructed": true})
	expect(t, decode(t, enc.Append(nil, &evs[3])), map[string]any{"activity_id": "5", "activity_name": "Refuse", "src_endpoint.port": nil,
		"unmapped.icmp_type": "8", "connection_info.direction_id": "0"})
	expect(t, decode(t, enc.Append(nil, &evs[5])), map[string]any{"activity_id": "6", "count": "6", "unmapped.num_ends": "2",
		"end_time": strconv.FormatInt(time.Date(2026, 11, 26, 4, 31, 21, 120_000_000, time.UTC).UnixMilli(), 10)})
}

func TestFlowpipeFormatIsAppendJSON(t *testing.T) {
	enc := Encoder{}
	for _, e := range sample() {
		if got, want := enc.Append(nil, &e), flow.AppendJSON(nil, &e); !bytes.Equal(got, want) {
			t.Fatalf("flowpipe format differs from flow.AppendJSON:\n%s\n%s", got, want)
		}
	}
}

func TestParse(t *testing.T) {
	for _, n := range []string{"flowpipe", "ecs", "ocsf"} {
		f, ok := Parse(n)
		if !ok || f.String() != n {
			t.Errorf("Parse(%q) = %v, %v", n, f, ok)
		}
	}
	if _, ok := Parse("cef"); ok {
		t.Error("Parse accepted cef")
	}
}

// Strings with quotes, control characters and invalid UTF-8 stay valid JSON in every format.
func TestEscaping(t *testing.T) {
	e := sample()[1]
	e.RuleID, e.Source, e.DstResourceID = "a\"b\\c\n", "\x01\xff", "ü"
	for _, f := range []Format{Flowpipe, ECS, OCSF} {
		enc := Encoder{Format: f}
		if line := enc.Append(nil, &e); !json.Valid(line) {
			t.Errorf("%s: invalid JSON: %s", f, line)
		}
	}
	_ = uuid.Nil
}

func BenchmarkAppend(b *testing.B) {
	evs := sample()
	for _, f := range []Format{Flowpipe, ECS, OCSF} {
		b.Run(f.String(), func(b *testing.B) {
			enc := Encoder{Format: f}
			buf := make([]byte, 0, 4096)
			b.ReportAllocs()
			for i := range b.N {
				buf = enc.Append(buf[:0], &evs[i%len(evs)])
			}
		})
	}
}
