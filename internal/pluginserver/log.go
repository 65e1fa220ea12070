package pluginserver

import (
	"context"
	"encoding"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"sync"

	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// hclogHandler writes slog records as the JSON lines go-plugin's host parses as hclog output
// (@level, @message, @timestamp), with the attributes in order under pb.LogAttrsKey. Values are written as
// the in-process text log shows them: durations as "1.5s", times in RFC 3339 with
// milliseconds, other values in their text form (or %+v), groups as dotted keys.
type hclogHandler struct {
	mu     *sync.Mutex
	w      io.Writer
	level  slog.Leveler
	attrs  []any // key, value, ... from WithAttrs
	prefix string
}

func newHCLogHandler(w io.Writer, level slog.Leveler) *hclogHandler {
	return &hclogHandler{mu: &sync.Mutex{}, w: w, level: level}
}

func (h *hclogHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level.Level() }

func (h *hclogHandler) Handle(_ context.Context, r slog.Record) error {
	kv := append([]any(nil), h.attrs...)
	r.Attrs(func(a slog.Attr) bool {
		kv = appendAttr(kv, h.prefix, a)
		return true
	})
	line, err := json.Marshal(map[string]any{
		"@level":       hclogLevel(r.Level),
		"@message":     r.Message,
		"@timestamp":   r.Time.Format("2006-01-02T15:04:05.000000Z07:00"),
		pb.LogAttrsKey: kv,
	})
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err = h.w.Write(append(line, '\n'))
	return err
}

func (h *hclogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	h2 := *h
	h2.attrs = append([]any(nil), h.attrs...)
	for _, a := range as {
		h2.attrs = appendAttr(h2.attrs, h.prefix, a)
	}
	return &h2
}

func (h *hclogHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	h2 := *h
	h2.prefix = h.prefix + name + "."
	return &h2
}

// appendAttr adds a's key and value as the text handler would show them.
func appendAttr(kv []any, prefix string, a slog.Attr) []any {
	v := a.Value.Resolve()
	if v.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += a.Key + "."
		}
		for _, g := range v.Group() {
			kv = appendAttr(kv, p, g)
		}
		return kv
	}
	if a.Key == "" {
		return kv
	}
	var out any
	switch v.Kind() {
	case slog.KindDuration:
		out = v.Duration().String()
	case slog.KindTime:
		out = v.Time().Format("2006-01-02T15:04:05.000Z07:00") // as slog's text handler
	case slog.KindString:
		out = v.String()
	case slog.KindInt64, slog.KindUint64, slog.KindFloat64, slog.KindBool:
		out = v.Any()
	default:
		// As slog's text handler shows a value: its text form if it has one, else %+v.
		out = fmt.Sprintf("%+v", v.Any())
		if tm, ok := v.Any().(encoding.TextMarshaler); ok {
			if b, err := tm.MarshalText(); err == nil {
				out = string(b)
			}
		}
	}
	return append(kv, prefix+a.Key, out)
}

func hclogLevel(l slog.Level) string {
	switch {
	case l < slog.LevelInfo:
		return "debug"
	case l < slog.LevelWarn:
		return "info"
	case l < slog.LevelError:
		return "warn"
	}
	return "error"
}
