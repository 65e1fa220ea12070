// Command flowpipe runs flow-log pipelines: sources of flow events (kernel conntrack, a
// userspace tracker, a gRPC receiver, ...), enrichers, and sinks, wired by pipeline.yaml.
package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/flowpipe/flowpipe/core/config"
)

type globalFlags struct {
	logLevel  string
	logFormat string
	config    string
}

func main() {
	os.Exit(execute(os.Args[1:]))
}

// exitError carries a process exit code through cobra.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

func execute(args []string) int {
	root := newRootCmd()
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			return ee.code
		}
		fmt.Fprintln(os.Stderr, "flowpipe:", err)
		return 1
	}
	return 0
}

func newRootCmd() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:   "flowpipe",
		Short: "Turn connection tracking into flow logs that nobody loses",
		Long: `flowpipe reads flows where they happen (kernel conntrack, a userspace tracker, a gRPC
receiver), enriches them, and delivers them to sinks with end-to-end acknowledgements.
A pipeline is declared in pipeline.yaml.`,
		Example:       "  flowpipe run\n  flowpipe validate -c /etc/flowpipe/pipeline.yaml\n  flowpipe graph --format mermaid",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	root.PersistentFlags().StringVar(&g.logFormat, "log-format", "text", "log format: text or json")
	root.AddCommand(newRunCmd(g), newValidateCmd(g), newGraphCmd(g), newVersionCmd(),
		newPluginsCmd(g), newPluginCmd(), newTapCmd(g), newTopCmd(g), newQueueCmd(), newReloadCmd(g))
	return root
}

// addConfigFlag adds -c/--config with its default from FLOWPIPE_CONFIG or ./pipeline.yaml.
func addConfigFlag(cmd *cobra.Command, g *globalFlags) {
	def := os.Getenv("FLOWPIPE_CONFIG")
	if def == "" {
		def = "pipeline.yaml"
	}
	cmd.Flags().StringVarP(&g.config, "config", "c", def, "pipeline file (default $FLOWPIPE_CONFIG or ./pipeline.yaml)")
}

func (g *globalFlags) logger() (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(g.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", g.logLevel)
	}
	// Durations read "1.5s" in both formats, as a plugin's lines do (they reach this log
	// as text), so a line is the same whether its component runs in or out of process.
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if a.Value.Kind() == slog.KindDuration {
			a.Value = slog.StringValue(a.Value.Duration().String())
		}
		return a
	}}
	journal := underJournal()
	switch strings.ToLower(g.logFormat) {
	case "text":
		if journal {
			return slog.New(newJournalHandler(os.Stderr, opts)), nil
		}
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		if journal {
			prev := opts.ReplaceAttr
			opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
				if len(groups) == 0 && a.Key == slog.TimeKey {
					return slog.Attr{} // the journal timestamps every line
				}
				return prev(groups, a)
			}
		}
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", g.logFormat)
}

// loadConfig loads the pipeline file; problems are printed one per line.
func (g *globalFlags) loadConfig() (*config.Document, error) {
	return config.LoadFile(g.config, os.Environ())
}

// printProblems writes every configuration problem to stderr and returns the exit error.
func printProblems(err error) error {
	var ps config.Problems
	if errors.As(err, &ps) {
		for _, p := range ps {
			fmt.Fprintln(os.Stderr, p.String())
		}
		fmt.Fprintf(os.Stderr, "%d problem(s) found\n", len(ps))
		return exitError{1}
	}
	return err
}
