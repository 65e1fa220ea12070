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

func newGraphCmd(g *globalFlags) *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "graph",
		Short: "Check the pipeline and print it as a graph (Graphviz dot or Mermaid)",
		Example: "  flowpipe graph | dot -Tsvg > pipeline.svg\n" +
			"  flowpipe graph --format mermaid",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if format != "dot" && format != "mermaid" {
				return fmt.Errorf("--format %q: want dot or mermaid", format)
			}
			// Checked as validate checks it: an invalid pipeline is not drawn, and its
			// problems are printed with their lines (exit status 1).
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			doc, p, _, err := g.build(ctx)
			if err != nil {
				return err
			}
			p.Close(ctx)
			switch format {
			case "dot":
				writeDot(cmd.OutOrStdout(), doc)
			case "mermaid":
				writeMermaid(cmd.OutOrStdout(), doc)
			default:
				return fmt.Errorf("--format %q: want dot or mermaid", format)
			}
			return nil
		},
	}
	addConfigFlag(cmd, g)
	cmd.Flags().StringVar(&format, "format", "dot", "output format: dot or mermaid")
	return cmd
}

type graphNode struct{ id, label string }

// graphOf lays the pipeline out as stages: sources, each enricher, sinks.
func graphOf(doc *config.Document) [][]graphNode {
	label := func(c config.Component) string {
		t := c.Type
		if c.Plugin != "" {
			t = "plugin " + c.Plugin
		}
		off := ""
		if !c.Enabled || !doc.Enabled {
			off = ", disabled"
		}
		return fmt.Sprintf("%s\\n(%s %s%s)", c.Name, c.Kind, t, off)
	}
	var stages [][]graphNode
	var st []graphNode
	for _, c := range doc.Sources {
		st = append(st, graphNode{"source_" + ident(c.Name), label(c)})
	}
	stages = append(stages, st)
	for i, c := range doc.Enrichers {
		stages = append(stages, []graphNode{{fmt.Sprintf("enricher_%d_%s", i, ident(c.Name)), label(c)}})
	}
	st = nil
	for _, c := range doc.Sinks {
		st = append(st, graphNode{"sink_" + ident(c.Name), label(c)})
	}
	return append(stages, st)
}

func ident(s string) string { return strings.NewReplacer("-", "_").Replace(s) }

func writeDot(w io.Writer, doc *config.Document) {
	stages := graphOf(doc)
	fmt.Fprintln(w, "digraph pipeline {\n  rankdir=LR;\n  node [shape=box];")
	for _, st := range stages {
		for _, n := range st {
			fmt.Fprintf(w, "  %s [label=\"%s\"];\n", n.id, n.label)
		}
	}
	for i := 0; i+1 < len(stages); i++ {
		for _, a := range stages[i] {
			for _, b := range stages[i+1] {
				fmt.Fprintf(w, "  %s -> %s;\n", a.id, b.id)
			}
		}
	}
	fmt.Fprintln(w, "}")
}

func writeMermaid(w io.Writer, doc *config.Document) {
	stages := graphOf(doc)
	fmt.Fprintln(w, "flowchart LR")
	for _, st := range stages {
		for _, n := range st {
			fmt.Fprintf(w, "  %s[\"%s\"]\n", n.id, strings.ReplaceAll(n.label, "\\n", "<br/>"))
		}
	}
	for i := 0; i+1 < len(stages); i++ {
		for _, a := range stages[i] {
			for _, b := range stages[i+1] {
				fmt.Fprintf(w, "  %s --> %s\n", a.id, b.id)
			}
		}
	}
}
