package tap

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
)

func ev(src, dst string, sport, dport uint16, proto uint8, ty flow.Type) flow.Event {
	return flow.Event{
		SrcAddr: netip.MustParseAddr(src), DstAddr: netip.MustParseAddr(dst),
		SrcPort: sport, DstPort: dport, Protocol: proto, Type: ty, Direction: flow.Egress,
		RuleID: "r1", SrcResourceID: "a", DstResourceID: "b", TxBytes: 100, RxBytes: 50, TxPackets: 2, RxPackets: 1,
	}
}

func TestFilterMatch(t *testing.T) {
	tcp := ev("10.1.2.3", "192.0.2.1", 40000, 443, flow.ProtoTCP, flow.TypeStart)
	udp := ev("fd00::1", "2001:db8::53", 5353, 53, flow.ProtoUDP, flow.TypeEnd)
	icmp := ev("10.9.9.9", "192.0.2.1", 0, 0, flow.ProtoICMP, flow.TypeDrop)
	for _, c := range []struct {
		groups []string
		want   [3]bool // tcp, udp, icmp
	}{
		{nil, [3]bool{true, true, true}},
		{[]string{"src=10.0.0.0/8"}, [3]bool{true, false, true}},
		{[]string{"ip=192.0.2.1"}, [3]bool{true, false, true}},
		{[]string{"dst=2001:db8::/32"}, [3]bool{false, true, false}},
		{[]string{"port=443"}, [3]bool{true, false, false}},
		{[]string{"!port=443"}, [3]bool{false, true, true}},
		{[]string{"port=0"}, [3]bool{false, false, false}}, // ICMP has no ports
		{[]string{"dst-port=53,443"}, [3]bool{true, true, false}},
		{[]string{"src-port=5353"}, [3]bool{false, true, false}},
		{[]string{"proto=udp"}, [3]bool{false, true, false}},
		{[]string{"proto=1"}, [3]bool{false, false, true}},
		{[]string{"type=drop"}, [3]bool{false, false, true}},
		{[]string{"direction=ingress"}, [3]bool{false, false, false}},
		{[]string{"rule=r1 resource=b"}, [3]bool{true, true, true}},
		{[]string{"src-resource=b"}, [3]bool{false, false, false}},
		{[]string{"src=10.0.0.0/8 proto=tcp"}, [3]bool{true, false, false}},             // AND
		{[]string{"src=10.0.0.0/8 proto=tcp", "proto=udp"}, [3]bool{true, true, false}}, // OR
		{[]string{"src=10.0.0.0/8 !type=start"}, [3]bool{false, false, true}},
	} {
		f, err := ParseFilter(c.groups)
		if err != nil {
			t.Fatalf("%q: %v", c.groups, err)
		}
		for i, e := range []flow.Event{tcp, udp, icmp} {
			if got := f.Match(&e); got != c.want[i] {
				t.Errorf("%q on event %d: %v, want %v", c.groups, i, got, c.want[i])
			}
		}
		// The string form parses back to the same filter.
		g, err := ParseFilter(f.Strings())
		if err != nil || strings.Join(g.Strings(), "|") != strings.Join(f.Strings(), "|") {
			t.Errorf("%q: round trip %q (%v)", c.groups, g.Strings(), err)
		}
	}
}

func TestFilterErrors(t *testing.T) {
	for in, want := range map[string]string{
		"src=10.0.0.300":  "src=10.0.0.300: want an IP address or CIDR prefix",
		"port=70000":      "port=70000: want a port number",
		"proto=gre2":      "proto=gre2: want tcp",
		"type=begin":      "type=begin: want start, end, drop or aggregate",
		"direction=up":    "direction=up: want ingress or egress",
		"colour=red":      `unknown filter key "colour"`,
		"src":             `"src": want key=value`,
		"! port=22":       "write the negation against its term",
		"dst-port=53,":    "dst-port: empty value",
		"direction=in,eg": "direction=in: want ingress or egress",
	} {
		_, err := ParseGroup(in)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: error %v, want %q", in, err, want)
		}
	}
}

func TestHubRingAndSubscribers(t *testing.T) {
	r := NewRegistry(5)
	h := r.Point("x", "source")
	batch := func(from, n int) []flow.Event {
		out := make([]flow.Event, n)
		for i := range out {
			out[i] = ev("10.0.0.1", "10.0.0.2", uint16(from+i), 80, flow.ProtoTCP, flow.TypeStart)
		}
		return out
	}
	h.Publish(batch(1, 3))
	h.Publish(batch(4, 4)) // the ring now holds 3..7
	ports := func(rs []Record) (out []uint16) {
		for _, r := range rs {
			out = append(out, r.Event.SrcPort)
		}
		return out
	}
	if got := ports(h.Last(nil, 0, 0)); len(got) != 5 || got[0] != 3 || got[4] != 7 {
		t.Fatalf("ring %v, want 3..7", got)
	}
	if got := ports(h.Last(nil, 0, 2)); len(got) != 2 || got[0] != 6 {
		t.Fatalf("last 2: %v", got)
	}
	odd, _ := ParseFilter([]string{"src-port=3,5,7,9,11"})
	sub, back := h.Subscribe(odd, 2, true, 0, 0)
	if got := ports(back); len(got) != 3 || got[0] != 3 || got[2] != 7 {
		t.Fatalf("backlog %v, want 3 5 7", got)
	}
	h.Publish(batch(8, 5)) // 9 and 11 match; the buffer holds 2
	h.Publish(batch(8, 5)) // 9 and 11 again: no room, skipped
	recs, skipped, err := sub.Next(context.Background())
	if err != nil || len(recs) != 2 || skipped != 2 {
		t.Fatalf("next: %d records, %d skipped, %v", len(recs), skipped, err)
	}
	sub.Close()
	if h.Subscribers() != 0 {
		t.Fatal("subscriber not removed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, _, err := sub.Next(ctx); err == nil {
		t.Fatal("Next on a closed, empty subscription returned without its context ending")
	}
}

func TestHubWithoutRingOrSubscribersIsInactive(t *testing.T) {
	h := NewRegistry(0).Point("x", "sink")
	if h.active.Load() {
		t.Fatal("a hub with no ring and no subscriber is active")
	}
	s, _ := h.Subscribe(nil, 10, false, 0, 0)
	if !h.active.Load() {
		t.Fatal("a subscribed hub is inactive")
	}
	s.Close()
	if h.active.Load() {
		t.Fatal("hub still active after its last subscriber left")
	}
}

// TestHubConcurrent: publishers never block on a subscriber that does not read, and what a
// reading subscriber receives plus what it skipped is exactly what matched.
func TestHubConcurrent(t *testing.T) {
	h := NewRegistry(100).Point("x", "source")
	stuck, _ := h.Subscribe(nil, 10, false, 0, 0)
	defer stuck.Close()
	reader, _ := h.Subscribe(nil, 1000, false, 0, 0)
	var wg sync.WaitGroup
	const publishers, batches, size = 4, 200, 50
	for range publishers {
		wg.Go(func() {
			b := make([]flow.Event, size)
			for range batches {
				h.Publish(b)
			}
		})
	}
	done := make(chan struct{})
	var got, skipped uint64
	go func() {
		defer close(done)
		for got+skipped < publishers*batches*size {
			recs, sk, err := reader.Next(context.Background())
			if err != nil {
				return
			}
			got += uint64(len(recs))
			skipped += sk
		}
	}()
	wg.Wait()
	<-done
	if got+skipped != publishers*batches*size {
		t.Fatalf("received %d + skipped %d, want %d", got, skipped, publishers*batches*size)
	}
	_, sk, _ := stuck.Next(context.Background())
	if sk != publishers*batches*size-10 {
		t.Fatalf("stuck subscriber skipped %d", sk)
	}
}

func TestTop(t *testing.T) {
	top := NewTop([]string{"src", "dport"}, 10*time.Second)
	now := time.Unix(1_700_000_000, 0)
	at := func(d time.Duration) flow.Time { return flow.TimeOf(now.Add(d)) }
	a := ev("10.0.0.1", "10.0.0.9", 1, 443, flow.ProtoTCP, flow.TypeEnd) // 150 bytes
	b := ev("10.0.0.2", "10.0.0.9", 1, 53, flow.ProtoUDP, flow.TypeEnd)
	b.TxBytes = 1000
	top.Add(at(-20*time.Second), &b) // outside the window
	for range 3 {
		top.Add(at(-time.Second), &a)
	}
	top.Add(at(0), &b)
	s := top.Snapshot(now, 10)
	if s.Total.Flows != 4 || s.Total.Bytes != 3*150+1050 || s.Groups != 2 {
		t.Fatalf("total %+v, groups %d", s.Total, s.Groups)
	}
	if s.ByBytes[0].Key[0] != "10.0.0.2" || s.ByBytes[0].Key[1] != "53" || s.ByFlows[0].Key[0] != "10.0.0.1" || s.ByFlows[0].Flows != 3 {
		t.Fatalf("by bytes %+v, by flows %+v", s.ByBytes, s.ByFlows)
	}
	if s := top.Snapshot(now.Add(time.Minute), 10); s.Total.Flows != 0 || len(top.buckets) != 0 {
		t.Fatalf("after the window: %+v, %d buckets", s.Total, len(top.buckets))
	}
}

func BenchmarkPublish(b *testing.B) {
	batch := make([]flow.Event, 1024)
	for _, c := range []struct {
		name string
		ring int
		subs int
	}{{"idle", 0, 0}, {"ring256", 256, 0}, {"ring256+1sub", 256, 1}} {
		b.Run(c.name, func(b *testing.B) {
			h := NewRegistry(c.ring).Point("x", "source")
			for range c.subs {
				s, _ := h.Subscribe(nil, 1<<16, false, 0, 0)
				defer s.Close()
			}
			b.SetBytes(int64(len(batch)))
			for b.Loop() {
				h.Publish(batch)
			}
		})
	}
}

// A removed tap point is no longer listed nor found; its subscriber takes what was buffered,
// then ends with ErrRemoved, and one that subscribes to the removed hub ends at once; the
// name, added again, is a new tap point.
func TestRegistryRemove(t *testing.T) {
	r := NewRegistry(0)
	h := r.Point("gone", "sink")
	r.Point("kept", "source")
	sub, _ := h.Subscribe(nil, 10, false, 0, 0)
	h.Publish([]flow.Event{ev("10.0.0.1", "10.0.0.2", 1, 80, flow.ProtoTCP, flow.TypeStart)})
	r.Remove("gone")
	if got := r.Names(); len(got) != 1 || got[0] != "kept" {
		t.Fatalf("names after Remove: %v", got)
	}
	if _, ok := r.Lookup("gone"); ok {
		t.Fatal("a removed tap point is found")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if recs, _, err := sub.Next(ctx); err != nil || len(recs) != 1 {
		t.Fatalf("first Next after Remove: %d records, %v; want the buffered one", len(recs), err)
	}
	if _, _, err := sub.Next(ctx); !errors.Is(err, ErrRemoved) {
		t.Fatalf("Next once the buffer is taken: %v, want ErrRemoved", err)
	}
	late, _ := h.Subscribe(nil, 10, false, 0, 0)
	if _, _, err := late.Next(ctx); !errors.Is(err, ErrRemoved) {
		t.Fatalf("Next of a subscription to a removed hub: %v, want ErrRemoved", err)
	}
	if h.active.Load() || h.Subscribers() != 0 {
		t.Fatal("a removed hub is active or has subscribers")
	}
	if again := r.Point("gone", "source"); again == h {
		t.Fatal("a name added again got the removed hub")
	}
}
