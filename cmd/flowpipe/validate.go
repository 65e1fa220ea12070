package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/flowpipe/flowpipe/core/config"
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
			return validateFile(cmd.OutOrStdout(), g)
		},
	}
	addConfigFlag(cmd, g)
	return cmd
}

// validateFile is `flowpipe validate`: the problems go to stderr (and the error is exit 1),
// the verdict on a valid file to w.
func validateFile(w io.Writer, g *globalFlags) error {
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
	fmt.Fprintf(w, "%s: valid (%d sources, %d enrichers, %d sinks%s)\n", doc.File, len(doc.Sources), len(doc.Enrichers), len(doc.Sinks), disabledNote(doc))
	return nil
}

// disabledNote says what of a valid pipeline is turned off (enabled: false).
func disabledNote(doc *config.Document) string {
	if !doc.Enabled {
		return "; the pipeline is disabled (enabled: false): flowpipe run runs nothing until it is enabled"
	}
	var off []string
	for _, list := range [][]config.Component{doc.Sources, doc.Enrichers, doc.Sinks} {
		for _, c := range list {
			if !c.Enabled {
				off = append(off, string(c.Kind)+" "+c.Name)
			}
		}
	}
	if len(off) == 0 {
		return ""
	}
	return "; disabled: " + strings.Join(off, ", ")
}
