package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"sync"

	"github.com/spf13/cobra"
)

// Set at build time by scripts/release.sh:
//
//	-ldflags "-X main.version=v1.2.3 -X main.commit=<sha> -X main.date=<RFC 3339>"
//
// A build without them (go build, go install) takes what it can from the Go toolchain's
// build information: the module version for `go install ...@v1.2.3`, else the VCS stamp
// (`devel+<commit>`, `+dirty` when the tree had changes).
var (
	version string
	commit  string
	date    string
)

// buildInfo is what `flowpipe version` prints and what built-in plugins report.
type buildInfo struct {
	Version string // v1.2.3, or devel+<12-digit commit>[+dirty], or devel
	Commit  string // full commit hash, or ""
	Date    string // commit or build time, RFC 3339, or ""
	Dirty   bool
}

var readBuildInfo = sync.OnceValue(func() buildInfo {
	b := buildInfo{Version: version, Commit: commit, Date: date}
	bi, ok := debug.ReadBuildInfo()
	if ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if b.Commit == "" {
					b.Commit = s.Value
				}
			case "vcs.time":
				if b.Date == "" {
					b.Date = s.Value
				}
			case "vcs.modified":
				b.Dirty = s.Value == "true"
			}
		}
		if b.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" && !b.Dirty {
			b.Version = bi.Main.Version // go install github.com/flowpipe/flowpipe/cmd/flowpipe@v1.2.3
		}
	}
	if b.Version == "" {
		b.Version = "devel"
		if b.Commit != "" {
			b.Version += "+" + short(b.Commit)
		}
		if b.Dirty {
			b.Version += "+dirty"
		}
	}
	return b
})

func short(commit string) string {
	if len(commit) > 12 {
		return commit[:12]
	}
	return commit
}

// flowpipeVersion is the version string built-in plugins report (plugins list).
func flowpipeVersion() string { return readBuildInfo().Version }

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print flowpipe's version, commit and build date",
		Example: "  flowpipe version",
		Args:    cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			b := readBuildInfo()
			fmt.Fprintf(cmd.OutOrStdout(), "flowpipe %s\n", b.Version)
			if b.Commit != "" {
				dirty := ""
				if b.Dirty {
					dirty = " (modified)"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "commit:  %s%s\n", b.Commit, dirty)
			}
			if b.Date != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "date:    %s\n", b.Date)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "go:      %s %s/%s\n", runtime.Version(), runtime.GOOS, runtime.GOARCH)
		},
	}
}
