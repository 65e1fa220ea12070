package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/flowpipe/flowpipe/core/admin"
)

func newRunCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the pipeline until SIGINT/SIGTERM (or until its sources are exhausted)",
		Long: `run builds every component of the pipeline file, starts it, and runs until it receives
SIGINT or SIGTERM, or until every source is exhausted. On shutdown, sources stop, what is in
flight drains to the sinks within runtime.shutdown_timeout, and anything that could not be
delivered is reported with counts.`,
		Example: "  flowpipe run\n  flowpipe run -c examples/generate.yaml --log-format json\n  FLOWPIPE_SINKS__STDOUT__PATH=/tmp/flows.jsonl flowpipe run   # the default pipeline's sink is named stdout",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			doc, p, log, err := g.build(ctx)
			if err != nil {
				return err
			}
			if doc.Admin.Listen != "" {
				ao, err := adminOptions(doc, p, log)
				if err != nil {
					return err
				}
				srv, err := admin.Serve(ao)
				if err != nil {
					return err
				}
				defer func() {
					c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
					defer cancel()
					_ = srv.Shutdown(c)
				}()
			}
			return p.Run(ctx)
		},
	}
	addConfigFlag(cmd, g)
	return cmd
}
