package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// buildWebhookPlugin builds the example third-party sink (examples/webhook-sink, its own Go
// module) into dir/plugins, where `plugin: webhook` finds it.
func buildWebhookPlugin(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "plugins", "flowpipe-sink-webhook")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = filepath.Join("..", "..", "examples", "webhook-sink")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the example plugin: %v\n%s", err, out)
	}
	return bin
}

// A reload that gives a running external plugin a wrong option is refused before anything
// changes, with the problem at its line, as for a built-in: flowpipe asks the plugin to
// check the options (the Check call) instead of finding out half-way through applying them.
// The plugin goes on with its old options; a good change is then applied.
func TestReloadChecksAnExternalPluginsOptions(t *testing.T) {
	dir := t.TempDir()
	buildWebhookPlugin(t, dir)
	var mu sync.Mutex
	var posts atomic.Int64
	auth := map[string]bool{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		auth[r.Header.Get("Authorization")] = true
		mu.Unlock()
		posts.Add(1)
	}))
	defer srv.Close()
	yaml := func(url, token string) string {
		return fmt.Sprintf(`admin: {listen: "127.0.0.1:0", token: %s}
sources:
  gen: {type: generate, rate: 2000, batch_size: 100}
sinks:
  hook:
    plugin: webhook
    url: %s
    headers: {Authorization: %s}
`, reloadToken, url, token)
	}
	file := filepath.Join(dir, "p.yaml")
	r := startRun(t, dir, yaml(srv.URL+"/flows", "Bearer one"))
	eventually(t, "posts to the webhook", func() bool { return posts.Load() > 0 })

	replaceFile(t, file, yaml("localhost", "Bearer two"))
	code, body := postReload(t, r.admin)
	var got []string
	if ps, ok := body["problems"].([]any); ok {
		for _, p := range ps {
			got = append(got, fmt.Sprint(p))
		}
	}
	want := []string{`p.yaml:7: sinks.hook.url: want an http:// or https:// URL, got "localhost"`}
	if code != http.StatusUnprocessableEntity || body["result"] != "rejected" || !slices.Equal(got, want) {
		t.Fatalf("POST /-/reload with a bad option for the external plugin: %d %v, want 422 rejected with %q", code, body, want)
	}
	if v := reloads(t, r.admin, "rejected"); v != 1 {
		t.Errorf("flowpipe_config_reloads_total{result=\"rejected\"} = %v, want 1", v)
	}
	// Nothing changed: the plugin posts on, with its old options.
	before := posts.Load()
	eventually(t, "posts after the refused reload", func() bool { return posts.Load() > before+2 })
	mu.Lock()
	if auth["Bearer two"] {
		t.Errorf("the refused options reached the plugin: a post carried the new header")
	}
	mu.Unlock()

	// A good change is applied.
	replaceFile(t, file, yaml(srv.URL+"/flows", "Bearer two"))
	code, body = postReload(t, r.admin)
	if code != http.StatusOK || body["result"] != "applied" {
		t.Fatalf("POST /-/reload with good options: %d %v", code, body)
	}
	eventually(t, "a post with the new header", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return auth["Bearer two"]
	})
	for _, rec := range logRecords(r.stderr.String()) {
		msg := fmt.Sprint(rec["msg"])
		if rec["level"] == "ERROR" && rec["reload"] != "rejected" && !strings.HasPrefix(msg, "reload rejected: ") {
			t.Errorf("flowpipe logged an error besides the refused reload: %s", msg)
		}
	}
}
