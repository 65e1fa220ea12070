// Package admin serves flowpipe's admin listener: /metrics (Prometheus), /healthz (the
// process is alive), /readyz (the pipeline runs and no sink or plugin keeps failing), the
// JSON API behind `flowpipe tap` and `flowpipe top` (/api/...), POST /-/reload (apply the
// pipeline file again), and the live page (GET /).
// docs/observe.md documents the endpoints.
package admin

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/flowpipe/flowpipe/core/tap"
)

// Options configure the admin listener.
type Options struct {
	// Listen is host:port or unix:PATH.
	Listen   string
	Registry *prometheus.Registry
	// Ready reports why the pipeline is not ready, or nil.
	Ready func() error
	Log   *slog.Logger
	// Token, when set, must be presented as "Authorization: Bearer TOKEN" on every request
	// but GET / (the page, which holds no data) and /healthz.
	Token string
	// TLS, when set, serves HTTPS (with ClientAuth set, mTLS).
	TLS *tls.Config
	// Taps are the pipeline's tap points; nil serves no tap or top API.
	Taps *tap.Registry
	// Graph is the pipeline's components in stages, for /api/pipeline and the page.
	Graph Graph
	// Reload, when set, serves POST /-/reload: it reloads the pipeline file and returns what
	// to answer (encoded as JSON), or config.Problems when the new file is rejected (422),
	// an error wrapping ErrReloadUnavailable (503), or another error when applying it failed
	// (500; with a non-nil answer, that answer is the body).
	Reload func(ctx context.Context) (any, error)
	// CurrentGraph, when set, is asked for the graph at each request instead of Graph: a
	// pipeline that reloads changes its components (GraphOf(p.Document(), ...)).
	CurrentGraph func() Graph
}

// graph is the pipeline's graph now.
func (s *Server) graph() Graph {
	if s.opts.CurrentGraph != nil {
		return s.opts.CurrentGraph()
	}
	return s.opts.Graph
}

// Server is a running admin listener.
type Server struct {
	srv  *http.Server
	ln   net.Listener
	opts Options
	// stop ends the streaming handlers when the server shuts down.
	stop    context.Context
	cancel  context.CancelFunc
	streams atomic.Int32 // tap and top streams being served
}

// Start listens on addr and serves /metrics, /healthz and /readyz until Shutdown.
func Start(addr string, reg *prometheus.Registry, ready func() error, log *slog.Logger) (*Server, error) {
	return Serve(Options{Listen: addr, Registry: reg, Ready: ready, Log: log})
}

// Serve listens on opts.Listen and serves until Shutdown.
func Serve(opts Options) (*Server, error) {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.Ready == nil {
		opts.Ready = func() error { return nil }
	}
	ln, err := listen(opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("admin listener on %s: %w (set admin.listen to another address, or to \"\" to disable it)", opts.Listen, err)
	}
	if opts.TLS != nil {
		ln = tls.NewListener(ln, opts.TLS)
	}
	s := &Server{ln: ln, opts: opts}
	s.stop, s.cancel = context.WithCancel(context.Background())
	mux := http.NewServeMux()
	mux.Handle("GET /{$}", http.HandlerFunc(servePage))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("/metrics", s.auth(promhttp.HandlerFor(opts.Registry, promhttp.HandlerOpts{Registry: opts.Registry})))
	mux.Handle("/readyz", s.auth(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if err := opts.Ready(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "not ready:", err)
			return
		}
		fmt.Fprintln(w, "ready")
	})))
	mux.Handle("GET /api/pipeline", s.auth(http.HandlerFunc(s.servePipeline)))
	mux.Handle("GET /api/components", s.auth(http.HandlerFunc(s.serveComponents)))
	mux.Handle("GET /api/tap", s.auth(http.HandlerFunc(s.serveTap)))
	mux.Handle("GET /api/top", s.auth(http.HandlerFunc(s.serveTop)))
	if opts.Reload != nil {
		mux.Handle("POST /-/reload", s.auth(http.HandlerFunc(s.serveReload)))
	}
	s.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return s.stop },
	}
	s.srv.RegisterOnShutdown(s.cancel)
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			opts.Log.Error("admin listener failed", "error", err)
		}
	}()
	opts.Log.Info("admin listener", "address", s.Addr())
	return s, nil
}

func listen(addr string) (net.Listener, error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok {
		return net.Listen("tcp", addr)
	}
	// A socket left by a process that died is in the way; anything else is not ours.
	if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by a running process", path)
		}
		os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	// Only the owner (and root) may talk to it: the socket's permissions are its
	// authentication.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// auth requires the bearer token, when one is set.
func (s *Server) auth(h http.Handler) http.Handler {
	if s.opts.Token == "" {
		return h
	}
	want := []byte("Bearer " + s.opts.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		if subtle.ConstantTimeCompare(got, want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="flowpipe"`)
			http.Error(w, "401 unauthorized: send Authorization: Bearer <admin.token>", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// Addr is the address the server listens on (unix:PATH for a Unix socket).
func (s *Server) Addr() string {
	if s.ln.Addr().Network() == "unix" {
		return "unix:" + s.ln.Addr().String()
	}
	return s.ln.Addr().String()
}

// Shutdown stops the server; streaming responses end.
func (s *Server) Shutdown(ctx context.Context) error {
	s.cancel()
	err := s.srv.Shutdown(ctx)
	if path, ok := strings.CutPrefix(s.opts.Listen, "unix:"); ok {
		os.Remove(path)
	}
	return err
}
