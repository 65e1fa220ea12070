package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"
)

func newValidateCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "validate",
		Short: "Check the pipeline file and every component's options without running anything",
		Long: `validate loads the pipeline file, applies environment overrides, and checks every
component's options. It prints every problem with its file, line and key path, and exits 1
when there is any, 0 when the pipeline is valid.`,
		Example: "  flowpipe validate\n  flowpipe validate -c /etc/flowpipe/pipeline.yaml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			doc, p, log, err := g.build(ctx)
			if err != nil {
				return err
			}
			p.Close(ctx)
			if doc.Admin.Listen != "" {
				// The admin listener's token file and certificates are read as run would.
				if _, err := adminOptions(doc, p, log); err != nil {
					return err
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: valid (%d sources, %d enrichers, %d sinks)\n", doc.File, len(doc.Sources), len(doc.Enrichers), len(doc.Sinks))
			return nil
		},
	}
	addConfigFlag(cmd, g)
	return cmd
}
