package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// TestReloadCollectorRotatesSecretsInPlace rotates a collector's secret under load, as an
// operator would, with real processes in the default isolation: a collector (grpc source,
// secrets [s1] → file) and an agent (generate at 50,000 events/s → grpc sink with token s1).
// The collector is reloaded by SIGHUP to [s1, s2], the agent to token s2, the collector to
// [s2]. Each collector reload is applied without errors and logged how=reconfigured, its
// grpc source keeps its plugin process (the listener is never re-bound), no stream is
// refused for its token, and every event the agent generated is in the collector's output
// exactly once.
func TestReloadCollectorRotatesSecretsInPlace(t *testing.T) {
	dir := t.TempDir()
	const s1, s2 = "rotate-secret-one-0123456789", "rotate-secret-two-0123456789"
	addr := testenv.FreeTCPAddr(t)
	collectorYAML := func(secrets string) string {
		return fmt.Sprintf(`admin: {listen: ""}
sources:
  agents: {type: grpc, listen: %q, auth: hmac, secrets: [%s], dedup: {window: 10m}}
sinks:
  out: {type: file, path: collector.jsonl}
`, addr, secrets)
	}
	col := startProc(t, dir, "collector", collectorYAML(s1))
	sourcePID := func() int {
		t.Helper()
		var pids []int
		for pid, typ := range pluginsByType(t, col.cmd.Process.Pid) {
			if typ == "source grpc" {
				pids = append(pids, pid)
			}
		}
		if len(pids) != 1 {
			t.Fatalf("the collector's grpc source plugin processes: %v, want one", pids)
		}
		return pids[0]
	}
	pid := sourcePID()

	cfg := agentConfig{admin: testenv.FreeTCPAddr(t), url: `url: "http://` + addr + `"`, secret: s1}
	agent := startRun(t, dir, cfg.yaml())
	eventually(t, "agent running", func() bool { return strings.Contains(agent.stderr.String(), "pipeline running") })
	collected := filepath.Join(dir, "collector.jsonl")
	keepsGrowing(t, collected)

	reloadCollector := func(n int, secrets string) {
		t.Helper()
		replaceFile(t, filepath.Join(dir, "collector.yaml"), collectorYAML(secrets))
		if err := col.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		eventually(t, fmt.Sprintf("collector reload %d applied", n), func() bool {
			return logged(col.stderr.String(), "reload applied", nil) == n
		})
		log := col.stderr.String()
		if got := logged(log, "reload applied", map[string]string{"errors": "0", "changed": "1"}); got != n {
			t.Fatalf("collector reload %d (secrets [%s]): %d of %d reloads applied with one change and no errors", n, secrets, got, n)
		}
		if got := logged(log, "reload: changed", map[string]string{"component": "source/agents", "keys": "secrets", "how": "reconfigured"}); got != n {
			t.Fatalf("collector reload %d: %d reloads logged source/agents secrets how=reconfigured, want %d", n, got, n)
		}
		if now := sourcePID(); now != pid {
			t.Fatalf("collector reload %d: the grpc source's plugin process is %d, was %d", n, now, pid)
		}
		keepsGrowing(t, collected) // the agent's events still arrive
	}

	reloadCollector(1, s1+", "+s2)
	cfg.secret = s2
	writeFile(t, filepath.Join(dir, "p.yaml"), cfg.yaml())
	if code, body := postReload(t, cfg.admin); code != 200 || body["result"] != "applied" || len(body["errors"].([]any)) != 0 {
		t.Fatalf("agent's reload to token s2: %d %v", code, body)
	}
	keepsGrowing(t, collected)
	reloadCollector(2, s2)

	// The agent's source stops (a reload, enabled: false), its queues empty, it exits with
	// everything delivered.
	cfg.genOpts = ", enabled: false"
	writeFile(t, filepath.Join(dir, "p.yaml"), cfg.yaml())
	if code, body := postReload(t, cfg.admin); code != 200 || fmt.Sprint(body["stopped"]) != "[source/gen]" {
		t.Fatalf("turning the agent's source off: %d %v", code, body)
	}
	eventually(t, "the agent's queues empty", func() bool {
		return scrape(t, cfg.admin, `flowpipe_sink_queue_events{component="collector"}`) == 0 &&
			scrape(t, cfg.admin, `flowpipe_sink_queue_events{component="all"}`) == 0
	})
	if err := agent.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := waitExit(t, agent.cmd, agent.stderr, 2*time.Minute); code != 0 {
		t.Fatalf("agent exit %d, want 0 (every accepted event delivered)", code)
	}

	generated := map[string]int{}
	n := countIDs(t, filepath.Join(dir, "all.jsonl"), generated)
	got := map[string]int{}
	lines := countIDs(t, collected, got)
	var missing, doubled, foreign int
	for id := range generated {
		switch got[id] {
		case 0:
			missing++
		case 1:
		default:
			doubled++
		}
	}
	for id := range got {
		if generated[id] == 0 {
			foreign++
		}
	}
	t.Logf("%d events generated, the collector wrote %d lines", n, lines)
	if n == 0 || missing+doubled+foreign > 0 {
		t.Fatalf("of %d events, %d never reached the collector, %d reached it more than once, %d collected were never generated", n, missing, doubled, foreign)
	}
	if r := logged(col.stderr.String(), "stream refused", nil); r != 0 {
		t.Errorf("the collector refused %d streams; the rotation order should refuse none", r)
	}
}
