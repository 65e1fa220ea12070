package admin

import (
	"context"
	"errors"
	"net/http"

	"github.com/flowpipe/flowpipe/core/config"
)

// ErrReloadUnavailable is what Options.Reload returns (wrapped) when no reload can run now:
// the pipeline is still starting, or it is stopping. POST /-/reload answers it with 503.
var ErrReloadUnavailable = errors.New("no reload now")

// serveReload is POST /-/reload: it applies the pipeline file again, as SIGHUP does, and
// answers once the reload is done: 200 with what changed, 422 with the problems when the new
// file is rejected (nothing changed), 503 when no reload can run now, 500 when applying the
// new file failed (with what was done, when it was applied in part). docs/observe.md
// documents the bodies.
func (s *Server) serveReload(w http.ResponseWriter, r *http.Request) {
	// A client that gives up does not cut a reload short: it finishes, and is logged and
	// counted, whoever asked for it.
	report, err := s.opts.Reload(context.WithoutCancel(r.Context()))
	var probs config.Problems
	switch {
	case err == nil:
		writeJSON(w, report)
	case errors.As(err, &probs):
		lines := make([]string, len(probs))
		for i, p := range probs {
			lines[i] = p.String()
		}
		writeJSONStatus(w, http.StatusUnprocessableEntity, map[string]any{"result": "rejected", "problems": lines})
	case errors.Is(err, ErrReloadUnavailable):
		writeJSONStatus(w, http.StatusServiceUnavailable, map[string]any{"result": "unavailable", "error": err.Error()})
	case report != nil:
		// Applied in part: what was done, and what failed.
		writeJSONStatus(w, http.StatusInternalServerError, report)
	default:
		writeJSONStatus(w, http.StatusInternalServerError, map[string]any{"result": "failed", "error": err.Error()})
	}
}

func writeJSONStatus(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	writeJSONBody(w, v)
}
