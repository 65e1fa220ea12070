package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// A user's pipeline with the default isolation (every component in a plugin process):
// a recording replayed to nfcapd over IPFIX, to a syslog server over TCP, and to a file in
// OCSF. Every event arrives at each.
func TestRunExportsToIPFIXSyslogAndOCSFFile(t *testing.T) {
	nfcapd, err := exec.LookPath("nfcapd")
	testenv.Require(t, err == nil, "nfcapd in PATH (Debian package nfdump)")
	nfdump, err := exec.LookPath("nfdump")
	testenv.Require(t, err == nil, "nfdump in PATH (Debian package nfdump)")
	dir := t.TempDir()
	rec, err := filepath.Abs("../../sinks/ipfix/testdata/recording.jsonl")
	if err != nil {
		t.Fatal(err)
	}

	// nfcapd on a free loopback port.
	port := testenv.FreeUDPPort(t)
	flows := filepath.Join(dir, "nfcapd")
	os.Mkdir(flows, 0o755)
	nf := exec.Command(nfcapd, "-b", "127.0.0.1", "-p", strconv.Itoa(port), "-w", flows, "-t", "3600")
	var nfOut testenv.SyncBuffer
	nf.Stdout, nf.Stderr = &nfOut, &nfOut
	if err := nf.Start(); err != nil {
		t.Fatal(err)
	}
	nfDone := make(chan struct{})
	go func() { nf.Wait(); close(nfDone) }()
	stopNfcapd := func() {
		select {
		case <-nfDone:
			return
		default:
		}
		nf.Process.Signal(syscall.SIGTERM)
		select {
		case <-nfDone:
		case <-time.After(10 * time.Second):
			nf.Process.Kill()
			<-nfDone
		}
	}
	defer stopNfcapd()
	if err := testenv.WaitListening(nf.Process.Pid, "udp", port, nfDone, time.Minute); err != nil {
		t.Fatalf("nfcapd: %v\n%s", err, nfOut.String())
	}

	// A syslog server that counts octet-counted frames.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	frames := make(chan string, 100)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		br := bufio.NewReader(c)
		for {
			l, err := br.ReadString(' ')
			if err != nil {
				return
			}
			n, _ := strconv.Atoi(strings.TrimSpace(l))
			msg := make([]byte, n)
			if _, err := io.ReadFull(br, msg); err != nil {
				return
			}
			frames <- string(msg)
		}
	}()

	writeFile(t, filepath.Join(dir, "export.yaml"), fmt.Sprintf(`
admin: {listen: ""}
sources:
  recording: {type: replay, path: %s}
sinks:
  collector: {type: ipfix, address: "127.0.0.1:%d", events: "start,end,aggregate"}
  siem: {type: syslog, address: %q, hostname: agent-1}
  lake: {type: file, path: flows.ocsf.jsonl, format: ocsf}
`, rec, port, ln.Addr().String()))
	if _, stderr, code := flowpipe(t, dir, "run", "-c", "export.yaml"); code != 0 {
		t.Fatalf("run exited %d:\n%s", code, stderr)
	}
	data, _ := os.ReadFile(rec)
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	var exported int
	for _, l := range lines {
		if !strings.Contains(l, `"type":"drop"`) {
			exported++
		}
	}

	// syslog: one message per event, in order.
	for i, l := range lines {
		var ev struct {
			EventID string `json:"event_id"`
		}
		json.Unmarshal([]byte(l), &ev)
		select {
		case m := <-frames:
			if !strings.HasPrefix(m, "<134>1 ") || !strings.Contains(m, ` agent-1 flowpipe `) || !strings.Contains(m, `event_id="`+ev.EventID+`"`) {
				t.Errorf("syslog message %d: %s", i, m)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("syslog server got %d of %d messages", i, len(lines))
		}
	}

	// OCSF file: one Network Activity object per event.
	ocsf, err := os.ReadFile(filepath.Join(dir, "flows.ocsf.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(ocsf), `{"class_uid":4001,`); n != len(lines) {
		t.Errorf("%d OCSF events in the file, want %d", n, len(lines))
	}

	// IPFIX: nfcapd stored every start, end and aggregate record (once it has read every
	// datagram: the socket's rx_queue in /proc/net/udp is empty).
	waitUntil(t, "nfcapd to read every datagram", func() bool {
		found, unread := testenv.LoopbackUDP(t, port)
		return found && unread == 0
	})
	stopNfcapd()
	files, _ := filepath.Glob(filepath.Join(flows, "nfcapd.*"))
	if len(files) != 1 {
		t.Fatalf("nfcapd files %v:\n%s", files, nfOut.String())
	}
	cmd := exec.Command(nfdump, "-r", files[0], "-q", "-o", "fmt:%sa %da %pkt %byt")
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(strings.TrimSpace(string(out)), "\n") + 1; got != exported {
		t.Errorf("nfcapd stored %d records, want %d:\n%s\n%s", got, exported, out, nfOut.String())
	}
	if !strings.Contains(string(out), "2001:db8::53") || !strings.Contains(string(out), "10.0.0.19") {
		t.Errorf("nfdump output lacks the recording's addresses:\n%s", out)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
