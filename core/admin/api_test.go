package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/metrics"
	"github.com/flowpipe/flowpipe/core/tap"
)

// TestTapAndTopStreams serves the API over a real listener while publishers run (this is
// where the race detector sees the handlers; cmd/flowpipe tests the binary end to end).
func TestTapAndTopStreams(t *testing.T) {
	m := metrics.New()
	m.Component("src", "source").Out.Add(7)
	m.Component("out", "sink").Dropped("queue_full", 2)
	taps := tap.NewRegistry(16)
	h := taps.Point(tap.Fanout, "fanout")
	taps.Point("src", "source")
	s, err := Serve(Options{Listen: "127.0.0.1:0", Registry: m.Registry, Token: "t0k", Taps: taps,
		Graph: Graph{Stages: [][]Node{{{Name: "src", Kind: "source"}}, {{Name: "out", Kind: "sink"}}}},
		Log:   slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(context.Background())
	get := func(path string) *http.Response {
		req, _ := http.NewRequest("GET", "http://"+s.Addr()+path, nil)
		req.Header.Set("Authorization", "Bearer t0k")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	resp := get("/api/components")
	var comps struct{ Components []ComponentStats }
	json.NewDecoder(resp.Body).Decode(&comps)
	resp.Body.Close()
	if len(comps.Components) != 2 || comps.Components[0].Out != 7 || comps.Components[1].Dropped["queue_full"] != 2 {
		t.Fatalf("components: %+v", comps.Components)
	}
	if resp := get("/api/tap?filter=port%3D99999"); resp.StatusCode != 400 {
		t.Fatalf("bad filter: %d", resp.StatusCode)
	}
	if resp := get("/api/tap?at=nosuch"); resp.StatusCode != 404 {
		t.Fatalf("unknown tap point: %d", resp.StatusCode)
	}

	tapResp := get("/api/tap?follow=1&filter=proto%3Dudp")
	defer tapResp.Body.Close()
	topResp := get("/api/top?by=proto&window=1h")
	defer topResp.Body.Close()
	tr := following(t, tapResp)
	var wg sync.WaitGroup
	const publishers, batches = 4, 50
	for p := range publishers {
		wg.Go(func() {
			b := make([]flow.Event, 10)
			for i := range b {
				b[i] = flow.Event{SrcAddr: netip.MustParseAddr("10.0.0.1"), DstAddr: netip.MustParseAddr("10.0.0.2"), Protocol: []uint8{flow.ProtoUDP, flow.ProtoTCP}[(i+p)%2], TxBytes: 10}
			}
			for range batches {
				h.Publish(b)
			}
		})
	}
	wg.Wait()
	udp := 0
	for udp < publishers*batches*5 {
		l, err := tr.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(l, `"skipped"`) {
			t.Fatalf("a reading subscriber skipped: %s", l)
		}
		if strings.Contains(l, `"protocol":17`) {
			udp++
		} else if !strings.HasPrefix(l, `{"tap"`) {
			t.Fatalf("a non-UDP event passed the filter: %s", l)
		}
	}
	dec := json.NewDecoder(topResp.Body)
	deadline := time.Now().Add(30 * time.Second)
	for {
		var snap tap.Snapshot
		if err := dec.Decode(&snap); err != nil {
			t.Fatal(err)
		}
		if snap.Total.Flows == publishers*batches*10 {
			if snap.Total.Bytes != publishers*batches*100 || len(snap.ByBytes) != 2 {
				t.Fatalf("top: %+v", snap)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("top never counted every event: %+v", snap.Total)
		}
	}
}

// A tap that follows a tap point a reload removes ends: its last line says so, then the
// stream ends; a top of that point ends too.
func TestTapOfARemovedPointEnds(t *testing.T) {
	taps := tap.NewRegistry(0)
	taps.Point("gone", "sink")
	s, err := Serve(Options{Listen: "127.0.0.1:0", Registry: metrics.New().Registry, Taps: taps,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(context.Background())
	c := http.Client{Timeout: time.Minute} // a stream that does not end fails, not hangs
	get := func(path string) *http.Response {
		resp, err := c.Get("http://" + s.Addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	tapResp := get("/api/tap?at=gone&follow=1")
	topResp := get("/api/top?at=gone")
	tr := following(t, tapResp)
	var first tap.Snapshot
	if err := json.NewDecoder(topResp.Body).Decode(&first); err != nil {
		t.Fatal(err) // the top stream is live
	}
	taps.Remove("gone")
	rest, err := io.ReadAll(tr)
	if err != nil || string(rest) != `{"tap":{"removed":true}}`+"\n" {
		t.Fatalf("tap stream after the removal: %q, %v; want the removed line, then its end", rest, err)
	}
	if _, err := io.ReadAll(topResp.Body); err != nil {
		t.Fatalf("top stream after the removal: %v", err)
	}
}

// following reads a tap stream up to its "following" line: the subscription is live then.
func following(t *testing.T, resp *http.Response) *bufio.Reader {
	t.Helper()
	r := bufio.NewReader(resp.Body)
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(l, "following") {
			return r
		}
	}
}
