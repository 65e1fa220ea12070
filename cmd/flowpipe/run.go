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
	"github.com/flowpipe/flowpipe/core/pipeline"
)

// Exit codes of flowpipe run (docs/architecture.md, Lifecycle).
const (
	exitOK          = 0 // stopped, and every accepted event was delivered
	exitFailed      = 1 // could not start (configuration, a component's start) or a source failed
	exitUndelivered = 3 // stopped, but accepted events were not delivered (counted in the log)
)

// forcedStopGrace is how long a second SIGINT/SIGTERM waits for the pipeline to count what
// it gives up before flowpipe exits regardless.
const forcedStopGrace = 5 * time.Second

func newRunCmd(g *globalFlags) *cobra.Command {
	var watch bool
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the pipeline until SIGINT/SIGTERM (or until its sources are exhausted)",
		Long: `run builds every component of the pipeline file, starts it, and runs until it receives
SIGINT or SIGTERM, or until every source is exhausted. On shutdown, sources stop, what is in
flight drains to the sinks within runtime.shutdown_timeout, and anything that could not be
delivered is reported with counts.

A second SIGINT or SIGTERM stops at once: what is still queued is given up, counted and
logged, and plugin processes are stopped without waiting for them.

SIGHUP reloads the pipeline file while flowpipe runs; so does POST /-/reload on the admin
listener, and, with --watch, any change of the file's content. The new file is loaded and
checked as at start; if anything is wrong nothing changes (the problems are logged as
validate prints them). Otherwise unchanged components keep running untouched, and changed,
new and removed ones are swapped in without losing an event the pipeline accepted; the log
shows the reload as a diff. admin: and data_dir: take effect only at start: a reload that
changes them is rejected (docs/configuration.md, Reload).

Exit status:
  0  stopped, and every event the pipeline accepted was delivered
  1  the pipeline could not start (configuration, a component's start) or a source failed
  3  stopped, but accepted events were not delivered: given up at shutdown, dropped by a
     full queue (when_full: drop_*) or after retry.max_attempts, or failed by an enricher;
     the log says how many, per sink`,
		Example: "  flowpipe run\n  flowpipe run -c examples/generate.yaml --log-format json\n  flowpipe run --watch          # reload pipeline.yaml whenever it changes\n  flowpipe reload               # reload it now, and print what changed\n  kill -HUP $(pidof flowpipe)   # reload it now, silently\n  FLOWPIPE_SINKS__STDOUT__PATH=/tmp/flows.jsonl flowpipe run   # the default pipeline's sink is named stdout",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Signals are taken before building, so that a SIGHUP or SIGTERM that arrives
			// while plugins start is handled too.
			sigs := make(chan os.Signal, 4)
			signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
			defer signal.Stop(sigs)
			// A closed standard output must be an error the file sink sees (EPIPE) and stops
			// the pipeline on, not a SIGPIPE that kills flowpipe before it drains its other
			// sinks and counts what it could not deliver.
			signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
			ctx, stop := context.WithCancel(context.Background())
			defer stop()
			log, err := g.logger()
			if err != nil {
				return err
			}
			ready := make(chan *pipeline.Pipeline, 1)
			finished := make(chan struct{})
			defer close(finished)
			reloads := make(chan string, 1) // SIGHUP before the reloader exists waits here
			go handleSignals(sigs, stop, ready, finished, reloads, log)

			doc, p, log, err := g.build(ctx)
			if err != nil {
				return err
			}
			ready <- p
			rl := newReloader(ctx, g, doc, p, log, reloads)
			if doc.Admin.Listen != "" {
				ao, err := adminOptions(doc, p, log)
				if err != nil {
					return err
				}
				ao.Reload = rl.serveHTTP
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
			if watch {
				if err := watchFile(ctx, g.config, log, func() { rl.request("watch") }); err != nil {
					p.Close(ctx)
					return err
				}
			}
			go rl.loop()
			warnRunAs(doc, log)
			stopNotify := notifyService(ctx, p, log)
			defer stopNotify()
			err = p.Run(ctx)
			rl.stop()
			if err != nil {
				if p.Undelivered() > 0 {
					log.Error("events were not delivered", "events", p.Undelivered())
				}
				return err
			}
			if p.Undelivered() > 0 {
				return exitError{exitUndelivered}
			}
			return nil
		},
	}
	addConfigFlag(cmd, g)
	cmd.Flags().BoolVar(&watch, "watch", false, "reload the pipeline file whenever its content changes (as SIGHUP does)")
	return cmd
}

// handleSignals turns signals into the pipeline's lifecycle: the first SIGINT/SIGTERM stops
// it gracefully, the second aborts the drain (and exits if the pipeline still does not
// return within forcedStopGrace), SIGHUP asks for a reload (on reloads, which the reloader
// reads once the pipeline runs).
func handleSignals(sigs <-chan os.Signal, stop context.CancelFunc, ready <-chan *pipeline.Pipeline, done <-chan struct{}, reloads chan<- string, log *slog.Logger) {
	var p *pipeline.Pipeline
	stopping := false
	for {
		select {
		case <-done:
			return
		case p = <-ready:
			continue
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				switch {
				case stopping:
					log.Warn("received SIGHUP while stopping; not reloading", "signal", "SIGHUP")
				case p == nil:
					log.Info("received SIGHUP while starting; the pipeline file is reloaded once the pipeline runs", "signal", "SIGHUP")
					fallthrough
				default:
					select {
					case reloads <- "SIGHUP":
					default: // a reload is already asked for: it reads the file as it is then
					}
				}
				continue
			}
			if !stopping {
				stopping = true
				log.Info("received "+sigName(sig)+"; stopping (send it again to stop at once)", "signal", sigName(sig))
				stop()
				continue
			}
			log.Warn("received "+sigName(sig)+" again; stopping at once, giving up on what is not delivered", "signal", sigName(sig))
			if p == nil {
				os.Exit(exitFailed) // still building: nothing was accepted yet
			}
			p.Abort()
			select {
			case <-done:
				return
			case <-time.After(forcedStopGrace):
			}
			log.Error("pipeline did not stop after the forced stop; exiting", "grace", forcedStopGrace, "events_not_delivered_at_least", p.Undelivered())
			os.Exit(exitUndelivered)
		}
	}
}

func sigName(s os.Signal) string {
	switch s {
	case os.Interrupt:
		return "SIGINT"
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGHUP:
		return "SIGHUP"
	}
	return s.String()
}

// warnRunAs says once, at start, when components' processes keep root (no run_as:) or when
// run_as: cannot apply (flowpipe is not root); docs/security.md explains the choice.
func warnRunAs(doc *config.Document, log *slog.Logger) {
	var asRoot, ignored []string
	for _, list := range [][]config.Component{doc.Sources, doc.Enrichers, doc.Sinks} {
		for _, c := range list {
			if c.Isolation == "inproc" || !c.Enabled || !doc.Enabled {
				continue // runs in flowpipe's own process, or not at all
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
