package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// TestPageInChromium loads the admin listener's page in a real headless Chromium (Debian's
// chromium package): it loads nothing but its own origin, draws the pipeline's components,
// their counters increase, the flow table fills, and a filter typed into the page narrows
// it. It saves a screenshot ($FLOWPIPE_SCREENSHOT, default in the temp directory).
func TestPageInChromium(t *testing.T) {
	chromium, err := exec.LookPath("chromium")
	testenv.Require(t, err == nil, "chromium in PATH (apt-get install chromium)")
	dir := t.TempDir()
	r := startRun(t, dir, `
admin: {listen: "127.0.0.1:0"}
data_dir: data
sources:
  gen: {type: generate, rate: 400, flows: 40, seed: 11}
enrichers:
  - type: community_id
sinks:
  archive: {type: file, path: archive.jsonl}
  out: {type: file, path: out.jsonl}
`)
	base := "http://" + r.admin

	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromium),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(filepath.Join(dir, "chromium-profile")),
		chromedp.WindowSize(1500, 1150),
		// No network but loopback: every other request goes to a proxy that is not there.
		chromedp.ProxyServer("http://127.0.0.1:9"),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	// This chromedp's protocol types predate some of Chromium's newer enum values (an
	// event's IPAddressSpace "Loopback"); it reports and skips such events, which this test
	// does not use.
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithErrorf(func(format string, args ...any) {
		if msg := fmt.Sprintf(format, args...); !strings.Contains(msg, "IPAddressSpace") {
			t.Log("chromedp: " + msg)
		}
	}))
	defer cancel()
	// The bound only stops a broken test from hanging (the machine may be loaded).
	ctx, cancelT := context.WithTimeout(ctx, 4*time.Minute)
	defer cancelT()

	if err := chromedp.Run(ctx, chromedp.Navigate(base+"/")); err != nil {
		t.Fatal(err)
	}
	eval := func(js string, out any) {
		t.Helper()
		if err := chromedp.Run(ctx, chromedp.Evaluate(js, out)); err != nil {
			t.Fatalf("%s: %v", js, err)
		}
	}
	waitFor := func(what, js string) {
		t.Helper()
		eventually(t, what, func() bool {
			var ok bool
			eval(js, &ok)
			return ok
		})
	}
	// The picture and the table show the pipeline's four components.
	waitFor("the components table", `document.querySelectorAll("#components tbody tr").length === 4`)
	var names []string
	eval(`[...document.querySelectorAll("#graph g.node")].map(g => g.dataset.name)`, &names)
	if strings.Join(names, ",") != "gen,community_id,archive,out" {
		t.Errorf("graph nodes %v", names)
	}
	counter := func() float64 {
		var s string
		eval(`document.querySelector('#components tr[data-name="gen"] td[data-out]').dataset.out`, &s)
		v, _ := strconv.ParseFloat(s, 64)
		return v
	}
	first := counter()
	eventually(t, "the source's counter to increase", func() bool { return counter() > first })
	waitFor("the graph's rates", `[...document.querySelectorAll("#graph [data-rate]")].every(e => e.textContent.includes("/s"))`)

	// The flow table fills with every protocol; a filter narrows it to UDP.
	waitFor("the flow table to fill with more than UDP", `(() => {
		const p = [...document.querySelectorAll("#flows tbody tr")].map(r => r.cells[2].textContent);
		return p.length >= 20 && p.some(x => x !== "udp");
	})()`)
	if err := chromedp.Run(ctx, chromedp.SendKeys("#filter", "proto=udp !dst-port=53", chromedp.ByID)); err != nil {
		t.Fatal(err)
	}
	waitFor("the filter to narrow the table", `(() => {
		const rows = [...document.querySelectorAll("#flows tbody tr")];
		return rows.length >= 5 && rows.every(r => r.cells[2].textContent === "udp" && !r.cells[4].textContent.endsWith(":53"));
	})()`)
	waitFor("the top talkers", `document.querySelectorAll("#top-bytes tbody tr").length > 0 && document.querySelectorAll("#top-flows tbody tr").length > 0`)
	// Let one more refresh of the counters and top talkers land before the picture.
	var seen string
	eval(`document.querySelector("#updated").textContent`, &seen)
	waitFor("another refresh", `document.querySelector("#updated").textContent !== `+strconv.Quote(seen))

	var png []byte
	if err := chromedp.Run(ctx, chromedp.FullScreenshot(&png, 100)); err != nil {
		t.Fatal(err)
	}
	shot := os.Getenv("FLOWPIPE_SCREENSHOT")
	if shot == "" {
		shot = filepath.Join(os.TempDir(), "flowpipe-observe-page.png")
	}
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", shot)

	// Everything the page loaded (its fetches included) came from its own origin.
	var requests []string
	eval(`[location.href, ...performance.getEntriesByType("resource").map(e => e.name)]`, &requests)
	if len(requests) < 3 {
		t.Fatalf("only %d requests seen", len(requests))
	}
	for _, u := range requests {
		if !strings.HasPrefix(u, base+"/") {
			t.Errorf("the page loaded %s, which is not its own origin", u)
		}
	}
}
