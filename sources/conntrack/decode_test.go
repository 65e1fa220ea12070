package conntrack

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"reflect"
	"strconv"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/netns"
)

// ctMessage builds a ctnetlink event datagram from attributes, with netfilter's encoder: the
// synthetic seeds cover what the kernel captures in the corpus do not (IPv6, ICMP, zones,
// marks, labels, status).
func ctMessage(t testing.TB, msgType netfilter.MessageType, flags netlink.HeaderFlags, family netfilter.ProtoFamily, attrs []netfilter.Attribute) []byte {
	t.Helper()
	m, err := netfilter.MarshalNetlink(netfilter.Header{SubsystemID: netfilter.NFSubsysCTNetlink, MessageType: msgType,
		Flags: flags, Family: family, Version: 0}, attrs)
	if err != nil {
		t.Fatal(err)
	}
	m.Header.Length = uint32(nlmsgHdrLen + len(m.Data))
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func nest(typ uint16, children ...netfilter.Attribute) netfilter.Attribute {
	return netfilter.Attribute{Type: typ, Nested: true, Children: children}
}

func attr(typ uint16, data []byte) netfilter.Attribute {
	return netfilter.Attribute{Type: typ, Data: data}
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func tupleAttr(typ uint16, src, dst string, proto ...netfilter.Attribute) netfilter.Attribute {
	s, d := netip.MustParseAddr(src), netip.MustParseAddr(dst)
	ipt := uint16(1)
	if s.Is6() {
		ipt = 3
	}
	return nest(typ, nest(ctaTupleIP, attr(ipt, s.AsSlice()), attr(ipt+1, d.AsSlice())), nest(ctaTupleProto, proto...))
}

// syntheticSeeds are datagrams with the attributes the kernel captures lack.
func syntheticSeeds(t testing.TB) [][]byte {
	tcp6 := []netfilter.Attribute{
		tupleAttr(ctaTupleOrig, "2001:db8::1", "2001:db8::2", attr(ctaProtoNum, []byte{6}), attr(ctaProtoSrcPort, be16(40000)), attr(ctaProtoDstPort, be16(443))),
		tupleAttr(ctaTupleReply, "2001:db8::2", "2001:db8::1", attr(ctaProtoNum, []byte{6}), attr(ctaProtoSrcPort, be16(443)), attr(ctaProtoDstPort, be16(40000))),
		nest(ctaCountersOrig, attr(ctaCountersPackets, be64(12)), attr(ctaCountersByte, be64(3400))),
		nest(ctaCountersReply, attr(ctaCountersPackets, be64(10)), attr(ctaCountersByte, be64(90000))),
		nest(ctaTimestamp, attr(ctaTimestampStart, be64(1_700_000_000_000_000_000)), attr(ctaTimestampStop, be64(1_700_000_005_000_000_000))),
		attr(ctaStatus, be32(0x18e)), attr(ctaMark, be32(0x1f)), attr(ctaZone, be16(7)), attr(ctaID, be32(0xdeadbeef)),
		attr(ctaLabels, bytes.Repeat([]byte{0xa5}, 16)),
		attr(7, be32(120)), // CTA_TIMEOUT: skipped
	}
	icmp := []netfilter.Attribute{
		tupleAttr(ctaTupleOrig, "10.0.0.1", "10.0.0.2", attr(ctaProtoNum, []byte{1}), attr(ctaProtoICMPID, be16(77)), attr(ctaProtoICMPType, []byte{8}), attr(ctaProtoICMPCode, []byte{0})),
		tupleAttr(ctaTupleReply, "10.0.0.2", "10.0.0.1", attr(ctaProtoNum, []byte{1}), attr(ctaProtoICMPID, be16(77)), attr(ctaProtoICMPType, []byte{0}), attr(ctaProtoICMPCode, []byte{0})),
		attr(ctaID, be32(5)),
	}
	icmp6 := []netfilter.Attribute{
		tupleAttr(ctaTupleOrig, "fd00::1", "fd00::2", attr(ctaProtoNum, []byte{58}), attr(ctaProtoICMPv6ID, be16(9)), attr(ctaProtoICMPv6Type, []byte{128}), attr(ctaProtoICMPv6Code, []byte{0})),
		tupleAttr(ctaTupleReply, "fd00::2", "fd00::1", attr(ctaProtoNum, []byte{58}), attr(ctaProtoICMPv6ID, be16(9)), attr(ctaProtoICMPv6Type, []byte{129}), attr(ctaProtoICMPv6Code, []byte{0})),
		nest(ctaCountersOrig, attr(ctaCountersPackets, be64(1)), attr(ctaCountersByte, be64(104))),
		nest(ctaCountersReply, attr(ctaCountersPackets, be64(1)), attr(ctaCountersByte, be64(104))),
	}
	var out [][]byte
	out = append(out, ctMessage(t, 0, netlink.Create|netlink.Excl, netfilter.ProtoIPv6, tcp6))
	out = append(out, ctMessage(t, 2, 0, netfilter.ProtoIPv6, tcp6))
	out = append(out, ctMessage(t, 0, 0, netfilter.ProtoIPv6, tcp6)) // UPDATE
	out = append(out, append(ctMessage(t, 0, netlink.Create, netfilter.ProtoIPv4, icmp), ctMessage(t, 2, 0, netfilter.ProtoIPv4, icmp)...))
	out = append(out, ctMessage(t, 2, 0, netfilter.ProtoIPv6, icmp6))
	return out
}

// decodeAll decodes every message of a datagram as the reader does (nlSplit, then
// decodeMessage), handing each event to fn; it returns how many messages were bad.
func (d *ctDecoder) decodeAll(b []byte, f *ctFlow, fn func(typ int, f *ctFlow)) (bad int) {
	sp := nlSplit{b: b}
	for {
		typ, flags, data, ok := sp.next()
		if !ok {
			return bad + sp.bad
		}
		ev, ok := d.decodeMessage(typ, flags, data, f)
		if !ok {
			bad++
			continue
		}
		fn(ev, f)
	}
}

// splitMessages splits a datagram into netlink messages as the reader does.
func splitMessages(b []byte) (msgs []netlink.Message) {
	for len(b) >= nlmsgHdrLen {
		l := int(binary.NativeEndian.Uint32(b[0:4]))
		if l < nlmsgHdrLen || l > len(b) {
			return msgs
		}
		msgs = append(msgs, netlink.Message{Header: netlink.Header{
			Length: uint32(l), Type: netlink.HeaderType(binary.NativeEndian.Uint16(b[4:6])),
			Flags: netlink.HeaderFlags(binary.NativeEndian.Uint16(b[6:8])),
		}, Data: b[nlmsgHdrLen:l]})
		next := min((l+3)&^3, len(b))
		b = b[next:]
	}
	return msgs
}

// checkAgrees decodes every message of b with both decoders: wherever ti-mo/conntrack
// accepts a message, the native decoder must accept it with the same values. It returns how
// many messages ti-mo accepted.
func checkAgrees(t *testing.T, b []byte) (accepted int) {
	d := ctDecoder{labels: true}
	var delivered []ctFlow
	var types []int
	d.decodeAll(b, &ctFlow{}, func(typ int, f *ctFlow) {
		c := *f
		c.labels = bytes.Clone(f.labels)
		delivered, types = append(delivered, c), append(types, typ)
	})
	var oneByOne []ctFlow
	var acceptedTypes []int
	for _, m := range splitMessages(b) {
		switch m.Header.Type {
		case netlink.Noop, netlink.Error, netlink.Done, netlink.Overrun:
			continue
		}
		var got ctFlow
		typ, ok := d.decodeMessage(uint16(m.Header.Type), uint16(m.Header.Flags), m.Data, &got)
		if ok {
			c := got
			c.labels = bytes.Clone(got.labels)
			oneByOne, acceptedTypes = append(oneByOne, c), append(acceptedTypes, typ)
		}
		var ev ct.Event
		if err := ev.Unmarshal(m); err != nil || ev.Flow == nil {
			continue
		}
		accepted++
		if !ok {
			t.Fatalf("ti-mo accepts a message the native decoder rejects: %+v\n% x", ev.Flow, m.Data)
		}
		want := fromCT(ev.Flow)
		wantType := map[any]int{ct.EventNew: ctEvNew, ct.EventUpdate: ctEvUpdate, ct.EventDestroy: ctEvDestroy}[ev.Type]
		if typ != wantType {
			t.Fatalf("event type %d, ti-mo %v", typ, ev.Type)
		}
		if !bytes.Equal(got.labels, want.labels) {
			t.Fatalf("labels % x, ti-mo % x", got.labels, want.labels)
		}
		got.labels, want.labels = nil, nil
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("native %+v\nti-mo  %+v\n% x", got, want, m.Data)
		}
	}
	// The reader's splitter finds the same messages as this test's.
	if !reflect.DeepEqual(delivered, oneByOne) || !reflect.DeepEqual(types, acceptedTypes) {
		t.Fatalf("nlSplit and decodeMessage delivered %+v %v, messages decoded one by one %+v %v", delivered, types, oneByOne, acceptedTypes)
	}
	return accepted
}

func TestDecodeAgreesOnSeeds(t *testing.T) {
	seeds := append(kernelSeeds(t), syntheticSeeds(t)...)
	total := 0
	for _, b := range seeds {
		n := checkAgrees(t, b)
		if n == 0 {
			t.Errorf("ti-mo accepted no message of seed % x", b)
		}
		total += n
	}
	t.Logf("%d messages agreed", total)
	// The synthetic seeds' values, read by hand.
	var f ctFlow
	d := ctDecoder{labels: true}
	if n := d.decodeAll(syntheticSeeds(t)[1], &f, func(int, *ctFlow) {}); n != 0 {
		t.Fatal("synthetic DESTROY not decoded")
	}
	if f.orig.src != netip.MustParseAddr("2001:db8::1") || f.orig.dport != 443 || f.reply.sport != 443 || f.zone != 7 ||
		f.mark != 0x1f || f.id != 0xdeadbeef || f.status != 0x18e || f.countersReply.bytes != 90000 ||
		f.stop != 1_700_000_005_000_000_000 || len(f.labels) != 16 {
		t.Errorf("decoded %+v", f)
	}
}

// FuzzDecodeAgrees checks the native decoder against ti-mo/conntrack on arbitrary datagrams:
// on every message ti-mo accepts, both must give the same event type and values.
func FuzzDecodeAgrees(f *testing.F) {
	for _, b := range append(kernelSeeds(f), syntheticSeeds(f)...) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { checkAgrees(t, b) })
}

// TestDecodeAllocs: decoding a datagram allocates nothing.
func TestDecodeAllocs(t *testing.T) {
	seeds := append(kernelSeeds(t), syntheticSeeds(t)...)
	d := ctDecoder{labels: true}
	var f ctFlow
	n := 0
	fn := func(int, *ctFlow) { n++ }
	if a := testing.AllocsPerRun(100, func() {
		for _, b := range seeds {
			d.decodeAll(b, &f, fn)
		}
	}); a != 0 {
		t.Errorf("%v allocations per pass over the seeds, want 0", a)
	}
	if n == 0 {
		t.Fatal("nothing decoded")
	}
}

// TestDecodeAgreesWithKernel reads real kernel events for IPv4 and IPv6 ICMP, UDP and TCP
// flows that nftables gave a mark, a zone and a label, and checks both decoders on every
// datagram, and that the native one found those attributes.
func TestDecodeAgreesWithKernel(t *testing.T) {
	p := newPair(t)
	sysctlNS(t, p, p.A, "net.netfilter.nf_conntrack_acct=1")
	sysctlNS(t, p, p.A, "net.netfilter.nf_conntrack_timestamp=1")
	p.Exec(t, p.A, "nft", `add table inet fpdecode
add chain inet fpdecode pre { type filter hook prerouting priority -300; }
add chain inet fpdecode out { type filter hook output priority -300; }
add rule inet fpdecode pre ct zone set 5
add rule inet fpdecode out ct zone set 5
add chain inet fpdecode tag { type filter hook output priority 0; }
add rule inet fpdecode tag ct state new ct mark set 0x42 ct label set 3`)
	ns, err := netns.Open(p.A)
	must(t, err)
	defer ns.Close()
	ev, err := openEvents(ns, 8<<20, slog.New(slog.DiscardHandler))
	must(t, err)
	defer ev.close()

	srv, stop := udpEcho(t, p, p.B, "[::]:0")
	defer stop()
	p.Exec(t, p.A, "ping", "-4", "-c", "1", p.B4)
	p.Exec(t, p.A, "ping", "-6", "-c", "1", p.B6)
	udpExchange(t, p.A, &net.UDPAddr{IP: net.ParseIP(p.B4), Port: srv.Port}, 2, 50)
	udpExchange(t, p.A, &net.UDPAddr{IP: net.ParseIP(p.B6), Port: srv.Port}, 2, 50)
	var ln net.Listener
	inNS(t, p.B, func() (err error) { ln, err = net.Listen("tcp", "[::]:0"); return err })
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	for _, a := range []string{p.B4, p.B6} {
		inNS(t, p.A, func() error {
			c, err := net.Dial("tcp", net.JoinHostPort(a, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)))
			if err != nil {
				return err
			}
			_, _ = c.Write([]byte("hello"))
			return c.Close()
		})
	}

	// Read until the six flows have ended (a dump reaps the expired ones).
	// The kernel sends labels with NEW (they changed), counters and timestamps with DESTROY.
	type seen struct{ news, v4, v6, mark, zone, labels, counters, stamps int }
	var s seen
	destroys := map[uint8]int{}
	r := newRecvBatch()
	d := ctDecoder{labels: true}
	deadline := time.Now().Add(60 * time.Second)
	for destroys[flow.ProtoICMP] < 1 || destroys[flow.ProtoICMPv6] < 1 || destroys[flow.ProtoUDP] < 2 || destroys[flow.ProtoTCP] < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("timed out; DESTROY events by protocol: %v", destroys)
		}
		n, err := ev.recv(r, false)
		if errors.Is(err, errIdle) {
			dumpNS(p, p.A)()
			time.Sleep(100 * time.Millisecond)
			continue
		}
		must(t, err)
		for i := 0; i < n; i++ {
			b, trunc := r.msg(i)
			if trunc {
				t.Fatal("truncated datagram")
			}
			checkAgrees(t, b)
			var f ctFlow
			if bad := d.decodeAll(b, &f, func(typ int, f *ctFlow) {
				if typ == ctEvNew {
					s.news++
					if len(f.labels) > 0 && f.labels[0]&(1<<3) != 0 {
						s.labels++
					}
				}
				if typ != ctEvDestroy {
					return
				}
				destroys[f.orig.proto]++
				if f.orig.src.Is4() {
					s.v4++
				} else {
					s.v6++
				}
				if f.mark == 0x42 {
					s.mark++
				}
				if f.zone == 5 {
					s.zone++
				}
				if f.countersOrig.packets > 0 && f.countersOrig.bytes > 0 {
					s.counters++
				} else {
					t.Logf("DESTROY without counters: %+v", f)
				}
				if f.start != 0 && f.stop >= f.start {
					s.stamps++
				}
				if f.reply.src != f.orig.dst || f.id == 0 {
					t.Errorf("DESTROY %+v: reply tuple or ID", f)
				}
			}); bad != 0 {
				t.Errorf("%d messages not decoded", bad)
			}
		}
	}
	total := destroys[flow.ProtoICMP] + destroys[flow.ProtoICMPv6] + destroys[flow.ProtoUDP] + destroys[flow.ProtoTCP]
	if s.v4 == 0 || s.v6 == 0 || s.mark != total || s.zone != total || s.labels != s.news || s.news == 0 || s.counters != total || s.stamps != total {
		t.Errorf("of %d DESTROY events: %+v", total, s)
	}
}
