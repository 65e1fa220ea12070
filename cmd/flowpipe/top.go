package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/flowpipe/flowpipe/core/tap"
)

func newTopCmd(*globalFlags) *cobra.Command {
	var (
		c      adminClient
		ff     filterFlags
		at     string
		by     string
		window time.Duration
		n      int
		once   bool
	)
	cmd := &cobra.Command{
		Use:   "top",
		Short: "Top talkers of a running pipeline, by bytes and by flows, refreshed every second",
		Long: `top shows the groups of events with the most bytes (rx + tx) and the most flows (flow
events) over a sliding window of the time the events passed the tap point, grouped by
--by keys, with the same filters and tap points as tap. It redraws every second on a
terminal (colour only there, and not with NO_COLOR), and prints one snapshot after another
otherwise; --once prints the window from the tap point's ring of recent events and exits.`,
		Example: `  flowpipe top
  flowpipe top --by rule --window 5m
  flowpipe top --by src,dst,dport --proto udp --once`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, err := ff.filter()
			if err != nil {
				return err
			}
			keys, err := tap.ParseGroupBy(by)
			if err != nil {
				return err
			}
			if window < time.Second {
				return fmt.Errorf("--window %s: want at least 1s", window)
			}
			if n < 1 {
				return fmt.Errorf("-n %d: want at least 1 row", n)
			}
			req := tap.Request{At: at, Filter: f, By: keys, Window: window, N: n, Once: once}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			body, err := c.get(ctx, "/api/top", req.Values().Encode())
			if err != nil {
				return err
			}
			defer body.Close()
			go func() { <-ctx.Done(); body.Close() }()
			w := cmd.OutOrStdout()
			tty := isTerminal(w) && os.Getenv("NO_COLOR") == "" && os.Getenv("TERM") != "dumb"
			first := true
			err = lines(body, func(l []byte) error {
				var s tap.Snapshot
				if err := json.Unmarshal(l, &s); err != nil {
					return fmt.Errorf("top stream: %w", err)
				}
				var buf bytes.Buffer
				if tty {
					buf.WriteString("\x1b[H\x1b[2J")
				} else if !first {
					buf.WriteByte('\n')
				}
				first = false
				renderTop(&buf, &s, at, tty)
				_, err := w.Write(buf.Bytes())
				return err
			}, nil)
			if err != nil && !isDone(ctx, err) {
				return err
			}
			return nil
		},
	}
	withConn(cmd, &c, &ff)
	fs := cmd.Flags()
	fs.StringVar(&at, "at", "", "tap point (default: the batches handed to the sinks)")
	fs.StringVar(&by, "by", "src,dst,dport", "group by these keys: "+strings.Join(tap.GroupKeys, ", "))
	fs.DurationVar(&window, "window", time.Minute, "sliding window")
	fs.IntVarP(&n, "rows", "n", 10, "rows per table")
	fs.BoolVar(&once, "once", false, "print one snapshot of the window (from the ring of recent events) and exit")
	return cmd
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func renderTop(w io.Writer, s *tap.Snapshot, at string, colour bool) {
	bold, reset := "", ""
	if colour {
		bold, reset = "\x1b[1m", "\x1b[0m"
	}
	if at == "" {
		at = "into the sinks"
	}
	fmt.Fprintf(w, "%sflowpipe top%s  %s  window %s  by %s  %s\n", bold, reset, at, s.Window, strings.Join(s.By, ","), s.At.Local().Format("15:04:05"))
	fmt.Fprintf(w, "total: %s flows, %s bytes, %s packets in %s groups\n", thousands(s.Total.Flows), thousands(s.Total.Bytes), thousands(s.Total.Packets), thousands(uint64(s.Groups)))
	if s.Skipped > 0 {
		fmt.Fprintf(w, "… %s events skipped (top could not keep up; the totals miss them)\n", thousands(s.Skipped))
	}
	table := func(title string, rows []tap.Row) {
		fmt.Fprintf(w, "\n%s%s%s\n", bold, title, reset)
		widths := make([]int, len(s.By))
		for i, k := range s.By {
			widths[i] = len(k)
		}
		for _, r := range rows {
			for i, v := range r.Key {
				if i < len(widths) {
					widths[i] = max(widths[i], len([]rune(v)), 1)
				}
			}
		}
		for i, k := range s.By {
			fmt.Fprintf(w, "%-*s  ", widths[i], strings.ToUpper(k))
		}
		fmt.Fprintf(w, "%15s  %10s  %12s\n", "BYTES", "FLOWS", "PACKETS")
		for _, r := range rows {
			for i := range s.By {
				v := "-"
				if i < len(r.Key) && r.Key[i] != "" {
					v = r.Key[i]
				}
				fmt.Fprintf(w, "%s%s  ", v, strings.Repeat(" ", widths[i]-len([]rune(v))))
			}
			fmt.Fprintf(w, "%15s  %10s  %12s\n", thousands(r.Bytes), thousands(r.Flows), thousands(r.Packets))
		}
	}
	table("TOP BY BYTES", s.ByBytes)
	table("TOP BY FLOWS", s.ByFlows)
}
