package conntrack

import (
	"context"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/netns"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/component/componenttest"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// collector and countingMetrics stand in for the runtime in these tests.
type (
	collector       = componenttest.Collector
	countingMetrics = componenttest.Metrics
)

type running struct {
	src  *Source
	out  *collector
	met  *countingMetrics
	stop func()
}

// startSource builds the source from YAML-like options, as a pipeline would, and runs it
// into a collector.
func startSource(t *testing.T, opts map[string]any, prep ...func(*Source)) *running {
	t.Helper()
	out := &collector{}
	r := startSourceWith(t, opts, out, prep...)
	r.out = out
	return r
}

// startSourceWith runs the source into any emitter.
// prep functions adjust the built source before it starts.
func startSourceWith(t *testing.T, opts map[string]any, out component.Emitter, prep ...func(*Source)) *running {
	t.Helper()
	cfg := defaultConfig()
	if errs := config.Decode(opts, cfg, ""); len(errs) > 0 {
		t.Fatalf("decode options: %v", errs)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	met := &countingMetrics{}
	env := component.Env{Name: "ct-" + t.Name(), Kind: component.KindSource, Type: "conntrack",
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})), Metrics: met}
	src, err := New(env, cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := src.(*Source)
	for _, f := range prep {
		f(s)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, out) }()
	var once sync.Once
	r := &running{src: s, met: met}
	r.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
			cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer ccancel()
			if err := s.Close(cctx); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
	}
	t.Cleanup(r.stop)
	return r
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", p)
	return len(p), nil
}

// waitFor polls cond until it holds; poke runs between polls (e.g. a table dump, which makes
// the kernel reap expired entries at once instead of on its garbage collector's schedule).
// The timeout only bounds a failing test; it is no assertion about speed.
func waitFor(t *testing.T, what string, cond func() bool, poke func()) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		if poke != nil {
			poke()
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// inNS runs fn inside the named namespace (sockets it opens stay there).
func inNS(t *testing.T, name string, fn func() error) {
	t.Helper()
	ns, err := netns.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if err := ns.Do(fn); err != nil {
		t.Fatal(err)
	}
}

// sysctlNS sets a sysctl ("net.netfilter.x=v") inside a namespace, through /proc/sys as
// seen from there (test setup only).
func sysctlNS(t *testing.T, p *testenv.Pair, ns, kv string) {
	t.Helper()
	key, val, _ := strings.Cut(kv, "=")
	inNS(t, ns, func() error {
		return os.WriteFile(sysctlPath(key), []byte(val), 0o644)
	})
}

// readSysctlNS reads a sysctl inside a namespace.
func readSysctlNS(t *testing.T, ns, key string) string {
	t.Helper()
	var v []byte
	inNS(t, ns, func() (err error) {
		v, err = os.ReadFile(sysctlPath(key))
		return err
	})
	return strings.TrimSpace(string(v))
}

func sysctlPath(key string) string { return "/proc/sys/" + strings.ReplaceAll(key, ".", "/") }

// dumpNS runs `conntrack -L` in the namespace: it makes the kernel reap expired entries.
func dumpNS(p *testenv.Pair, ns string) func() {
	return func() { _ = p.Command(ns, "conntrack", "-L").Run() }
}

func byFlow(evs []flow.Event, match func(*flow.Event) bool) (starts, ends []flow.Event) {
	for _, e := range evs {
		if !match(&e) {
			continue
		}
		switch e.Type {
		case flow.TypeStart:
			starts = append(starts, e)
		case flow.TypeEnd:
			ends = append(ends, e)
		}
	}
	return
}

func udpEcho(t *testing.T, p *testenv.Pair, serverNS, listen string) (addr *net.UDPAddr, stop func()) {
	t.Helper()
	var pc net.PacketConn
	inNS(t, serverNS, func() (err error) {
		pc, err = net.ListenPacket("udp", listen)
		return err
	})
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n/2], from) // answer with half as many bytes
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr), func() { pc.Close() }
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
