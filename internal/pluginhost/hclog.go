package pluginhost

import (
	"bytes"
	"context"
	"io"
	"log"
	"log/slog"
	"math"
	"sync"

	"github.com/hashicorp/go-hclog"

	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// slogAdapter is the hclog.Logger go-plugin logs through on the host side: its own messages
// and every line a plugin writes to stderr (parsed from hclog JSON) land in flowpipe's slog
// log, with the component name the runtime put on the logger.
type slogAdapter struct {
	l    *slog.Logger
	name string
	args []any
	// own is set for go-plugin's own messages (plugin lines come through a Named logger):
	// its routine information ("plugin process exited" after a clean stop) is debug detail
	// for flowpipe's users; its warnings and errors (a crash) stay.
	own bool
}

func newHCLogAdapter(l *slog.Logger) hclog.Logger { return &slogAdapter{l: l, own: true} }

func (a *slogAdapter) Log(level hclog.Level, msg string, args ...any) {
	var lv slog.Level
	switch level {
	case hclog.Trace, hclog.Debug:
		lv = slog.LevelDebug
	case hclog.Info, hclog.NoLevel, hclog.DefaultLevel:
		lv = slog.LevelInfo
		if a.own {
			lv = slog.LevelDebug
		}
	case hclog.Warn:
		lv = slog.LevelWarn
	case hclog.Error:
		lv = slog.LevelError
	case hclog.Off:
		return
	}
	ctx := context.Background()
	if !a.l.Enabled(ctx, lv) {
		return
	}
	all := append(append([]any(nil), a.args...), args...)
	a.l.Log(ctx, lv, msg, fromPluginJSON(all)...)
}

// fromPluginJSON undoes what the trip through a plugin's JSON log line did to its
// attributes: they come back in the order the plugin logged them (pb.LogAttrsKey), go-plugin
// decodes every number as a float64, so integers come back as such (read_buffer=67108864,
// not 6.7108864e+07), and the plugin's own timestamp is dropped because the host's log
// record has one.
func fromPluginJSON(kv []any) []any {
	out := kv[:0:0]
	for i := 0; i < len(kv); i++ {
		if i+1 < len(kv) {
			if k, ok := kv[i].(string); ok {
				if k == "timestamp" {
					i++
					continue
				}
				if list, ok := kv[i+1].([]any); ok && k == pb.LogAttrsKey {
					// The plugin's attributes, in the order it logged them.
					out = append(out, fromPluginJSON(list)...)
					i++
					continue
				}
				if f, ok := kv[i+1].(float64); ok && f == math.Trunc(f) && math.Abs(f) < 1<<53 {
					out = append(out, k, int64(f))
					i++
					continue
				}
			}
		}
		out = append(out, kv[i])
	}
	return out
}

func (a *slogAdapter) Trace(msg string, args ...any) { a.Log(hclog.Trace, msg, args...) }
func (a *slogAdapter) Debug(msg string, args ...any) { a.Log(hclog.Debug, msg, args...) }
func (a *slogAdapter) Info(msg string, args ...any)  { a.Log(hclog.Info, msg, args...) }
func (a *slogAdapter) Warn(msg string, args ...any)  { a.Log(hclog.Warn, msg, args...) }
func (a *slogAdapter) Error(msg string, args ...any) { a.Log(hclog.Error, msg, args...) }

func (a *slogAdapter) IsTrace() bool { return a.l.Enabled(context.Background(), slog.LevelDebug) }
func (a *slogAdapter) IsDebug() bool { return a.l.Enabled(context.Background(), slog.LevelDebug) }
func (a *slogAdapter) IsInfo() bool  { return a.l.Enabled(context.Background(), slog.LevelInfo) }
func (a *slogAdapter) IsWarn() bool  { return a.l.Enabled(context.Background(), slog.LevelWarn) }
func (a *slogAdapter) IsError() bool { return a.l.Enabled(context.Background(), slog.LevelError) }

func (a *slogAdapter) ImpliedArgs() []any { return a.args }

func (a *slogAdapter) With(args ...any) hclog.Logger {
	return &slogAdapter{l: a.l, name: a.name, args: append(append([]any(nil), a.args...), args...), own: a.own}
}

func (a *slogAdapter) Name() string { return a.name }

// Named keeps the component's logger: go-plugin names sub-loggers after the binary, which
// the component name already identifies.
func (a *slogAdapter) Named(name string) hclog.Logger {
	return &slogAdapter{l: a.l, name: name, args: a.args}
}

func (a *slogAdapter) ResetNamed(name string) hclog.Logger { return a.Named(name) }

func (a *slogAdapter) SetLevel(hclog.Level) {}

func (a *slogAdapter) GetLevel() hclog.Level {
	switch {
	case a.IsDebug():
		return hclog.Debug
	case a.IsInfo():
		return hclog.Info
	case a.IsWarn():
		return hclog.Warn
	}
	return hclog.Error
}

func (a *slogAdapter) StandardLogger(*hclog.StandardLoggerOptions) *log.Logger {
	return slog.NewLogLogger(a.l.Handler(), slog.LevelInfo)
}

func (a *slogAdapter) StandardWriter(*hclog.StandardLoggerOptions) io.Writer {
	return &lineLogger{log: a.l, msg: "plugin output"}
}

// lineLogger logs each line written to it; it receives what a plugin prints to stdout.
type lineLogger struct {
	log *slog.Logger
	msg string
	mu  sync.Mutex
	buf []byte
}

func (w *lineLogger) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.log.Info(w.msg, "line", string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
	if len(w.buf) > 64<<10 {
		w.log.Info(w.msg, "line", string(w.buf))
		w.buf = w.buf[:0]
	}
	return len(p), nil
}
