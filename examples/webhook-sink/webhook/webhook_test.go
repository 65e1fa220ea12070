package webhook

import (
	"bufio"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/sdk/plugintest"
)

// receiver is a webhook endpoint that fails the first `fail` requests with 503.
type receiver struct {
	mu       sync.Mutex
	fail     int
	requests int
	events   []flow.Event
	headers  http.Header
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.requests++
	r.headers = req.Header.Clone()
	if r.fail > 0 {
		r.fail--
		http.Error(w, "busy", http.StatusServiceUnavailable)
		return
	}
	sc := bufio.NewScanner(req.Body)
	for sc.Scan() {
		var e flow.Event
		if err := flow.ParseJSON(sc.Bytes(), &e); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.events = append(r.events, e)
	}
}

func events(n int) []flow.Event {
	evs := make([]flow.Event, n)
	for i := range evs {
		evs[i] = flow.Event{EventID: uuid.New(), Type: flow.TypeStart, Protocol: flow.ProtoTCP, SrcPort: uint16(i), Timestamp: flow.Now()}
	}
	return evs
}

func TestPostsBatchAsNDJSON(t *testing.T) {
	rcv := &receiver{}
	srv := httptest.NewServer(rcv)
	defer srv.Close()
	sink := plugintest.Sink(t, Info, Defaults, New, map[string]any{"url": srv.URL, "headers": map[string]any{"Authorization": "Bearer t"}})
	evs := events(500)
	if err := sink.Write(context.Background(), flow.NewBatch(evs, nil)); err != nil {
		t.Fatal(err)
	}
	if len(rcv.events) != 500 || rcv.events[499].EventID != evs[499].EventID {
		t.Fatalf("receiver got %d events", len(rcv.events))
	}
	if rcv.headers.Get("Content-Type") != "application/x-ndjson" || rcv.headers.Get("Authorization") != "Bearer t" {
		t.Fatalf("headers: %v", rcv.headers)
	}
	if rcv.headers.Get("X-Flowpipe-Batch") != evs[0].EventID.String() {
		t.Fatalf("batch header %q", rcv.headers.Get("X-Flowpipe-Batch"))
	}
}

// Write tries once: a 5xx fails it with a retryable error, and flowpipe's runtime retries.
func TestServerErrorIsRetryable(t *testing.T) {
	rcv := &receiver{fail: 1}
	srv := httptest.NewServer(rcv)
	defer srv.Close()
	sink := plugintest.Sink(t, Info, Defaults, New, map[string]any{"url": srv.URL})
	err := sink.Write(context.Background(), flow.NewBatch(events(10), nil))
	if err == nil || !strings.Contains(err.Error(), "503") || flow.IsPermanent(err) {
		t.Fatalf("got %v, want a retryable 503 error", err)
	}
	if rcv.requests != 1 {
		t.Fatalf("%d requests, want 1: the runtime retries, not the sink", rcv.requests)
	}
	if err := sink.Write(context.Background(), flow.NewBatch(events(10), nil)); err != nil {
		t.Fatal(err)
	}
}

// A 4xx about the batch is permanent across the plugin boundary: flowpipe drops it as
// rejected instead of retrying forever.
func TestBadRequestIsPermanent(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "malformed batch", http.StatusBadRequest)
	}))
	defer srv.Close()
	sink := plugintest.Sink(t, Info, Defaults, New, map[string]any{"url": srv.URL})
	err := sink.Write(context.Background(), flow.NewBatch(events(10), nil))
	if !flow.IsPermanent(err) || !strings.Contains(err.Error(), "400 Bad Request: malformed batch") {
		t.Fatalf("got %v, want a permanent 400 error with the endpoint's message", err)
	}
}

func TestValidation(t *testing.T) {
	_, err := plugintest.Start(t, component.NewSinkFactory(Info.Type, "", Defaults, New), map[string]any{"url": "ftp://x", "timeout": "0s"}, nil)
	var fe options.FieldErrors
	if !errors.As(err, &fe) || len(fe) != 2 || fe[0].Path != "url" || fe[1].Path != "timeout" {
		t.Fatalf("got %v", err)
	}
}

func TestFormatECS(t *testing.T) {
	var mu sync.Mutex
	var lines []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		sc := bufio.NewScanner(req.Body)
		for sc.Scan() {
			lines = append(lines, sc.Text())
		}
	}))
	defer srv.Close()
	sink := plugintest.Sink(t, Info, Defaults, New, map[string]any{"url": srv.URL, "format": "ecs"})
	evs := events(3)
	if err := sink.Write(context.Background(), flow.NewBatch(evs, nil)); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(lines) != 3 || !strings.Contains(lines[2], `"event":{"kind":"event"`) || !strings.Contains(lines[2], evs[2].EventID.String()) {
		t.Fatalf("not ECS: %v", lines)
	}
	_, err := plugintest.Start(t, component.NewSinkFactory(Info.Type, "", Defaults, New), map[string]any{"url": srv.URL, "format": "cef"}, nil)
	if err == nil || !strings.Contains(err.Error(), "format") {
		t.Fatalf("format cef accepted: %v", err)
	}
}
