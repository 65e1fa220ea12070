package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/flowpipe/flowpipe/core/pipeline"
	"github.com/flowpipe/flowpipe/internal/sdnotify"
)

// notifyService tells systemd (Type=notify, packaging/flowpipe.service) what the pipeline is
// doing: READY=1 once every component started, WATCHDOG=1 every half WatchdogSec= while it
// runs, STOPPING=1 when shutdown begins. Outside systemd it does nothing. The returned
// function stops the watchdog; call it when Run returns.
func notifyService(ctx context.Context, p *pipeline.Pipeline, log *slog.Logger) func() {
	if os.Getenv(sdnotify.SocketEnv) == "" {
		return func() {}
	}
	send := func(states ...string) {
		if _, err := sdnotify.Notify(states...); err != nil {
			log.Warn("cannot notify systemd", "error", err)
		}
	}
	interval, watchdog, err := sdnotify.WatchdogInterval()
	if err != nil {
		log.Warn("systemd watchdog ignored", "error", err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-p.Running():
			send(sdnotify.Ready, "STATUS=pipeline running")
		case <-ctx.Done():
			send(sdnotify.Stopping, "STATUS=stopping")
			return
		case <-done:
			return
		}
		var tick <-chan time.Time
		if watchdog {
			t := time.NewTicker(interval)
			defer t.Stop()
			tick = t.C
		}
		for {
			select {
			case <-tick:
				send(sdnotify.Watchdog)
			case <-ctx.Done():
				send(sdnotify.Stopping, "STATUS=stopping: draining in-flight batches")
				// Shutdown may take up to runtime.shutdown_timeout: keep the watchdog fed.
				for {
					select {
					case <-tick:
						send(sdnotify.Watchdog)
					case <-done:
						return
					}
				}
			case <-done:
				return
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

// underJournal reports whether standard error is connected to systemd's journal: systemd
// sets $JOURNAL_STREAM to the device and inode of the stream it gave the service, so a
// redirected stderr (flowpipe run 2>file inside a unit) does not count.
func underJournal() bool {
	v := os.Getenv("JOURNAL_STREAM")
	if v == "" {
		return false
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(2, &st); err != nil {
		return false
	}
	return v == fmt.Sprintf("%d:%d", st.Dev, st.Ino)
}

// journalHandler writes text log lines for the journal: no timestamp (the journal keeps its
// own) and the level as a syslog priority prefix (<3> error ... <7> debug, sd-daemon(3)),
// so that journalctl -p warning works.
type journalHandler struct {
	mu    *sync.Mutex
	w     io.Writer
	inner slog.Handler
}

func newJournalHandler(w io.Writer, opts *slog.HandlerOptions) slog.Handler {
	o := *opts
	prev := o.ReplaceAttr
	o.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && (a.Key == slog.TimeKey || a.Key == slog.LevelKey) {
			return slog.Attr{}
		}
		if prev != nil {
			return prev(groups, a)
		}
		return a
	}
	return &journalHandler{mu: &sync.Mutex{}, w: w, inner: slog.NewTextHandler(w, &o)}
}

func (h *journalHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.inner.Enabled(ctx, l)
}

func (h *journalHandler) Handle(ctx context.Context, r slog.Record) error {
	prio := "<6>"
	switch {
	case r.Level >= slog.LevelError:
		prio = "<3>"
	case r.Level >= slog.LevelWarn:
		prio = "<4>"
	case r.Level < slog.LevelInfo:
		prio = "<7>"
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, err := io.WriteString(h.w, prio); err != nil {
		return err
	}
	return h.inner.Handle(ctx, r)
}

func (h *journalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &journalHandler{mu: h.mu, w: h.w, inner: h.inner.WithAttrs(as)}
}

func (h *journalHandler) WithGroup(name string) slog.Handler {
	return &journalHandler{mu: h.mu, w: h.w, inner: h.inner.WithGroup(name)}
}
