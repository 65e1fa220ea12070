package ipfix

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

func requireTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	testenv.Require(t, err == nil, fmt.Sprintf("%s in PATH (Debian package %s)", name, pkg))
	return p
}

// daemon runs a collector in the foreground and stops it (SIGTERM, then kill) at cleanup or
// when stop is called; its output is kept for failure messages.
type daemon struct {
	cmd  *exec.Cmd
	out  *testenv.SyncBuffer
	done chan struct{}
	sig  os.Signal // what stops it; SIGTERM unless set
}

func startDaemon(t *testing.T, name string, args ...string) *daemon {
	t.Helper()
	d := &daemon{cmd: exec.Command(name, args...), out: &testenv.SyncBuffer{}, done: make(chan struct{})}
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { d.cmd.Wait(); close(d.done) }()
	t.Cleanup(d.stop)
	return d
}

// waitListening waits until the daemon itself has its socket on port (not another process
// that took the port meanwhile) and fails the test with its output if it exits first.
func (d *daemon) waitListening(t *testing.T, network string, port int) {
	t.Helper()
	if err := testenv.WaitListening(d.cmd.Process.Pid, network, port, d.done, time.Minute); err != nil {
		t.Fatalf("%s: %v\n%s", d.cmd.Path, err, d.out.String())
	}
}

func (d *daemon) stop() {
	select {
	case <-d.done:
		return
	default:
	}
	sig := d.sig
	if sig == nil {
		sig = syscall.SIGTERM
	}
	d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
}

// waitFor polls cond every 50ms for up to 20s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func exportRecording(t *testing.T, mod func(c *Config)) []flow.Event {
	t.Helper()
	s := newSink(t, mod, nil)
	rec := recording(t)
	if err := s.Write(context.Background(), flow.NewBatch(rec, nil)); err != nil {
		t.Fatal(err)
	}
	return exported(rec, s.cfg.Events)
}

// nfdumpRecord is what nfdump -o json prints of one flow, the fields the comparison uses.
type nfdumpRecord struct {
	First      string `json:"first"`
	Last       string `json:"last"`
	InPackets  uint64 `json:"in_packets"`
	InBytes    uint64 `json:"in_bytes"`
	OutPackets uint64 `json:"out_packets"`
	OutBytes   uint64 `json:"out_bytes"`
	Proto      uint8  `json:"proto"`
	SrcPort    uint16 `json:"src_port"`
	DstPort    uint16 `json:"dst_port"`
	ICMPType   uint8  `json:"icmp_type"`
	ICMPCode   uint8  `json:"icmp_code"`
	Src4       string `json:"src4_addr"`
	Dst4       string `json:"dst4_addr"`
	Src6       string `json:"src6_addr"`
	Dst6       string `json:"dst6_addr"`
	Direction  uint8  `json:"direction"`
}

// Exported to nfcapd over UDP and read back with nfdump: addresses (IPv4 and IPv6), ports,
// ICMP type and code, protocol, both directions' 64-bit counters, millisecond times and the
// flow direction of every record equal the recording's.
func TestNfcapdReadsEveryField(t *testing.T) {
	nfcapd := requireTool(t, "nfcapd", "nfdump")
	nfdump := requireTool(t, "nfdump", "nfdump")
	dir := t.TempDir()
	port := testenv.FreeUDPPort(t)
	d := startDaemon(t, nfcapd, "-b", "127.0.0.1", "-p", fmt.Sprint(port), "-w", dir, "-t", "3600")
	d.waitListening(t, "udp", port)
	want := exportRecording(t, func(c *Config) { c.Address, c.Events = fmt.Sprintf("127.0.0.1:%d", port), "end,aggregate" })
	waitFor(t, "nfcapd to read every datagram", func() bool {
		found, unread := testenv.LoopbackUDP(t, port)
		if !found {
			t.Fatalf("no UDP socket on 127.0.0.1:%d (nfcapd exited?)\n%s", port, d.out.String())
		}
		return unread == 0
	})
	d.stop()
	files, _ := filepath.Glob(filepath.Join(dir, "nfcapd.*"))
	if len(files) != 1 {
		t.Fatalf("nfcapd wrote %v\n%s", files, d.out.String())
	}
	cmd := exec.Command(nfdump, "-r", files[0], "-o", "json")
	cmd.Env = append(os.Environ(), "TZ=UTC")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nfdump: %v", err)
	}
	var got []nfdumpRecord
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("nfdump output: %v\n%s", err, out)
	}
	var gotS, wantS []string
	for _, r := range got {
		src, dst := r.Src4+r.Src6, r.Dst4+r.Dst6
		gotS = append(gotS, fmt.Sprintf("%s %s %d/%d icmp %d/%d proto %d dir %d %s..%s fwd %d/%d rev %d/%d", src, dst, r.SrcPort, r.DstPort,
			r.ICMPType, r.ICMPCode, r.Proto, r.Direction, r.First, r.Last, r.InPackets, r.InBytes, r.OutPackets, r.OutBytes))
	}
	for _, e := range want {
		sp, sb := e.SrcCounters()
		dp, db := e.DstCounters()
		ms := func(t flow.Time) string { return t.Time().Format("2006-01-02T15:04:05.000") }
		wantS = append(wantS, fmt.Sprintf("%s %s %d/%d icmp %d/%d proto %d dir %d %s..%s fwd %d/%d rev %d/%d", e.SrcAddr, e.DstAddr, e.SrcPort, e.DstPort,
			e.ICMPType, e.ICMPCode, e.Protocol, direction(e.Direction), ms(startOf(&e)), ms(endOf(&e)), sp, sb, dp, db))
	}
	compareSets(t, "nfdump", gotS, wantS)
}

// compareSets compares records as multisets: collectors do not keep the order of records.
func compareSets(t *testing.T, who string, got, want []string) {
	t.Helper()
	sort.Strings(got)
	sort.Strings(want)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("%s read back\n  %s\nwant\n  %s", who, strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

// flowsIn collects every flow record object (one holding cflow.protocol) of tshark's JSON.
func flowsIn(v any, out *[]map[string]any) {
	switch v := v.(type) {
	case map[string]any:
		if _, ok := v["cflow.protocol"]; ok {
			*out = append(*out, v)
			return
		}
		for _, sub := range v {
			flowsIn(sub, out)
		}
	case []any:
		for _, sub := range v {
			flowsIn(sub, out)
		}
	}
}

// tsharkValues is a field's values: one string, or the list --no-duplicate-keys makes of a
// field that occurs more than once (forward and reverse counters, the enterprise strings).
// It looks into the record's subtrees too (tshark puts the start and end times under the
// duration it computes from them).
func tsharkValues(r map[string]any, key string) []string {
	var out []string
	switch v := r[key].(type) {
	case string:
		out = append(out, v)
	case []any:
		for _, x := range v {
			s, _ := x.(string)
			out = append(out, s)
		}
	}
	for k, sub := range r {
		if m, ok := sub.(map[string]any); ok && k != key {
			out = append(out, tsharkValues(m, key)...)
		}
	}
	return out
}

// Exported over TCP and read by tshark's IPFIX dissector from a capture on loopback: every
// element, including the reverse (RFC 5103) counters and the enterprise-specific rule and
// resource IDs, of every start, end and aggregate record.
func TestTsharkDecodesEveryElementOverTCP(t *testing.T) {
	testenv.RequireRoot(t) // capturing on lo
	tshark := requireTool(t, "tshark", "tshark")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	received := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			received <- -1
			return
		}
		n, _ := io.Copy(io.Discard, c)
		received <- n
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	pcap := filepath.Join(t.TempDir(), "ipfix.pcap")
	d := startDaemon(t, tshark, "-i", "lo", "-f", fmt.Sprintf("tcp port %d", port), "-w", pcap)
	waitFor(t, "tshark to capture", func() bool { return strings.Contains(d.out.String(), "Capture started") })
	const pen = 64999
	s := newSink(t, func(c *Config) {
		c.Address, c.Transport, c.EnterpriseNumber, c.Events = ln.Addr().String(), "tcp", pen, "start,end,aggregate"
	}, nil)
	rec := recording(t)
	if err := s.Write(context.Background(), flow.NewBatch(rec, nil)); err != nil {
		t.Fatal(err)
	}
	want := exported(rec, "start,end,aggregate")
	s.Close(context.Background())
	<-received // the peer read to EOF: every segment is on the wire, and so in the capture
	// Stop tshark once its file holds the sink's FIN, the last segment the sink sent.
	waitFor(t, "the capture to hold the connection's end", func() bool {
		out, _ := exec.Command(tshark, "-r", pcap, "-Y", fmt.Sprintf("tcp.flags.fin==1 && tcp.dstport==%d", port)).Output()
		return len(bytes.TrimSpace(out)) > 0
	})
	d.stop()
	out, err := exec.Command(tshark, "-r", pcap, "-d", fmt.Sprintf("tcp.port==%d,cflow", port), "-T", "json", "--no-duplicate-keys").Output()
	if err != nil {
		t.Fatalf("tshark -r: %v", err)
	}
	var doc any
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	var flows []map[string]any
	flowsIn(doc, &flows)
	one := func(r map[string]any, k string) string { return strings.Join(tsharkValues(r, k), "+") }
	var got, wantS []string
	for _, r := range flows {
		src, dst := one(r, "cflow.srcaddr")+one(r, "cflow.srcaddrv6"), one(r, "cflow.dstaddr")+one(r, "cflow.dstaddrv6")
		icmp := one(r, "cflow.icmp_type_code_ipv4") + one(r, "cflow.icmp_ipv6_type") + "/" + one(r, "cflow.icmp_ipv6_code")
		var ids []string
		for _, h := range tsharkValues(r, "cflow.enterprise_private_entry") {
			b, _ := hex.DecodeString(strings.ReplaceAll(h, ":", ""))
			ids = append(ids, string(b))
		}
		got = append(got, fmt.Sprintf("%s %s %s/%s proto %s icmp %s dir %s %s..%s reason %s total %s/%s delta %s/%s ids %q",
			src, dst, one(r, "cflow.srcport"), one(r, "cflow.dstport"), one(r, "cflow.protocol"), icmp, one(r, "cflow.direction"),
			one(r, "cflow.abstimestart"), one(r, "cflow.abstimeend"), one(r, "cflow.flow_end_reason"),
			one(r, "cflow.permanent_packets"), one(r, "cflow.permanent_octets"), one(r, "cflow.packets"), one(r, "cflow.octets"), ids))
	}
	for _, e := range want {
		sp, sb := e.SrcCounters()
		dp, db := e.DstCounters()
		ts := func(t flow.Time) string {
			return t.Time().Truncate(time.Millisecond).Format("Jan _2, 2006 15:04:05.000000000 UTC")
		}
		icmp := fmt.Sprintf("0x%02x%02x/", e.ICMPType, e.ICMPCode)
		if e.SrcAddr.Is6() {
			icmp = fmt.Sprintf("%d/%d", e.ICMPType, e.ICMPCode)
		}
		end, reason, total, delta := "", "", "/", "/"
		switch e.Type {
		case flow.TypeEnd:
			end, reason, total = ts(endOf(&e)), "3", fmt.Sprintf("%d+%d/%d+%d", sp, dp, sb, db)
		case flow.TypeAggregate:
			end, reason, delta = ts(endOf(&e)), "2", fmt.Sprintf("%d+%d/%d+%d", sp, dp, sb, db)
		}
		wantS = append(wantS, fmt.Sprintf("%s %s %d/%d proto %d icmp %s dir %d %s..%s reason %s total %s delta %s ids %q",
			e.SrcAddr, e.DstAddr, e.SrcPort, e.DstPort, e.Protocol, icmp, direction(e.Direction), ts(startOf(&e)), end, reason, total, delta,
			nonEmpty(e.RuleID, e.SrcResourceID, e.DstResourceID)))
	}
	compareSets(t, "tshark", got, wantS)
}

// nonEmpty drops empty strings: tshark shows no entry for an empty variable-length element
// (TestUDPRoundTripEveryElement checks those by position with the test decoder).
func nonEmpty(ss ...string) []string {
	var out []string
	for _, s := range ss {
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}

// Exported to pmacct's nfacctd over UDP and printed by its print plugin as CSV: addresses
// (IPv4 and IPv6), ports, protocol, the forward 64-bit counters and the start and end times
// of every record equal the recording's. (nfacctd 1.7.7's print plugin has no primitives for
// the reverse counters, the flow direction or the end reason; nfcapd and tshark check those.)
func TestNfacctdReadsEveryField(t *testing.T) {
	nfacctd := requireTool(t, "nfacctd", "pmacct")
	dir := t.TempDir()
	port := testenv.FreeUDPPort(t)
	out := filepath.Join(dir, "flows.csv")
	conf := filepath.Join(dir, "nfacctd.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`daemonize: false
pidfile: %s/nfacctd.pid
nfacctd_ip: 127.0.0.1
nfacctd_port: %d
plugins: print[p]
aggregate[p]: src_host, dst_host, src_port, dst_port, proto, timestamp_start, timestamp_end
print_output[p]: csv
print_output_file[p]: %s
print_refresh_time[p]: 1
timestamps_since_epoch: true
`, dir, port, out)), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, nfacctd, "-f", conf)
	d.sig = os.Interrupt // nfacctd's core exits on SIGINT, not always on SIGTERM
	d.waitListening(t, "udp", port)
	// The core listens before its print plugin runs, and what arrives in between is not
	// accounted: wait for the plugin's first (empty) purge.
	waitFor(t, "nfacctd's print plugin to run", func() bool { return strings.Contains(d.out.String(), "Purging cache - END") })
	want := exportRecording(t, func(c *Config) { c.Address = fmt.Sprintf("127.0.0.1:%d", port) })
	var lines []string
	waitFor(t, "nfacctd to print every record", func() bool {
		data, _ := os.ReadFile(out)
		lines = strings.Split(strings.TrimSpace(string(data)), "\n")
		return len(lines) > len(want) // the header line and the records
	})
	d.stop()
	var wantS []string
	for _, e := range want {
		sp, sb := e.SrcCounters()
		proto := map[uint8]string{flow.ProtoTCP: "tcp", flow.ProtoUDP: "udp", flow.ProtoICMP: "icmp", flow.ProtoICMPv6: "ipv6-icmp"}[e.Protocol]
		sec := func(t flow.Time) string { return fmt.Sprintf("%d.%06d", int64(t)/1e9, int64(t)%1e9/1e6*1e3) }
		wantS = append(wantS, fmt.Sprintf("%s,%s,%d,%d,%s,%s,%s,%d,%d", e.SrcAddr, e.DstAddr, e.SrcPort, e.DstPort, proto,
			sec(startOf(&e)), sec(endOf(&e)), sp, sb))
	}
	compareSets(t, "nfacctd", lines[1:], wantS)
}
