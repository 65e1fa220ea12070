// Command testplugin is the plugin the host's tests start as real processes. One binary
// serves several plugins, chosen by the name it is run as (tests copy it to
// flowpipe-<kind>-<name>):
//
//	flowpipe-sink-jsonl       appends each batch to options.path as JSON lines, fsynced;
//	                          hang: true makes every Write block forever (the plugin still
//	                          answers); freeze: true stops the whole process (SIGSTOP) in
//	                          Write; block_until: path makes Write wait until path exists,
//	                          reporting itself unhealthy and counting errors{reason=stream}
//	                          meanwhile, as a sink whose collector is down; slow_write:
//	                          duration makes every Write take that long while it holds the
//	                          lock the sink's Health takes, as a client library whose
//	                          status waits behind a blocked flush (the process is alive)
//	flowpipe-source-seq       emits options.count events in batches of options.batch and
//	                          returns once all are acknowledged, appending each
//	                          acknowledgement to options.acks, and the size of each
//	                          batch whose Emit returned nil to options.emitted
//	flowpipe-enricher-tag     sets rule_id to options.rule and filters events whose source
//	                          port is a multiple of options.drop_every (counted); it takes
//	                          new options while it runs (component.Reconfigurer)
//	flowpipe-enricher-old     the tag enricher as a plugin built before the Reconfigure
//	                          and Check calls: they are not served at all (Unimplemented)
//	flowpipe-sink-future      speaks only protocol version 2
//	flowpipe-enricher-corrupt the tag enricher over gRPC only (no data channel) whose first
//	                          answer as changes, while options.corrupt_once does not exist,
//	                          creates that file and is cut one byte short, as a plugin gone
//	                          wrong would send
//
// A name ending in v1 (flowpipe-sink-jsonlv1, ...) serves the same plugin as one built before
// the data channel: it declines the channel, and its batches go over gRPC; one ending in
// whole, or whole then v1 (flowpipe-enricher-tagwhole, -tagwholev1), serves the enricher as one built before answers as
// changes: it answers every batch whole. The jsonl sink's
// garbage_once: path makes its first Write (while path does not exist) write bytes that are
// no frame into its data channel, as a plugin gone wrong would, and then wait for the host.
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"
	goplugin "github.com/hashicorp/go-plugin"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/codec"
	"github.com/flowpipe/flowpipe/internal/pluginproto"
	"github.com/flowpipe/flowpipe/internal/pluginserver"
	"github.com/flowpipe/flowpipe/sdk"
)

// dataFD is a copy of the inherited data channel, for garbage_once.
var dataFD = -1

func main() {
	name := filepath.Base(os.Args[0])
	if strings.HasSuffix(name, "v1") {
		os.Setenv(pluginproto.DataChannelEnv, "off")
	}
	if strings.Contains(name, "whole") {
		os.Setenv(pluginproto.EnrichChangesEnv, "off")
	}
	// Garbage goes where the plugin writes its frames: the second socketpair, when the host
	// passed one (the first otherwise).
	env := pluginproto.DataFDEnv
	if os.Getenv(pluginproto.DataOutFDEnv) != "" {
		env = pluginproto.DataOutFDEnv
	}
	if fd, err := strconv.Atoi(os.Getenv(env)); err == nil {
		if d, err := syscall.Dup(fd); err == nil {
			syscall.CloseOnExec(d)
			dataFD = d
		}
	}
	switch {
	case strings.HasPrefix(name, "flowpipe-sink-jsonl"):
		sdk.ServeSink(sdk.Info{Type: "jsonl", Version: "0.0.1-test", Summary: "JSON lines, fsynced"}, func() *sinkConfig { return &sinkConfig{} }, newSink)
	case strings.HasPrefix(name, "flowpipe-sink-lazy"):
		sdk.ServeSink(sdk.Info{Type: "lazy", Version: "0.0.1-test", Summary: "JSON lines, from batches it decodes itself"}, func() *sinkConfig { return &sinkConfig{} }, newLazySink)
	case strings.HasPrefix(name, "flowpipe-source-seq"):
		sdk.ServeSource(sdk.Info{Type: "seq", Version: "0.0.1-test"}, func() *sourceConfig { return &sourceConfig{Batch: 100} }, newSource)
	case strings.HasPrefix(name, "flowpipe-enricher-tag"):
		sdk.ServeEnricher(sdk.Info{Type: "tag", Version: "0.0.1-test"}, func() *tagConfig { return &tagConfig{} }, newTag)
	case strings.HasPrefix(name, "flowpipe-enricher-old"):
		serveOld(component.NewEnricherFactory("tag", "", func() *tagConfig { return &tagConfig{} }, newTag))
	case strings.HasPrefix(name, "flowpipe-enricher-corrupt"):
		serveCorrupt(component.NewEnricherFactory("tag", "", func() *tagConfig { return &tagConfig{} }, newTag))
	case strings.HasPrefix(name, "flowpipe-sink-future"):
		// A plugin from a future flowpipe: same handshake cookie, protocol 2 only.
		hs := pluginproto.Handshake
		hs.ProtocolVersion = 2
		goplugin.Serve(&goplugin.ServeConfig{
			HandshakeConfig:  hs,
			VersionedPlugins: map[int]goplugin.PluginSet{2: {"component": futurePlugin{}}},
			GRPCServer:       goplugin.DefaultGRPCServer,
		})
	default:
		fmt.Fprintf(os.Stderr, "testplugin: unknown name %q\n", name)
		os.Exit(2)
	}
}

type futurePlugin struct {
	goplugin.NetRPCUnsupportedPlugin
}

func (futurePlugin) GRPCServer(*goplugin.GRPCBroker, *grpc.Server) error { return nil }
func (futurePlugin) GRPCClient(context.Context, *goplugin.GRPCBroker, *grpc.ClientConn) (any, error) {
	return nil, errors.New("not a client")
}

type sinkConfig struct {
	Path    string `yaml:"path" required:"true"`
	Hang    bool   `yaml:"hang"`
	Discard bool   `yaml:"discard"` // accept batches without writing (benchmarks)
	Crash   bool   `yaml:"crash"`   // exit in every Write, as a crashing plugin would
	Freeze  bool   `yaml:"freeze"`
	// SlowWrite: each Write holds the sink's lock this long; Health waits for the lock.
	SlowWrite time.Duration `yaml:"slow_write"`
	// BlockUntil: Write waits until this file exists.
	BlockUntil string `yaml:"block_until"`
	// GarbageOnce: while this file does not exist, Write creates it and writes garbage into
	// the data channel.
	GarbageOnce string `yaml:"garbage_once"`
}

func (c *sinkConfig) Validate() error {
	var errs options.FieldErrors
	if !filepath.IsAbs(c.Path) {
		errs.Add("path", "must be absolute, got %q", c.Path)
	}
	return errs.Err()
}

type sink struct {
	cfg     *sinkConfig
	env     component.Env
	writes  prometheus.Counter
	waiting atomic.Bool
	mu      sync.Mutex
	f       *os.File
	buf     []byte
}

func newSink(env component.Env, c *sinkConfig) (component.Sink, error) {
	writes := prometheus.NewCounter(prometheus.CounterOpts{Name: "testplugin_writes_total", Help: "Write calls."})
	if err := env.Registerer.Register(writes); err != nil {
		return nil, err
	}
	return &sink{cfg: c, env: env, writes: writes}, nil
}

func (s *sink) Start(context.Context) error {
	f, err := os.OpenFile(s.cfg.Path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	s.f = f
	// Attributes of several kinds, in an order a map would not keep: the host's log must
	// show them as an in-process component's line would.
	s.env.Logger.Info("jsonl sink started", "path", s.cfg.Path, "timeout", 1500*time.Millisecond, "batch", 3, "z", "last")
	return nil
}

func (s *sink) Write(ctx context.Context, b *flow.Batch) error {
	if s.cfg.Hang {
		select {}
	}
	if s.cfg.Discard {
		return nil
	}
	if s.cfg.Crash {
		os.Exit(7)
	}
	if s.cfg.Freeze {
		// Stopped for good: should anything continue it, it stops itself again. Once in CI
		// (and once in 320 runs here) its Write went on and succeeded; what continued it was
		// not found (the kernel, for one, continues the stopped members of a process group
		// it finds orphaned, with a SIGHUP, which plugins ignore).
		for {
			_ = syscall.Kill(os.Getpid(), syscall.SIGSTOP)
		}
	}
	if s.cfg.GarbageOnce != "" {
		if _, err := os.Stat(s.cfg.GarbageOnce); err != nil {
			if err := os.WriteFile(s.cfg.GarbageOnce, nil, 0o644); err != nil {
				return err
			}
			if _, err := syscall.Write(dataFD, []byte("this is not a frame, and it is longer than a header")); err != nil {
				return err
			}
			<-ctx.Done() // the host gives up on this process; the batch is not written
			return ctx.Err()
		}
	}
	if s.cfg.BlockUntil != "" {
		s.waiting.Store(true)
		s.env.Metrics.Errors("stream", 1)
		for {
			if _, err := os.Stat(s.cfg.BlockUntil); err == nil {
				break
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
		s.waiting.Store(false)
	}
	s.writes.Inc()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf = s.buf[:0]
	for i := range b.Events {
		s.buf = flow.AppendJSON(s.buf, &b.Events[i])
		s.buf = append(s.buf, '\n')
	}
	if _, err := s.f.Write(s.buf); err != nil {
		return err
	}
	if s.cfg.SlowWrite > 0 {
		time.Sleep(s.cfg.SlowWrite) // a slow destination, the lock held
	}
	return s.f.Sync()
}

// lazySink is the jsonl sink as a component.EncodedWriter: it is handed batches still
// encoded, counts them (testplugin_undecoded_total), and decodes them itself.
type lazySink struct {
	*sink
	undecoded prometheus.Counter
}

func newLazySink(env component.Env, c *sinkConfig) (component.Sink, error) {
	s, err := newSink(env, c)
	if err != nil {
		return nil, err
	}
	undecoded := prometheus.NewCounter(prometheus.CounterOpts{Name: "testplugin_undecoded_total", Help: "Batches that came undecoded."})
	if err := env.Registerer.Register(undecoded); err != nil {
		return nil, err
	}
	return &lazySink{sink: s.(*sink), undecoded: undecoded}, nil
}

func (s *lazySink) WritesEncoded() {}

func (s *lazySink) Write(ctx context.Context, b *flow.Batch) error {
	if b.Undecoded() {
		s.undecoded.Inc()
	}
	if err := b.Decode(); err != nil {
		return flow.Permanent(err)
	}
	return s.sink.Write(ctx, b)
}

// Health reports the sink as down while a Write waits for block_until.
func (s *sink) Health() error {
	if s.cfg.SlowWrite > 0 {
		s.mu.Lock()
		defer s.mu.Unlock()
	}
	if s.waiting.Load() {
		return fmt.Errorf("collector unreachable: waiting for %s", s.cfg.BlockUntil)
	}
	return nil
}

func (s *sink) Close(context.Context) error {
	s.env.Logger.Info("jsonl sink closing")
	if s.f == nil {
		return nil
	}
	return s.f.Close()
}

type sourceConfig struct {
	Count int    `yaml:"count" required:"true"`
	Batch int    `yaml:"batch"`
	Acks  string `yaml:"acks"`
	// Emitted is appended the size of every batch once its Emit returned nil: what the
	// source believes the pipeline took.
	Emitted string `yaml:"emitted"`
}

type source struct {
	cfg *sourceConfig
	env component.Env
}

func newSource(env component.Env, c *sourceConfig) (component.Source, error) {
	return &source{cfg: c, env: env}, nil
}

// Event builds the i-th event of the seq source; tests rebuild it to compare.
func Event(i int) flow.Event {
	var id uuid.UUID
	binary.BigEndian.PutUint64(id[8:], uint64(i))
	return flow.Event{
		EventID: id, FlowID: id, Type: flow.TypeStart, Timestamp: flow.Time(1_700_000_000_000_000_000 + int64(i)),
		SrcAddr: netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), DstAddr: netip.MustParseAddr("192.0.2.1"),
		SrcPort: uint16(i), DstPort: 443, Protocol: flow.ProtoTCP, Direction: flow.Egress, Source: "seq",
	}
}

func (s *source) Run(ctx context.Context, out component.Emitter) error {
	var (
		mu      sync.Mutex
		acks    *os.File
		pending sync.WaitGroup
	)
	if s.cfg.Acks != "" {
		f, err := os.OpenFile(s.cfg.Acks, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		acks = f
	}
	var emitted *os.File
	if s.cfg.Emitted != "" {
		f, err := os.OpenFile(s.cfg.Emitted, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		emitted = f
	}
	for i := 0; i < s.cfg.Count; i += s.cfg.Batch {
		n := min(s.cfg.Batch, s.cfg.Count-i)
		evs := make([]flow.Event, n)
		for j := range evs {
			evs[j] = Event(i + j)
		}
		first := i
		pending.Add(1)
		b := flow.NewBatch(evs, func(err error) {
			defer pending.Done()
			if acks != nil {
				mu.Lock()
				fmt.Fprintf(acks, "%d %d %v\n", first, n, err)
				mu.Unlock()
			}
		})
		if err := out.Emit(ctx, b); err != nil {
			break
		}
		if emitted != nil {
			fmt.Fprintf(emitted, "%d\n", n)
		}
	}
	pending.Wait()
	return nil
}

type tagConfig struct {
	Rule      string `yaml:"rule"`
	DropEvery int    `yaml:"drop_every"`
	// CorruptOnce: flowpipe-enricher-corrupt cuts its first answer as changes short.
	CorruptOnce string `yaml:"corrupt_once"`
	// BadChangesFrameOnce: while this file does not exist, Enrich creates it, writes into
	// the data channel an answer to call 1 as changes cut one byte short (a well-formed
	// frame whose changes are not), and waits for the host.
	BadChangesFrameOnce string `yaml:"bad_changes_frame_once"`
}

func (c *tagConfig) Validate() error {
	var errs options.FieldErrors
	if c.DropEvery < 0 {
		errs.Add("drop_every", "must not be negative, got %d", c.DropEvery)
	}
	return errs.Err()
}

type tag struct {
	cfg atomic.Pointer[tagConfig]
	env component.Env
}

func newTag(env component.Env, c *tagConfig) (component.Enricher, error) {
	t := &tag{env: env}
	t.cfg.Store(c)
	if c.CorruptOnce != "" {
		corruptOnce.Store(&c.CorruptOnce)
	}
	return t, nil
}

func (t *tag) Enrich(_ context.Context, b *flow.Batch) error {
	cfg := t.cfg.Load()
	if path := cfg.BadChangesFrameOnce; path != "" {
		if _, err := os.Stat(path); err != nil {
			if err := os.WriteFile(path, nil, 0o644); err != nil {
				return err
			}
			changes, _ := codec.AppendChanges(nil, b.Events, b.Events)
			changes = changes[:len(changes)-1]
			meta, err := proto.Marshal(&pluginproto.EnrichResponse{Changes: true, Batch: &pluginproto.Batch{Count: uint32(len(b.Events))}})
			if err != nil {
				return err
			}
			frame := []byte{'f', 'P', pluginproto.FrameVersion, byte(pluginproto.FrameEnrichResp)}
			frame = binary.BigEndian.AppendUint32(frame, uint32(len(meta)))
			frame = binary.BigEndian.AppendUint32(frame, uint32(len(changes)))
			frame = binary.BigEndian.AppendUint32(frame, 0)
			frame = binary.BigEndian.AppendUint64(frame, 1)
			frame = append(append(frame, meta...), changes...)
			if _, err := syscall.Write(dataFD, frame); err != nil {
				return err
			}
			select {} // the host kills this process
		}
	}
	kept := b.Events[:0]
	for _, e := range b.Events {
		if cfg.DropEvery > 0 && int(e.SrcPort)%cfg.DropEvery == 0 {
			continue
		}
		e.RuleID = cfg.Rule
		kept = append(kept, e)
	}
	t.env.Metrics.Filtered("port_multiple", len(b.Events)-len(kept))
	b.Events = kept
	return nil
}

// Reconfigure takes new options between batches; changing rule to "restart" asks for a new
// instance, as a change a component cannot apply in place does.
func (t *tag) Reconfigure(_ context.Context, raw map[string]any) error {
	c := &tagConfig{}
	if errs := options.Check(raw, c, ""); len(errs) > 0 {
		return errs
	}
	if c.Rule == "restart" {
		return fmt.Errorf("rule %q: %w", c.Rule, component.ErrRestartNeeded)
	}
	t.cfg.Store(c)
	return nil
}

// oldComponent serves the Component service as a plugin built before Reconfigure existed:
// the call is not served, and gRPC answers Unimplemented, as for any unknown method.
type oldComponent struct{ *pluginserver.Server }

func (oldComponent) Reconfigure(context.Context, *pluginproto.ReconfigureRequest) (*pluginproto.ReconfigureResponse, error) {
	return nil, status.Error(codes.Unimplemented, "unknown method Reconfigure for service flowpipe.plugin.v1.Component")
}

// corruptEnricher serves the Enricher service with its first answer as changes cut short.
type corruptEnricher struct {
	*pluginserver.Server
	marker func() string
}

func (c corruptEnricher) Enrich(ctx context.Context, req *pluginproto.Batch) (*pluginproto.EnrichResponse, error) {
	resp, err := c.Server.Enrich(ctx, req)
	if err != nil || !resp.Changes || resp.Batch == nil || len(resp.Batch.Events) < 2 {
		return resp, err
	}
	if path := c.marker(); path != "" {
		if _, err := os.Stat(path); err != nil {
			if err := os.WriteFile(path, nil, 0o644); err != nil {
				return nil, err
			}
			resp.Batch.Events = resp.Batch.Events[:len(resp.Batch.Events)-1]
		}
	}
	return resp, nil
}

// corruptOnce is the tag enricher's corrupt_once, for corruptEnricher.
var corruptOnce atomic.Pointer[string]

func serveCorrupt(f component.Factory) {
	srv := pluginserver.New(f, "0.0.1-corrupt", slog.New(slog.NewTextHandler(os.Stderr, nil)))
	goplugin.Serve(&goplugin.ServeConfig{
		HandshakeConfig: pluginproto.Handshake,
		VersionedPlugins: pluginproto.PluginSets(func(g *grpc.Server) {
			pluginproto.RegisterComponentServer(g, srv)
			pluginproto.RegisterEnricherServer(g, corruptEnricher{srv, func() string {
				if p := corruptOnce.Load(); p != nil {
					return *p
				}
				return ""
			}})
		}),
		GRPCServer: func(opts []grpc.ServerOption) *grpc.Server {
			return grpc.NewServer(append(opts, pluginproto.ServerOptions()...)...)
		},
	})
}

// Check is not served either: it came after Reconfigure.
func (oldComponent) Check(context.Context, *pluginproto.CheckRequest) (*pluginproto.CheckResponse, error) {
	return nil, status.Error(codes.Unimplemented, "unknown method Check for service flowpipe.plugin.v1.Component")
}

func serveOld(f component.Factory) {
	srv := pluginserver.New(f, "0.0.1-old", slog.New(slog.NewTextHandler(os.Stderr, nil)))
	goplugin.Serve(&goplugin.ServeConfig{
		HandshakeConfig: pluginproto.Handshake,
		VersionedPlugins: pluginproto.PluginSets(func(g *grpc.Server) {
			pluginproto.RegisterComponentServer(g, oldComponent{srv})
			pluginproto.RegisterEnricherServer(g, srv)
		}),
		GRPCServer: func(opts []grpc.ServerOption) *grpc.Server {
			return grpc.NewServer(append(opts, pluginproto.ServerOptions()...)...)
		},
	})
}
