package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/internal/pluginhost"
	"github.com/flowpipe/flowpipe/sdk"
)

// newPluginCmd is the hidden command the plugin host runs to serve a built-in as a plugin
// (pipelineOptions): the flowpipe binary re-executed as `flowpipe plugin serve KIND TYPE`.
func newPluginCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "plugin", Hidden: true, Short: "Internal: serve a built-in component as a plugin process"}
	cmd.AddCommand(&cobra.Command{
		Use:   "serve KIND TYPE",
		Short: "Serve a built-in component to the flowpipe that started this process",
		Args:  cobra.ExactArgs(2),
		RunE: func(_ *cobra.Command, args []string) error {
			f, ok := newRegistry().Lookup(component.Kind(args[0]), args[1])
			if !ok {
				return fmt.Errorf("no built-in %s of type %q", args[0], args[1])
			}
			sdk.Serve(f, flowpipeVersion())
			return nil
		},
	})
	return cmd
}

func newPluginsCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "plugins", Short: "Inspect built-in components and installed plugins"}
	list := &cobra.Command{
		Use:   "list",
		Short: "List built-ins and the plugins found beside the pipeline file and in $FLOWPIPE_PLUGIN_DIR",
		Long: `list shows every built-in component and every plugin binary named flowpipe-<kind>-<name>
in plugins/ beside the pipeline file and in $FLOWPIPE_PLUGIN_DIR, with its kind, version and
SHA-256 (the value to pin with sha256: in pipeline.yaml). Each plugin is started briefly to
ask its type and version.`,
		Example: "  flowpipe plugins list\n  flowpipe plugins list -c /etc/flowpipe/pipeline.yaml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := g.logger()
			if err != nil {
				return err
			}
			dir := filepath.Dir(g.config)
			return listPlugins(cmd.Context(), cmd.OutOrStdout(), dir, log)
		},
	}
	addConfigFlag(list, g)
	cmd.AddCommand(list)
	return cmd
}

func listPlugins(ctx context.Context, w io.Writer, configDir string, log *slog.Logger) error {
	if ctx == nil {
		ctx = context.Background()
	}
	reg := newRegistry()
	selfSum := "-"
	if exe, err := os.Executable(); err == nil {
		if sum, err := pluginhost.FileSHA256(exe); err == nil {
			selfSum = hex.EncodeToString(sum)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tNAME\tFROM\tVERSION\tSHA256\tSUMMARY")
	for _, f := range builtins() {
		fmt.Fprintf(tw, "%s\t%s\tbuilt-in\t%s\t%s\t%s\n", f.Kind, f.Type, flowpipeVersion(), selfSum, f.Summary)
	}
	host := pluginhost.NewHost(pluginhost.HostOptions{Registry: reg})
	// The plugins' own start-up chatter stays out of the listing (at debug level it shows).
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	if log.Enabled(ctx, slog.LevelDebug) {
		quiet = log
	}
	for _, l := range host.Discover(ctx, configDir, quiet) {
		v, summary := l.Version, l.Summary
		if l.Err != nil {
			v, summary = "?", "error: "+l.Err.Error()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", l.Kind, l.Name, l.Path, v, l.SHA256, summary)
	}
	return tw.Flush()
}
