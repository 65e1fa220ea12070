package syslog

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/schema"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// recording is the IPFIX sink's recording (every kind of event, IPv4 and IPv6, counters
// above 2^32), read as the replay source reads it.
func recording(t testing.TB) []flow.Event {
	t.Helper()
	return componenttest.ReadJSONLines(t, "../ipfix/testdata/recording.jsonl")
}

func newSink(t testing.TB, mod func(c *Config), m component.Metrics) *Sink {
	t.Helper()
	c := defaults()
	c.Hostname = "agent-1"
	mod(c)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if m == nil {
		m = component.NopMetrics{}
	}
	s, err := New(component.Env{Name: "siem", Kind: component.KindSink, Type: "syslog", Logger: slog.Default(), Metrics: m}, c)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	return s
}

// rsyslog is a real rsyslogd (Debian package rsyslog) listening on loopback and writing
// every message it receives to a file, one line per message:
// PRI|HOSTNAME|APP-NAME|PROCID|MSGID|TIMESTAMP|STRUCTURED-DATA|MSG
type rsyslog struct {
	addr string
	out  string
	cmd  *exec.Cmd
	log  *testenv.SyncBuffer
	done chan struct{}
}

func freePort(t *testing.T, network string) int {
	t.Helper()
	if network == "udp" {
		return testenv.FreeUDPPort(t)
	}
	return testenv.FreeTCPPort(t)
}

// startRsyslog runs rsyslogd with an input of the given transport (tcp, tls or udp); for tls
// it presents the PKI's server certificate.
func startRsyslog(t *testing.T, transport string, p *testenv.PKI) *rsyslog {
	t.Helper()
	return startRsyslogOn(t, transport, p, freePort(t, transport))
}

func startRsyslogOn(t *testing.T, transport string, p *testenv.PKI, port int) *rsyslog {
	t.Helper()
	bin, err := exec.LookPath("rsyslogd")
	testenv.Require(t, err == nil, "rsyslogd in PATH (Debian package rsyslog)")
	dir := t.TempDir()
	r := &rsyslog{addr: fmt.Sprintf("127.0.0.1:%d", port), out: filepath.Join(dir, "messages.log"), log: &testenv.SyncBuffer{}, done: make(chan struct{})}
	global := fmt.Sprintf(`global(workDirectory="%s" maxMessageSize="64k")`, dir)
	var input string
	switch transport {
	case "tcp":
		input = fmt.Sprintf(`module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="%d")`, port)
	case "tls":
		_, err := os.Stat("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so")
		testenv.Require(t, err == nil, "rsyslog's GnuTLS driver (Debian package rsyslog-gnutls)")
		global = fmt.Sprintf(`global(workDirectory="%s" maxMessageSize="64k" defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="%s" defaultNetstreamDriverCertFile="%s" defaultNetstreamDriverKeyFile="%s")`,
			dir, p.CAFile, p.ServerCert, p.ServerKey)
		input = fmt.Sprintf(`module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="%d")`, port)
	case "udp":
		input = fmt.Sprintf(`module(load="imudp")
input(type="imudp" address="127.0.0.1" port="%d")`, port)
	}
	conf := fmt.Sprintf(`%s
%s
template(name="fields" type="string" string="%%pri%%|%%hostname%%|%%app-name%%|%%procid%%|%%msgid%%|%%timereported:::date-rfc3339%%|%%structured-data%%|%%msg%%\n")
action(type="omfile" file="%s" template="fields" flushOnTXEnd="on" asyncWriting="off")
`, global, input, r.out)
	confFile := filepath.Join(dir, "rsyslog.conf")
	if err := os.WriteFile(confFile, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	r.cmd = exec.Command(bin, "-n", "-f", confFile, "-i", filepath.Join(dir, "rsyslogd.pid"))
	r.cmd.Stdout, r.cmd.Stderr = r.log, r.log
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.cmd.Wait(); close(r.done) }()
	t.Cleanup(r.stop)
	// rsyslogd's own socket on the port: a probe that bound the UDP port would hold it at the
	// instant rsyslogd binds, and a dial would succeed against any process that took the TCP
	// port meanwhile (rsyslogd then logs the error and runs without its input).
	network := "tcp"
	if transport == "udp" {
		network = "udp"
	}
	if err := testenv.WaitListening(r.cmd.Process.Pid, network, port, r.done, time.Minute); err != nil {
		t.Fatalf("rsyslogd on %s: %v\n%s", r.addr, err, r.log.String())
	}
	return r
}

func (r *rsyslog) stop() {
	select {
	case <-r.done:
		return
	default:
	}
	r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		r.cmd.Process.Kill()
		<-r.done
	}
}

// lines waits until rsyslog wrote n messages and returns them.
func (r *rsyslog) lines(t *testing.T, n int) []string {
	t.Helper()
	var lines []string
	waitFor(t, fmt.Sprintf("rsyslog to write %d messages", n), func() bool {
		data, _ := os.ReadFile(r.out)
		lines = strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
		return len(data) > 0 && len(lines) >= n
	})
	return lines
}

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

// parseSD reads one SD-ELEMENT ([id k="v" ...], RFC 5424 section 6.3) into its ID and params.
func parseSD(t *testing.T, sd string) (string, map[string]string) {
	t.Helper()
	if !strings.HasPrefix(sd, "[") || !strings.HasSuffix(sd, "]") {
		t.Fatalf("not one SD element: %s", sd)
	}
	body := sd[1 : len(sd)-1]
	id, rest, _ := strings.Cut(body, " ")
	params := map[string]string{}
	for rest != "" {
		name, after, ok := strings.Cut(rest, `="`)
		if !ok {
			t.Fatalf("bad SD-PARAM at %q", rest)
		}
		var v strings.Builder
		i := 0
		for ; i < len(after) && after[i] != '"'; i++ {
			if after[i] == '\\' && i+1 < len(after) && strings.IndexByte(`"\]`, after[i+1]) >= 0 {
				i++
			}
			v.WriteByte(after[i])
		}
		params[name] = v.String()
		rest = strings.TrimPrefix(after[i+1:], " ")
	}
	return id, params
}

// eventFromSD rebuilds the event from its SD-PARAMs through flow.ParseJSON, which rejects
// unknown keys: every key must be one of docs/schema.md.
func eventFromSD(t *testing.T, params map[string]string) flow.Event {
	t.Helper()
	obj := map[string]any{}
	for k, v := range params {
		switch k {
		case "protocol", "src_port", "dst_port", "icmp_type", "icmp_code", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "num_starts", "num_ends", "num_drops":
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				t.Fatalf("%s=%q is not a number", k, v)
			}
			obj[k] = n
		case "reconstructed":
			obj[k] = v == "true"
		default:
			obj[k] = v
		}
	}
	line, _ := json.Marshal(obj)
	var e flow.Event
	if err := flow.ParseJSON(line, &e); err != nil {
		t.Fatalf("SD params %v: %v", params, err)
	}
	return e
}

func checkSDMessages(t *testing.T, lines []string, want []flow.Event) {
	t.Helper()
	if len(lines) != len(want) {
		t.Fatalf("%d messages, want %d:\n%s", len(lines), len(want), strings.Join(lines, "\n"))
	}
	for i, line := range lines {
		f := strings.SplitN(line, "|", 8)
		if len(f) != 8 {
			t.Fatalf("line %q", line)
		}
		e := &want[i]
		if f[0] != "134" { // local0 (16) * 8 + info (6)
			t.Errorf("PRI %s, want 134", f[0])
		}
		if f[1] != "agent-1" || f[2] != "flowpipe" || f[3] != strconv.Itoa(os.Getpid()) || f[4] != "flow-"+e.Type.String() {
			t.Errorf("header %v", f[:5])
		}
		ts, err := time.Parse(time.RFC3339Nano, f[5])
		if err != nil || !ts.Equal(e.Timestamp.Time().Truncate(time.Microsecond)) {
			t.Errorf("TIMESTAMP %s, want %s", f[5], e.Timestamp.Time())
		}
		id, params := parseSD(t, f[6])
		if id != "flow@32473" {
			t.Errorf("SD-ID %s", id)
		}
		if got := eventFromSD(t, params); got != *e {
			t.Errorf("message %d carries\n  %+v\nwant\n  %+v", i, got, *e)
		}
		if !strings.HasPrefix(f[7], e.Type.String()+" ") {
			t.Errorf("MSG %q", f[7])
		}
	}
}

// Over TCP with octet counting and over TLS, into a real rsyslog: every field of every
// event arrives, as structured data, IPv4 and IPv6, counters above 2^32.
func TestRsyslogStructuredData(t *testing.T) {
	p := testenv.NewPKI(t)
	for _, transport := range []string{"tcp", "tls", "udp"} {
		t.Run(transport, func(t *testing.T) {
			r := startRsyslog(t, transport, p)
			s := newSink(t, func(c *Config) {
				c.Address, c.Transport = r.addr, transport
				if transport == "tls" {
					c.CAFile = p.CAFile
				}
			}, nil)
			rec := recording(t)
			// PARAM-VALUE escaping: quotes, backslashes and brackets, and UTF-8.
			tricky := rec[1]
			tricky.EventID, tricky.RuleID, tricky.SrcResourceID, tricky.DstResourceID = flow.NewIDGen().New(), `allow "web" [all]`, `C:\res`, "résumé-ü"
			rec = append(rec, tricky)
			if err := s.Write(context.Background(), flow.NewBatch(rec, nil)); err != nil {
				t.Fatal(err)
			}
			checkSDMessages(t, r.lines(t, len(rec)), rec)
		})
	}
}

// A JSON body in each schema arrives as the schema's encoder wrote it; the flowpipe one reads
// back as the same event.
func TestRsyslogJSONBody(t *testing.T) {
	for _, format := range []string{"flowpipe", "ecs", "ocsf"} {
		t.Run(format, func(t *testing.T) {
			r := startRsyslog(t, "tcp", nil)
			s := newSink(t, func(c *Config) {
				c.Address, c.Body, c.Format, c.Facility, c.Severity = r.addr, "json", format, "daemon", "notice"
			}, nil)
			rec := recording(t)
			if err := s.Write(context.Background(), flow.NewBatch(rec, nil)); err != nil {
				t.Fatal(err)
			}
			lines := r.lines(t, len(rec))
			f, _ := schema.Parse(format)
			enc := schema.Encoder{Format: f}
			for i, line := range lines {
				parts := strings.SplitN(line, "|", 8)
				if parts[0] != "29" || parts[6] != "-" { // daemon (3) * 8 + notice (5)
					t.Errorf("PRI %s / SD %s, want 29 and -", parts[0], parts[6])
				}
				if want := string(enc.Append(nil, &rec[i])); strings.TrimSpace(parts[7]) != want {
					t.Errorf("message %d:\n  %s\nwant\n  %s", i, parts[7], want)
				}
				if format == "flowpipe" {
					var e flow.Event
					if err := flow.ParseJSON([]byte(strings.TrimSpace(parts[7])), &e); err != nil || e != rec[i] {
						t.Errorf("message %d reads back as %+v (%v)", i, e, err)
					}
				}
			}
		})
	}
}
