package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/config"
)

// POST /-/reload maps what the reload returned to a status and a JSON body, behind the
// token. The reload itself is flowpipe run's (cmd/flowpipe/reload_test.go runs it end to
// end); here it returns each outcome in turn.
func TestReloadEndpoint(t *testing.T) {
	outcomes := []struct {
		report any
		err    error
	}{
		{map[string]any{"result": "applied", "kept": []string{"source/gen"}}, nil},
		{nil, config.Problems{{Where: "pipeline.yaml:4", Path: "sources.gen.rate", Msg: `want an integer, got string "fast"`}}},
		{nil, fmt.Errorf("%w: flowpipe is stopping", ErrReloadUnavailable)},
		{nil, errors.New("start sink/out: connection refused")},
		{map[string]any{"result": "failed", "errors": []string{"source/gen: start: boom"}}, errors.New("applied in part")},
	}
	calls := 0
	s, err := Serve(Options{Listen: "127.0.0.1:0", Registry: prometheus.NewRegistry(), Token: "t0k",
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Reload: func(ctx context.Context) (any, error) {
			o := outcomes[calls%len(outcomes)]
			calls++
			return o.report, o.err
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(context.Background())
	do := func(method, token string) (int, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(method, "http://"+s.Addr()+"/-/reload", nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&body)
		return resp.StatusCode, body
	}
	if code, _ := do("POST", ""); code != http.StatusUnauthorized {
		t.Errorf("without the token: %d, want 401", code)
	}
	if code, _ := do("POST", "wrong"); code != http.StatusUnauthorized {
		t.Errorf("with a wrong token: %d, want 401", code)
	}
	if code, _ := do("GET", "t0k"); code != http.StatusMethodNotAllowed {
		t.Errorf("GET: %d, want 405", code)
	}
	if calls != 0 {
		t.Fatalf("%d reloads ran for requests that were refused", calls)
	}
	if code, body := do("POST", "t0k"); code != 200 || body["result"] != "applied" || fmt.Sprint(body["kept"]) != "[source/gen]" {
		t.Errorf("applied: %d %v", code, body)
	}
	code, body := do("POST", "t0k")
	if probs, _ := body["problems"].([]any); code != 422 || body["result"] != "rejected" || len(probs) != 1 ||
		probs[0] != `pipeline.yaml:4: sources.gen.rate: want an integer, got string "fast"` {
		t.Errorf("rejected: %d %v", code, body)
	}
	if code, body := do("POST", "t0k"); code != 503 || !strings.Contains(fmt.Sprint(body["error"]), "stopping") {
		t.Errorf("unavailable: %d %v", code, body)
	}
	if code, body := do("POST", "t0k"); code != 500 || body["result"] != "failed" || !strings.Contains(fmt.Sprint(body["error"]), "connection refused") {
		t.Errorf("failed: %d %v", code, body)
	}
	// Applied in part: the answer says what was done and what failed.
	if code, body := do("POST", "t0k"); code != 500 || body["result"] != "failed" || fmt.Sprint(body["errors"]) != "[source/gen: start: boom]" {
		t.Errorf("failed in part: %d %v", code, body)
	}
}
