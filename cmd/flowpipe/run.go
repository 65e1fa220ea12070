package main

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/flowpipe/flowpipe/core/admin"
	"github.com/flowpipe/flowpipe/core/config"
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
			warnRunAs(doc, log)
			stopNotify := notifyService(ctx, p, log)
			defer stopNotify()
			return p.Run(ctx)
		},
	}
	addConfigFlag(cmd, g)
	return cmd
}

// warnRunAs says once, at start, when components' processes keep root (no run_as:) or when
// run_as: cannot apply (flowpipe is not root); docs/security.md explains the choice.
func warnRunAs(doc *config.Document, log *slog.Logger) {
	var asRoot, ignored []string
	for _, list := range [][]config.Component{doc.Sources, doc.Enrichers, doc.Sinks} {
		for _, c := range list {
			if c.Isolation == "inproc" {
				continue
			}
			switch {
			case os.Geteuid() == 0 && c.RunAs == "":
				asRoot = append(asRoot, c.Path)
			case os.Geteuid() != 0 && c.RunAs != "":
				ignored = append(ignored, c.Path)
			}
		}
	}
	if len(asRoot) > 0 {
		log.Warn("plugin processes run as root, each with only the capabilities it needs; set run_as: flowpipe in the pipeline file to run them as an unprivileged user (docs/security.md)", "components", strings.Join(asRoot, ","))
	}
	if len(ignored) > 0 {
		log.Warn("run_as is ignored: flowpipe does not run as root, so plugin processes run as its own user", "uid", os.Geteuid(), "components", strings.Join(ignored, ","))
	}
}
