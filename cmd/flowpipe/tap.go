package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/tap"
)

func newTapCmd(*globalFlags) *cobra.Command {
	var (
		c      adminClient
		ff     filterFlags
		at     string
		last   int
		follow bool
		since  string
		output string
	)
	cmd := &cobra.Command{
		Use:   "tap",
		Short: "Stream the events passing a point of a running pipeline, filtered",
		Long: `tap connects to a running flowpipe's admin listener and prints the events that pass a
tap point: after a source, after an enricher, or into a sink (--at NAME; default: what is
handed to the sinks). Filters run in flowpipe, so only what matches crosses the connection.
A tap never slows the pipeline: when this client cannot keep up, events are skipped and the
count is shown. Without --last or --since it follows live events; with them it prints the
tap point's ring of recent events, and follows too with --follow.`,
		Example: `  flowpipe tap
  flowpipe tap --last 20 --proto tcp --dst-port 443
  flowpipe tap --at kernel --src 10.0.0.0/8 --not --dst-port 53 -o table
  flowpipe tap --filter "type=drop" --filter "rule=r-ssh" -o json | jq .dst_ip
  flowpipe tap --since 5m --follow --admin unix:/run/flowpipe/admin.sock`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, err := ff.filter()
			if err != nil {
				return err
			}
			out, err := newPrinter(output, cmd.OutOrStdout(), cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			req := tap.Request{At: at, Filter: f, Last: last, Follow: follow}
			if since != "" {
				if req.Since, err = tap.ParseSince(since, time.Now()); err != nil {
					return fmt.Errorf("--since %s", strings.TrimPrefix(err.Error(), "since="+since))
				}
			}
			if last < 0 {
				return fmt.Errorf("--last %d: want a positive number of events", last)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			body, err := c.get(ctx, "/api/tap", req.Values().Encode())
			if err != nil {
				return err
			}
			defer body.Close()
			go func() { <-ctx.Done(); body.Close() }()
			err = lines(body, out.line, out.flush)
			out.flush()
			if err != nil && !isDone(ctx, err) {
				return fmt.Errorf("tap stream: %w", err)
			}
			return nil
		},
	}
	withConn(cmd, &c, &ff)
	fs := cmd.Flags()
	fs.StringVar(&at, "at", "", "tap point: a source, enricher or sink name (default: the batches handed to the sinks)")
	fs.IntVar(&last, "last", 0, "print the newest N matching events of the tap point's ring first (admin.tap_ring)")
	fs.BoolVarP(&follow, "follow", "f", false, "with --last or --since, keep streaming live events")
	fs.StringVar(&since, "since", "", "events the tap point saw since a duration ago (5m) or an RFC 3339 time, from its ring")
	fs.StringVarP(&output, "output", "o", "compact", "output: compact, table or json (the file sink's schema)")
	return cmd
}

// printer writes tap lines in one of the output formats.
type printer struct {
	format  string
	w       *bufio.Writer
	errw    io.Writer
	rows    int
	ev      flow.Event
	started bool
}

func newPrinter(format string, w, errw io.Writer) (*printer, error) {
	switch format {
	case "compact", "table", "json":
	default:
		return nil, fmt.Errorf("-o %s: want compact, table or json", format)
	}
	return &printer{format: format, w: bufio.NewWriter(w), errw: errw}, nil
}

type metaLine struct {
	Tap struct {
		At        string `json:"at"`
		Kind      string `json:"kind"`
		Ring      *int   `json:"ring"`
		Following bool   `json:"following"`
		Skipped   uint64 `json:"skipped"`
		Removed   bool   `json:"removed"`
	} `json:"tap"`
}

var metaPrefix = []byte(`{"tap":`)

func (p *printer) line(l []byte) error {
	if bytes.HasPrefix(l, metaPrefix) {
		var m metaLine
		if err := json.Unmarshal(l, &m); err != nil {
			return fmt.Errorf("tap stream: %w", err)
		}
		switch {
		case m.Tap.At != "":
			what := "tap point " + m.Tap.At
			if m.Tap.At == tap.Fanout {
				what = "the batches handed to the sinks"
			}
			fmt.Fprintf(p.errw, "tapping %s (%s)\n", what, m.Tap.Kind)
		case m.Tap.Following:
			p.flush()
			fmt.Fprintln(p.errw, "following live events")
		case m.Tap.Removed:
			p.flush()
			fmt.Fprintln(p.errw, "the tap point's component was removed by a reload: nothing more to follow")
		case m.Tap.Skipped > 0:
			msg := fmt.Sprintf("… %s events skipped (this tap could not keep up; the pipeline was not slowed)", thousands(m.Tap.Skipped))
			if p.format == "json" {
				p.flush()
				fmt.Fprintln(p.errw, msg)
			} else {
				fmt.Fprintln(p.w, msg)
			}
		}
		p.flush()
		return nil
	}
	if p.format == "json" {
		p.w.Write(l)
		return p.flushIfIdle()
	}
	p.ev = flow.Event{}
	if err := flow.ParseJSON(bytes.TrimSpace(l), &p.ev); err != nil {
		return fmt.Errorf("tap stream: event: %w", err)
	}
	if p.format == "table" {
		if p.rows%40 == 0 {
			fmt.Fprintf(p.w, "%-23s  %-9s  %-6s  %-40s  %-40s  %-7s  %15s  %15s  %-12s  %s\n",
				"TIME", "TYPE", "PROTO", "SOURCE", "DESTINATION", "DIR", "TX BYTES/PKTS", "RX BYTES/PKTS", "RULE", "RESOURCES")
		}
		p.rows++
		e := &p.ev
		fmt.Fprintf(p.w, "%-23s  %-9s  %-6s  %-40s  %-40s  %-7s  %15s  %15s  %-12s  %s\n",
			e.Timestamp.Time().Format("2006-01-02T15:04:05.000"), e.Type, tap.ProtoName(e.Protocol),
			endpoint(e.SrcAddr, e.SrcPort, e), endpoint(e.DstAddr, e.DstPort, e), e.Direction,
			fmt.Sprintf("%d/%d", e.TxBytes, e.TxPackets), fmt.Sprintf("%d/%d", e.RxBytes, e.RxPackets),
			dash(e.RuleID), resourcePair(e))
		return p.flushIfIdle()
	}
	p.w.WriteString(compact(&p.ev))
	p.w.WriteByte('\n')
	return p.flushIfIdle()
}

// flushIfIdle flushes when the buffer holds a fair amount; the stream's gaps flush the rest
// through the meta lines and at the end.
func (p *printer) flushIfIdle() error {
	if p.w.Buffered() > 32<<10 {
		return p.w.Flush()
	}
	return nil
}

func (p *printer) flush() { p.w.Flush() }

// compact is one readable line per event: time, type, proto, src → dst, bytes and packets
// both ways, rule, resources.
func compact(e *flow.Event) string {
	var b strings.Builder
	b.WriteString(e.Timestamp.Time().Format("2006-01-02T15:04:05.000Z"))
	fmt.Fprintf(&b, " %-9s %-4s %s → %s", e.Type, tap.ProtoName(e.Protocol), endpoint(e.SrcAddr, e.SrcPort, e), endpoint(e.DstAddr, e.DstPort, e))
	if flow.IsICMP(e.Protocol) {
		fmt.Fprintf(&b, " icmp %d/%d", e.ICMPType, e.ICMPCode)
	}
	if e.Direction != flow.DirectionUnknown {
		b.WriteString(" " + e.Direction.String())
	}
	fmt.Fprintf(&b, " tx %s B %d pkt, rx %s B %d pkt", thousands(e.TxBytes), e.TxPackets, thousands(e.RxBytes), e.RxPackets)
	if e.RuleID != "" {
		b.WriteString(" rule=" + e.RuleID)
	}
	if e.SrcResourceID != "" || e.DstResourceID != "" {
		b.WriteString(" resources=" + resourcePair(e))
	}
	if e.Type == flow.TypeAggregate {
		fmt.Fprintf(&b, " starts=%d ends=%d drops=%d", e.NumStarts, e.NumEnds, e.NumDrops)
	}
	return b.String()
}

func endpoint(a netip.Addr, port uint16, e *flow.Event) string {
	if flow.IsICMP(e.Protocol) {
		return a.String()
	}
	return netip.AddrPortFrom(a, port).String()
}

func resourcePair(e *flow.Event) string {
	if e.SrcResourceID == "" && e.DstResourceID == "" {
		return "-"
	}
	return dash(e.SrcResourceID) + "→" + dash(e.DstResourceID)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// thousands writes n with commas: 1,234,567.
func thousands(n uint64) string {
	s := strconv.FormatUint(n, 10)
	if len(s) <= 3 {
		return s
	}
	var b strings.Builder
	first := len(s) % 3
	if first > 0 {
		b.WriteString(s[:first])
	}
	for i := first; i < len(s); i += 3 {
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(s[i : i+3])
	}
	return b.String()
}
