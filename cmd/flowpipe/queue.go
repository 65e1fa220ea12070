package main

import (
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/flowpipe/flowpipe/core/pipeline/diskqueue"
)

func newQueueCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "queue",
		Short: "Inspect, verify and repair a sink's disk queue",
		Long: `A sink with queue.type: disk keeps its queue in a directory (queue.path, by default
<data_dir>/queue/<sink name>). These commands read that directory; repair changes it and needs
flowpipe to be stopped.`,
	}
	var asJSON bool
	inspect := &cobra.Command{
		Use:     "inspect PATH",
		Short:   "Show what a disk queue holds: segments, records, events, confirmed and pending, damage",
		Example: "  flowpipe queue inspect /var/lib/flowpipe/queue/collector",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := diskqueue.Inspect(args[0])
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), r)
			}
			printReport(cmd.OutOrStdout(), r, true)
			return nil
		},
	}
	inspect.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	verify := &cobra.Command{
		Use:   "verify PATH",
		Short: "Check every record of a disk queue; exit 1 when anything is damaged",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := diskqueue.Inspect(args[0])
			if err != nil {
				return err
			}
			printReport(cmd.OutOrStdout(), r, false)
			if !r.Clean() {
				fmt.Fprintf(cmd.ErrOrStderr(), "%s: damaged; flowpipe skips (and counts) the damage when it reads the queue, or run `flowpipe queue repair %s` with flowpipe stopped\n", args[0], args[0])
				return exitError{1}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: clean\n", args[0])
			return nil
		},
	}
	repair := &cobra.Command{
		Use:   "repair PATH",
		Short: "Cut the damaged parts out of a disk queue, keeping every readable record (flowpipe must be stopped)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			before, err := diskqueue.Repair(args[0])
			if err != nil {
				return err
			}
			var bytes int64
			events, unknown := 0, 0
			for _, d := range before.Damage {
				bytes += d.Bytes
				if d.Events >= 0 {
					events += d.Events
				} else {
					unknown++
				}
			}
			out := cmd.OutOrStdout()
			if before.Clean() {
				fmt.Fprintf(out, "%s: nothing to repair\n", args[0])
			} else {
				fmt.Fprintf(out, "%s: cut %d damaged stretches out (%d bytes; %d events, and %d stretches with no readable record header)\n", args[0], len(before.Damage), bytes, events, unknown)
			}
			after, err := diskqueue.Inspect(args[0])
			if err != nil {
				return err
			}
			printReport(out, after, false)
			if !after.Clean() {
				return fmt.Errorf("%s is still damaged after repair", args[0])
			}
			return nil
		},
	}
	cmd.AddCommand(inspect, verify, repair)
	return cmd
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printReport(w io.Writer, r *diskqueue.Report, segments bool) {
	fmt.Fprintf(w, "queue:     %s", r.Dir)
	if r.InUse {
		fmt.Fprint(w, " (open in a running flowpipe)")
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "cursor:    %s\n", r.Cursor)
	fmt.Fprintf(w, "on disk:   %d segments, %d records, %d events, %d bytes\n", len(r.Segments), r.Records, r.Events, r.Bytes)
	fmt.Fprintf(w, "pending:   %d events (confirmed, not yet deleted: %d)\n", r.Pending, r.Confirmed)
	if !r.OldestEvent.IsZero() {
		fmt.Fprintf(w, "events:    %s .. %s\n", r.OldestEvent.UTC().Format(time.RFC3339Nano), r.NewestEvent.UTC().Format(time.RFC3339Nano))
	}
	if segments {
		for _, s := range r.Segments {
			fmt.Fprintf(w, "  %s  %10d bytes  %7d records  %9d events", s.File, s.Bytes, s.Records, s.Events)
			if s.HeaderErr != "" {
				fmt.Fprintf(w, "  header: %s", s.HeaderErr)
			}
			fmt.Fprintln(w)
		}
	}
	for _, s := range r.Segments {
		if s.HeaderErr != "" && !segments {
			fmt.Fprintf(w, "damaged:   %s: header: %s\n", s.File, s.HeaderErr)
		}
	}
	for _, d := range r.Damage {
		events := "unknown events"
		if d.Events >= 0 {
			events = fmt.Sprintf("%d events", d.Events)
		}
		fmt.Fprintf(w, "damaged:   %s offset %d: %d bytes, %s: %s\n", d.File, d.Offset, d.Bytes, events, d.Reason)
	}
	for _, g := range r.Missing {
		fmt.Fprintf(w, "missing:   %d events before %s offset %d (removed or cut; flowpipe counts them as queue_corrupt when it reads past)\n", g.Events, g.File, g.Offset)
	}
	for _, name := range r.Ignored {
		fmt.Fprintf(w, "ignored:   %s (not part of the queue)\n", name)
	}
}
