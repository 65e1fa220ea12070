package communityid

import (
	"context"
	"net/netip"
	"testing"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// vector is one published Community ID test vector. For ICMP, sport and dport are the ICMP
// type and code as they appear in the packet (before the spec's port mapping).
type vector struct {
	seed         uint16
	proto        uint8
	src, dst     string
	sport, dport uint16
	want         string
}

// specTables are the "Sample results" tables of the spec's baseline/README.md
// (github.com/corelight/community-id-spec, baseline/README.md at commit c4ec2bc4,
// "Default settings" and "A custom seed=1 value").
var specTables = []vector{
	{0, 6, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:wCb3OG7yAFWelaUydu0D+125CLM="},
	{0, 6, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:wCb3OG7yAFWelaUydu0D+125CLM="},
	{0, 17, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg="},
	{0, 17, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg="},
	{0, 132, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8="},
	{0, 132, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:EKt4MsxuyaE6mL+hmrEkQ9csDD8="},
	{0, 1, "1.2.3.4", "5.6.7.8", 8, 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0="},
	{0, 1, "5.6.7.8", "1.2.3.4", 0, 0, "1:crodRHL2FEsHjbv3UkRrfbs4bZ0="},
	{0, 1, "1.2.3.4", "5.6.7.8", 11, 0, "1:f/YiSyWqczrTgfUCZlBUnvHRcPk="},
	{0, 58, "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", 128, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo="},
	{0, 58, "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", 129, 0, "1:0bf7hyMJUwt3fMED7z8LIfRpBeo="},
	{0, 58, "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", 146, 0, "1:fYC8+pz24E+EhANP1EZhpX0Dw10="},
	{0, 46, "1.2.3.4", "5.6.7.8", 0, 0, "1:ikv3kmf89luf73WPz1jOs49S768="},
	{0, 46, "5.6.7.8", "1.2.3.4", 0, 0, "1:ikv3kmf89luf73WPz1jOs49S768="},
	{0, 46, "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", 0, 0, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0="},
	{0, 46, "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", 0, 0, "1:wQ/2mwrnXP4lmJcHdGL5ePjR+e0="},

	{1, 6, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="},
	{1, 6, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="},
	{1, 17, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:OShq+iKDAMVouh/4bMxB9Sz4amw="},
	{1, 17, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:OShq+iKDAMVouh/4bMxB9Sz4amw="},
	{1, 132, "1.2.3.4", "5.6.7.8", 1122, 3344, "1:uitchpn5MMGAQKBJh7bIr/bAr7s="},
	{1, 132, "5.6.7.8", "1.2.3.4", 3344, 1122, "1:uitchpn5MMGAQKBJh7bIr/bAr7s="},
	{1, 1, "1.2.3.4", "5.6.7.8", 8, 0, "1:9pr4ZGTICiuZoIh90RRYE2RyXpU="},
	{1, 1, "5.6.7.8", "1.2.3.4", 0, 0, "1:9pr4ZGTICiuZoIh90RRYE2RyXpU="},
	{1, 1, "1.2.3.4", "5.6.7.8", 11, 0, "1:1DD7cWGC/Yg91YGsQeni8du3pIA="},
	{1, 58, "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", 128, 0, "1:IO27GQzPuCtNnwFvjWALMHu5tJE="},
	{1, 58, "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", 129, 0, "1:IO27GQzPuCtNnwFvjWALMHu5tJE="},
	{1, 58, "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", 146, 0, "1:Cv4IKJe56BNkF0MBW2YxQ3Nwc3s="},
	{1, 46, "1.2.3.4", "5.6.7.8", 0, 0, "1:/buhqeOmaRCopOZFy9HnoJd5XW8="},
	{1, 46, "5.6.7.8", "1.2.3.4", 0, 0, "1:/buhqeOmaRCopOZFy9HnoJd5XW8="},
	{1, 46, "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", 0, 0, "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM="},
	{1, 46, "fe80:1011:1213:1415:1617:1819:1A1B:1C1D", "fe80:0001:0203:0405:0607:0809:0A0B:0C0D", 0, 0, "1:j6EyyfBzL4vWKHFXgUqb5Az3OxM="},
}

// specPcapBaseline is baseline/baseline_deflt.json of the same repository and commit: the IDs
// pycommunityid computes for the flows of pcaps/combined.pcap.gz with seed 0. That file
// lists ICMP rows after the port mapping; here they carry the packet's type and code instead
// (for a type with a counterpart the code does not enter the hash, so it is 0; for a one-way
// type the mapped "port" is the code itself).
var specPcapBaseline = []vector{
	{0, 58, "fe80::200:86ff:fe05:80da", "fe80::260:97ff:fe07:69ea", 135, 0, "1:dGHyGvjMfljg6Bppwm3bg0LO8TY="},
	{0, 58, "fe80::260:97ff:fe07:69ea", "fe80::200:86ff:fe05:80da", 136, 0, "1:dGHyGvjMfljg6Bppwm3bg0LO8TY="},
	{0, 58, "fe80::260:97ff:fe07:69ea", "fe80::200:86ff:fe05:80da", 135, 0, "1:zavyT/cezQr1fmImYCwYnMXbgck="},
	{0, 58, "fe80::200:86ff:fe05:80da", "fe80::260:97ff:fe07:69ea", 136, 0, "1:zavyT/cezQr1fmImYCwYnMXbgck="},
	{0, 58, "3ffe:501:1800:2345::2", "3ffe:507:0:1:200:86ff:fe05:80da", 3, 0, "1:2ObVBgIn28oZvibYZhZMBgh7WdQ="},
	{0, 58, "3ffe:501:410:0:2c0:dfff:fe47:33e", "3ffe:507:0:1:200:86ff:fe05:80da", 1, 4, "1:hLZd0XGWojozrvxqE0dWB1iM6R0="},
	{0, 58, "3ffe:507:0:1:200:86ff:fe05:80da", "3ffe:501:0:1001::2", 128, 0, "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg="},
	{0, 58, "3ffe:501:0:1001::2", "3ffe:507:0:1:200:86ff:fe05:80da", 129, 0, "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg="},
	{0, 58, "fe80::200:86ff:fe05:80da", "ff02::2", 133, 0, "1:hO+sN4H+MG5MY/8hIrXPqc4ZQz0="},
	{0, 58, "fe80::260:97ff:fe07:69ea", "ff02::1", 134, 0, "1:pkvHqCL88/tg1k4cPigmZXUtL00="},
	{0, 1, "192.168.0.89", "192.168.0.1", 8, 0, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="},
	{0, 1, "192.168.0.1", "192.168.0.89", 0, 0, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="},
	{0, 1, "10.0.0.1", "10.0.0.2", 11, 0, "1:YHxtAirCG//0OzkcVAukqKQN9xM="},
	{0, 6, "2001:470:e5bf:dead:4957:2174:e82c:4887", "2607:f8b0:400c:c03::1a", 63943, 25, "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="},
	{0, 6, "2607:f8b0:400c:c03::1a", "2001:470:e5bf:dead:4957:2174:e82c:4887", 25, 63943, "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="},
	{0, 132, "192.168.170.8", "192.168.170.56", 7, 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="},
	{0, 132, "192.168.170.56", "192.168.170.8", 7, 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="},
	{0, 6, "128.232.110.120", "66.35.250.204", 34855, 80, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="},
	{0, 6, "66.35.250.204", "128.232.110.120", 80, 34855, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="},
	{0, 17, "192.168.1.52", "8.8.8.8", 54585, 53, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="},
	{0, 17, "8.8.8.8", "192.168.1.52", 53, 54585, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="},
	{0, 46, "10.1.12.1", "10.1.12.2", 0, 0, "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw="},
	{0, 46, "10.1.12.2", "10.1.12.1", 0, 0, "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw="},
}

func (v vector) event() flow.Event {
	ev := flow.Event{
		Protocol: v.proto,
		SrcAddr:  netip.MustParseAddr(v.src),
		DstAddr:  netip.MustParseAddr(v.dst),
	}
	if flow.IsICMP(v.proto) {
		ev.ICMPType, ev.ICMPCode = uint8(v.sport), uint8(v.dport)
	} else {
		ev.SrcPort, ev.DstPort = v.sport, v.dport
	}
	return ev
}

func TestSpecVectors(t *testing.T) {
	for name, vs := range map[string][]vector{"tables": specTables, "pcap_baseline": specPcapBaseline} {
		for i, v := range vs {
			ev := v.event()
			if got := ForEvent(v.seed, &ev); got != v.want {
				t.Errorf("%s[%d] seed=%d proto=%d %s:%d -> %s:%d: got %s, want %s",
					name, i, v.seed, v.proto, v.src, v.sport, v.dst, v.dport, got, v.want)
			}
		}
	}
}

func TestEdgeCases(t *testing.T) {
	a4, b4 := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	a6 := netip.MustParseAddr("fd00::1")
	if got := V1(0, 6, a4, a6, 1, 2); got != "" {
		t.Errorf("mixed families: got %q, want empty", got)
	}
	if got := V1(0, 6, netip.Addr{}, a4, 1, 2); got != "" {
		t.Errorf("missing source address: got %q, want empty", got)
	}
	// An IPv4-mapped IPv6 address is hashed as the IPv4 flow it carries.
	mapped := netip.AddrFrom16(a4.As16())
	if got, want := V1(0, 6, mapped, b4, 1, 2), V1(0, 6, a4, b4, 1, 2); got != want {
		t.Errorf("IPv4-mapped: got %s, want %s", got, want)
	}
	// Same address both ends: the ports decide the order, so both directions agree.
	if x, y := V1(0, 17, a4, a4, 5000, 53), V1(0, 17, a4, a4, 53, 5000); x != y {
		t.Errorf("equal addresses: %s != %s", x, y)
	}
	// A one-way ICMP message keeps its direction.
	if x, y := ICMP(0, 1, a4, b4, 3, 1), ICMP(0, 1, b4, a4, 3, 1); x == y {
		t.Errorf("one-way ICMP hashed the same both ways: %s", x)
	}
}

func TestEnrichKeepsSourceIDUnlessOverwrite(t *testing.T) {
	f := Factory()
	for _, tc := range []struct {
		opts map[string]any
		want string
	}{
		{map[string]any{}, "keep-me"},
		{map[string]any{"overwrite": true}, "1:wCb3OG7yAFWelaUydu0D+125CLM="},
		{map[string]any{"overwrite": true, "seed": 1}, "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="},
	} {
		cfg := f.NewConfig()
		if errs := config.Decode(tc.opts, cfg, ""); len(errs) > 0 {
			t.Fatal(errs)
		}
		c, err := f.New(component.Env{Name: "cid", Metrics: component.NopMetrics{}}, cfg)
		if err != nil {
			t.Fatal(err)
		}
		evs := []flow.Event{specTables[0].event(), specTables[0].event()}
		evs[0].CommunityID = "keep-me"
		b := flow.NewBatch(evs, nil)
		if err := c.(component.Enricher).Enrich(context.Background(), b); err != nil {
			t.Fatal(err)
		}
		if b.Events[0].CommunityID != tc.want {
			t.Errorf("%v: preset ID became %q, want %q", tc.opts, b.Events[0].CommunityID, tc.want)
		}
		seed, _ := tc.opts["seed"].(int)
		if want := V1(uint16(seed), 6, b.Events[1].SrcAddr, b.Events[1].DstAddr, 1122, 3344); b.Events[1].CommunityID != want {
			t.Errorf("%v: unset ID became %q, want %q", tc.opts, b.Events[1].CommunityID, want)
		}
	}
}

func BenchmarkCommunityID(b *testing.B) {
	ev := specPcapBaseline[13].event() // TCP over IPv6, the largest input
	b.ReportAllocs()
	for b.Loop() {
		_ = ForEvent(0, &ev)
	}
}
