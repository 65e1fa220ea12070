package admin

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestEndpoints(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "flowpipe_test_total", Help: "t"})
	reg.MustRegister(c)
	c.Add(3)
	var ready error = errors.New("sink out: 3 consecutive failed writes")
	s, err := Start("127.0.0.1:0", reg, func() error { return ready }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(context.Background())
	base := "http://" + s.Addr()
	if code, body := get(t, base+"/metrics"); code != 200 || !strings.Contains(body, "flowpipe_test_total 3") {
		t.Errorf("/metrics: %d %s", code, body)
	}
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz: %d", code)
	}
	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, "consecutive failed writes") {
		t.Errorf("/readyz while failing: %d %s", code, body)
	}
	ready = nil
	if code, _ := get(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz when ready: %d", code)
	}
}

func TestBusyAddressIsAClearError(t *testing.T) {
	s, err := Start("127.0.0.1:0", prometheus.NewRegistry(), func() error { return nil }, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(context.Background())
	_, err = Start(s.Addr(), prometheus.NewRegistry(), func() error { return nil }, slog.Default())
	if err == nil || !strings.Contains(err.Error(), "admin.listen") {
		t.Fatalf("got %v, want an error that says to change admin.listen", err)
	}
}
