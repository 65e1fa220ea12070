// Package pluginserver is the plugin side of the flowpipe plugin protocol: it builds a
// component from its factory when the host sends the options, and serves it over gRPC. A
// plugin reaches it through the public sdk package (sdk.ServeSink and friends); the flowpipe
// binary serves its built-ins with it when it is re-executed as a plugin.
package pluginserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"gopkg.in/yaml.v3"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/codec"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// Server is the plugin side of one component: it builds the component from its factory
// when the host sends the options, and serves it.
type Server struct {
	pb.UnimplementedComponentServer
	pb.UnimplementedSourceServer
	pb.UnimplementedEnricherServer
	pb.UnimplementedSinkServer

	factory component.Factory
	version string
	log     *slog.Logger
	counts  counter
	// hostGone runs when the host's Watch stream ends without a Close: the host died, so
	// the plugin process must not outlive it. In memory (plugintest) it does nothing.
	hostGone func()
	// stdout is flowpipe's standard output, passed down; components get it as Env.Stdout
	// (go-plugin made this process's os.Stdout its own pipe when it started serving).
	stdout *os.File
	// metrics is the registry the component's Env.Registerer registers into; Gather
	// serves it to the host.
	metrics *prometheus.Registry

	mu     sync.Mutex
	comp   any
	closed chan struct{}
	once   sync.Once
	// emitWindow is ConfigureRequest.emit_window: how many of a source's batches may be
	// sent and not yet taken by the host; 0: no bound (a host before flow control).
	emitWindow int
	name       string // the component's name in pipeline.yaml (ConfigureRequest.name)
	// changes: the host holds the batches it sends, and an enricher answers with what it
	// changed in them (ConfigureRequest.enrich_changes).
	changes bool

	events sync.Pool // *[]flow.Event, reused between calls

	// The component's own Health runs beside the answer to the host's ping (health).
	healthMu    sync.Mutex
	healthRun   chan struct{} // closed when the check in progress returns; nil: none
	healthSince time.Time     // when the check in progress began
	healthLast  error         // what the last check that returned said

	data    atomic.Bool // serving the data channel (ServeData)
	dataOut atomic.Bool // on two socketpairs
}

// New returns the server of the component f builds; log is the component's logger.
func New(f component.Factory, version string, log *slog.Logger) *Server {
	return &Server{factory: f, version: version, log: log, closed: make(chan struct{}), hostGone: func() {}, metrics: prometheus.NewRegistry()}
}

// Register registers the component's services on g.
func (s *Server) Register(g *grpc.Server) {
	pb.RegisterComponentServer(g, s)
	switch s.factory.Kind {
	case component.KindSource:
		pb.RegisterSourceServer(g, s)
	case component.KindEnricher:
		pb.RegisterEnricherServer(g, s)
	case component.KindSink:
		pb.RegisterSinkServer(g, s)
	}
}

func (s *Server) Describe(context.Context, *pb.DescribeRequest) (*pb.DescribeResponse, error) {
	return &pb.DescribeResponse{
		Kind: string(s.factory.Kind), Type: s.factory.Type, Version: s.version,
		ProtocolVersion: pb.ProtocolVersion, Summary: s.factory.Summary,
		EmitFlowControl: true, DataChannel: s.data.Load(), DataChannelOut: s.dataOut.Load(),
	}, nil
}

func (s *Server) Configure(_ context.Context, req *pb.ConfigureRequest) (*pb.ConfigureResponse, error) {
	raw, err := decodeOptions(req.OptionsYaml)
	if err != nil {
		return &pb.ConfigureResponse{Error: err.Error()}, nil
	}
	env := component.Env{
		Name: req.Name, Kind: s.factory.Kind, Type: s.factory.Type, ConfigDir: req.ConfigDir, DataDir: req.DataDir,
		Logger: s.log, Metrics: &s.counts,
		Registerer: s.metrics,
	}
	if s.stdout != nil {
		env.Stdout = s.stdout
	}
	// The same path as in process (component.Factory.Build): decode, validate, build.
	c, err := s.factory.Build(env, raw)
	if err != nil {
		if errs, ok := options.FieldErrorsOf(err); ok {
			resp := &pb.ConfigureResponse{}
			for _, e := range errs {
				resp.FieldErrors = append(resp.FieldErrors, &pb.FieldError{Path: e.Path, Message: e.Msg})
			}
			return resp, nil
		}
		return &pb.ConfigureResponse{Error: err.Error()}, nil
	}
	s.mu.Lock()
	s.comp = c
	s.name = req.Name
	s.emitWindow = int(req.EmitWindow)
	s.changes = req.EnrichChanges && !pb.EnrichChangesOff()
	s.mu.Unlock()
	_, holder := c.(component.Holder)
	return &pb.ConfigureResponse{Holder: holder}, nil
}

// Reconfigure hands new options to the running component (component.Reconfigurer); a
// component that cannot take them in place answers restart_needed, and the host replaces it.
func (s *Server) Reconfigure(ctx context.Context, req *pb.ReconfigureRequest) (*pb.ReconfigureResponse, error) {
	c, err := s.component()
	if err != nil {
		return nil, err
	}
	raw, err := decodeOptions(req.OptionsYaml)
	if err != nil {
		return &pb.ReconfigureResponse{Error: err.Error()}, nil
	}
	rc, ok := c.(component.Reconfigurer)
	if !ok {
		return &pb.ReconfigureResponse{RestartNeeded: true,
			Error: fmt.Sprintf("%s %q cannot take new options while it runs: %v", s.factory.Kind, s.factory.Type, component.ErrRestartNeeded)}, nil
	}
	return reconfigureResponse(rc.Reconfigure(ctx, raw)), nil
}

// Check decodes and validates options as Configure does (the factory's defaults, then the
// options' own Validate), and builds nothing: a reload asks it before it changes anything.
func (s *Server) Check(_ context.Context, req *pb.CheckRequest) (*pb.CheckResponse, error) {
	raw, err := decodeOptions(req.OptionsYaml)
	if err != nil {
		return &pb.CheckResponse{Error: err.Error()}, nil
	}
	resp := &pb.CheckResponse{}
	if s.factory.NewConfig == nil {
		return resp, nil
	}
	for _, e := range options.Check(raw, s.factory.NewConfig(), "") {
		resp.FieldErrors = append(resp.FieldErrors, &pb.FieldError{Path: e.Path, Message: e.Msg})
	}
	return resp, nil
}

// decodeOptions decodes the options the host sent (as YAML); none is an empty map.
func decodeOptions(data []byte) (map[string]any, error) {
	var raw map[string]any
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("decode options sent by the host: %w", err)
	}
	if raw == nil {
		raw = map[string]any{}
	}
	return raw, nil
}

func reconfigureResponse(err error) *pb.ReconfigureResponse {
	resp := &pb.ReconfigureResponse{}
	switch {
	case err == nil:
	case errors.Is(err, component.ErrRestartNeeded):
		resp.RestartNeeded, resp.Error = true, err.Error()
	default:
		if errs, ok := options.FieldErrorsOf(err); ok {
			for _, e := range errs {
				resp.FieldErrors = append(resp.FieldErrors, &pb.FieldError{Path: e.Path, Message: e.Msg})
			}
		} else {
			resp.Error = err.Error()
		}
	}
	return resp
}

func (s *Server) component() (any, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.comp == nil {
		return nil, status.Error(codes.FailedPrecondition, "plugin is not configured")
	}
	return s.comp, nil
}

func (s *Server) Start(ctx context.Context, _ *pb.StartRequest) (*pb.StartResponse, error) {
	c, err := s.component()
	if err != nil {
		return nil, err
	}
	if st, ok := c.(component.Starter); ok {
		if err := st.Start(ctx); err != nil {
			return &pb.StartResponse{Error: err.Error(), Failure: pb.ErrorToProto(err)}, nil
		}
	}
	return &pb.StartResponse{}, nil
}

func (s *Server) Close(ctx context.Context, _ *pb.CloseRequest) (*pb.CloseResponse, error) {
	s.once.Do(func() { close(s.closed) })
	s.mu.Lock()
	c := s.comp
	s.mu.Unlock()
	if cl, ok := c.(component.Closer); ok {
		if err := cl.Close(ctx); err != nil {
			return &pb.CloseResponse{Error: err.Error(), Failure: pb.ErrorToProto(err)}, nil
		}
	}
	return &pb.CloseResponse{}, nil
}

func (s *Server) Watch(_ *pb.WatchRequest, stream grpc.ServerStreamingServer[pb.WatchEvent]) error {
	// Headers tell the host the watch is in place.
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	select {
	case <-s.closed:
		return nil
	case <-stream.Context().Done():
		select {
		case <-s.closed:
			return nil
		default:
		}
		s.log.Error("the flowpipe host went away without closing this plugin; exiting")
		s.hostGone()
		return nil
	}
}

func (s *Server) Gather(context.Context, *pb.GatherRequest) (*pb.GatherResponse, error) {
	mfs, err := s.metrics.Gather()
	if err != nil {
		s.log.Warn("gather the component's metrics", "error", err)
	}
	resp := &pb.GatherResponse{}
	for _, mf := range mfs {
		b, err := proto.Marshal(mf)
		if err != nil {
			return nil, err
		}
		resp.MetricFamilies = append(resp.MetricFamilies, b)
	}
	return resp, nil
}

// Health answers the host's ping with the component's own health and its counts; it runs
// beside a Write or Enrich in progress. The answer says that this process is alive (the
// host kills one that does not answer), so it never waits for the component: a component
// whose Health waits on a lock that a long Write holds (a client library whose status waits
// behind a blocked flush) would otherwise get a busy, live plugin killed as hung.
func (s *Server) Health(ctx context.Context, _ *pb.HealthRequest) (*pb.HealthResponse, error) {
	resp := &pb.HealthResponse{}
	s.mu.Lock()
	c := s.comp
	s.mu.Unlock()
	if hc, ok := c.(component.HealthChecker); ok {
		if err := s.health(ctx, hc); err != nil {
			resp.Error = err.Error()
		}
	}
	resp.Counts = s.counts.drain()
	return resp, nil
}

// healthWait is how long the answer to a ping waits for the component's own Health; a
// check that takes longer goes on, and the answer carries the last one that returned.
const healthWait = 50 * time.Millisecond

// healthStuckAfter: a component's Health that has not returned for this long reports the
// component unhealthy (/readyz); the process, which answers, is not taken for hung.
var healthStuckAfter = time.Minute

// health runs hc.Health, one at a time, and returns its result if it comes within
// healthWait, the last result otherwise.
func (s *Server) health(ctx context.Context, hc component.HealthChecker) error {
	s.healthMu.Lock()
	if s.healthRun == nil {
		ch := make(chan struct{})
		s.healthRun, s.healthSince = ch, time.Now()
		go func() {
			err := hc.Health()
			s.healthMu.Lock()
			s.healthLast, s.healthRun = err, nil
			s.healthMu.Unlock()
			close(ch)
		}()
	}
	ch := s.healthRun
	s.healthMu.Unlock()
	t := time.NewTimer(healthWait)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	case <-ctx.Done():
	}
	s.healthMu.Lock()
	defer s.healthMu.Unlock()
	if s.healthRun != nil {
		if d := time.Since(s.healthSince); d >= healthStuckAfter {
			return fmt.Errorf("the component's health check has not returned for %s", d.Round(time.Second))
		}
	}
	return s.healthLast
}

func (s *Server) getEvents() *[]flow.Event {
	if p, ok := s.events.Get().(*[]flow.Event); ok {
		*p = (*p)[:0]
		return p
	}
	return new([]flow.Event)
}

// putEvents keeps the slice for the next call; its events' strings stay referenced until
// they are overwritten, which costs less than clearing every batch.
func (s *Server) putEvents(p *[]flow.Event) {
	s.events.Put(p)
}

// batchOf decodes a batch the host sent into pooled events; done gives them back.
func (s *Server) batchOf(req *pb.Batch) (b *flow.Batch, done func(), err error) {
	evs := s.getEvents()
	if *evs, err = codec.Decode(*evs, req.Events, int(req.Count)); err != nil {
		s.putEvents(evs)
		return nil, nil, status.Error(codes.InvalidArgument, err.Error())
	}
	b = flow.NewBatch(*evs, nil)
	b.Source = req.Source
	return b, func() { s.putEvents(evs) }, nil
}

func (s *Server) Write(ctx context.Context, req *pb.Batch) (*pb.WriteResponse, error) {
	c, err := s.component()
	if err != nil {
		return nil, err
	}
	sink := c.(component.Sink)
	var b *flow.Batch
	if _, ok := sink.(component.EncodedWriter); ok {
		// A sink that decodes only if it needs the events (discard never does) gets the
		// encoding as it came. The host encoded it, or checked it (codec.Validate) when it
		// passed on a source plugin's or a disk queue's record; a sink that decodes it still
		// finds out if it is not valid. The encoding lives until Write returns, as a sink's Events do.
		b = flow.NewEncodedBatch(req.Events, int(req.Count), false, codec.Decode, nil)
		b.Source = req.Source
	} else {
		var done func()
		if b, done, err = s.batchOf(req); err != nil {
			return nil, err
		}
		defer done()
	}
	resp := &pb.WriteResponse{}
	if err := sink.Write(ctx, b); err != nil {
		resp.Error, resp.Failure = err.Error(), pb.ErrorToProto(err)
	}
	resp.Counts = s.counts.drain()
	return resp, nil
}

func (s *Server) Enrich(ctx context.Context, req *pb.Batch) (*pb.EnrichResponse, error) {
	c, err := s.component()
	if err != nil {
		return nil, err
	}
	en := c.(component.Enricher)
	b, done, err := s.batchOf(req)
	if err != nil {
		return nil, err
	}
	defer done()
	s.mu.Lock()
	changes := s.changes
	s.mu.Unlock()
	var sent *[]flow.Event
	if changes {
		// What the host sent, to answer with what the enricher changed in it.
		sent = s.getEvents()
		*sent = append(*sent, b.Events...)
		defer s.putEvents(sent)
	}
	resp := &pb.EnrichResponse{}
	if err := en.Enrich(ctx, b); err != nil {
		resp.Error, resp.Failure = err.Error(), pb.ErrorToProto(err)
	} else if changes && len(b.Events) <= len(*sent) {
		// The answer's buffer goes back to the pool once it is sent (pb.Codec, the data
		// channel), as a whole batch's.
		buf := pb.Buffers.Get(codec.ChangesSize(b.Events)) // never grows
		*buf, _ = codec.AppendChanges((*buf)[:0], *sent, b.Events)
		resp.Batch = &pb.Batch{Count: uint32(len(b.Events)), Events: *buf, Source: b.Source}
		resp.Changes = true
	} else {
		// The answer's buffer goes back to the pool once gRPC has marshalled it (pb.Codec).
		_, resp.Batch = pb.EncodeAll(b.Events, b.Source)
	}
	resp.Counts = s.counts.drain()
	return resp, nil
}

// Run runs the source and streams its batches to the host, which acknowledges them by ID.
func (s *Server) Run(stream grpc.BidiStreamingServer[pb.SourceAck, pb.SourceMessage]) error {
	return s.run(stream)
}

// sourceStream is what a source's Run needs of its stream to the host: gRPC's, or one on
// the data channel.
type sourceStream interface {
	Send(*pb.SourceMessage) error
	Recv() (*pb.SourceAck, error)
}

func (s *Server) run(stream sourceStream) error {
	c, err := s.component()
	if err != nil {
		return err
	}
	src := c.(component.Source)
	runCtx, stop := context.WithCancel(context.Background())
	defer stop()
	s.mu.Lock()
	window, name := s.emitWindow, s.name
	s.mu.Unlock()
	em := &emitter{stream: stream, s: s, name: name, pending: map[uint64]*flow.Batch{}, empty: make(chan struct{}, 1),
		window: window, unaccepted: map[uint64]struct{}{}, changed: make(chan struct{})}
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			a, err := stream.Recv()
			if err != nil {
				stop()
				return
			}
			if a.Stop {
				stop()
				continue
			}
			if a.Emitted {
				em.emitted(a.Id, a.EmitError)
				continue
			}
			em.ack(a.Id, pb.AckFromProto(a))
		}
	}()
	runErr := src.Run(runCtx, em)
	end := &pb.SourceEnd{}
	if runErr != nil && !errors.Is(runErr, context.Canceled) {
		end.Error, end.Failure = runErr.Error(), pb.ErrorToProto(runErr)
	}
	if err := em.send(&pb.SourceMessage{Msg: &pb.SourceMessage_End{End: end}, Counts: s.counts.drain()}); err == nil {
		// Stay for the acknowledgements of what is still in the pipeline, until the host
		// closes its side.
		for !em.drained() {
			select {
			case <-em.empty:
			case <-recvDone:
			}
			select {
			case <-recvDone:
				em.failAll(flow.ErrShutdown)
			default:
			}
		}
	}
	em.failAll(flow.ErrShutdown)
	return nil
}

// emitter is the plugin side of component.Emitter: it sends batches to the host and keeps
// them until the host acknowledges them. With an emit window (a host with flow control),
// Emit returns only once fewer than window batches are sent and not yet taken by the
// pipeline, so a blocked pipeline blocks the source here as it would in process, instead of
// the batches piling up in the connection.
type emitter struct {
	stream sourceStream
	s      *Server
	window int
	name   string // the source's name, stamped on its events

	sendMu sync.Mutex
	buf    []byte

	mu         sync.Mutex
	next       uint64
	pending    map[uint64]*flow.Batch
	unaccepted map[uint64]struct{} // sent, and the host's Emit has not returned yet
	refused    error               // the host refused a batch: it refuses every later one
	changed    chan struct{}       // closed and replaced when unaccepted, refused or dead change
	dead       bool
	empty      chan struct{}
}

func (e *emitter) send(m *pb.SourceMessage) error {
	e.sendMu.Lock()
	defer e.sendMu.Unlock()
	return e.stream.Send(m)
}

var errHostGone = errors.New("the host stopped reading batches")

// room waits until fewer than e.window batches are outstanding. It returns the error the
// source must see instead: the host refused a batch (it refuses every later one too), the
// host is gone, or ctx ended.
func (e *emitter) room(ctx context.Context) error {
	for {
		e.mu.Lock()
		switch {
		case e.dead:
			e.mu.Unlock()
			return errHostGone
		case e.refused != nil:
			err := e.refused
			e.mu.Unlock()
			return err
		case e.window <= 0 || len(e.unaccepted) < e.window:
			e.mu.Unlock()
			return nil
		}
		ch := e.changed
		e.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (e *emitter) broadcastLocked() {
	close(e.changed)
	e.changed = make(chan struct{})
}

func (e *emitter) Emit(ctx context.Context, b *flow.Batch) error {
	// A batch the source built still encoded (flow.NewEncodedBatch) is decoded here, where
	// it is encoded again below: one that does not decode is refused to the source.
	if err := b.Decode(); err != nil {
		b.Release(err)
		return nil
	}
	// A window still full (an earlier Emit returned on its context) is waited for before
	// sending, so that the bound holds whatever the source does with errors.
	if err := e.room(ctx); err != nil {
		b.Release(flow.ErrShutdown)
		return err
	}
	e.mu.Lock()
	if e.dead {
		e.mu.Unlock()
		b.Release(flow.ErrShutdown)
		return errHostGone
	}
	e.next++
	id := e.next
	e.pending[id] = b
	if e.window > 0 {
		e.unaccepted[id] = struct{}{}
	}
	e.mu.Unlock()

	// The host's runtime stamps the source's name on what names none; stamped here, with the
	// same name, the events the host decodes need no change, so the host can pass their
	// encoding on to a sink plugin as it is (flow.Batch.SetEncoded).
	if e.name != "" {
		b.StampSource(e.name)
	}
	source := b.Source
	e.sendMu.Lock()
	var err error
	for rest, first := b.Events, true; len(rest) > 0 || first; first = false {
		var n int
		if cap(e.buf) < 1+len(rest)*codec.MaxFixed && len(rest)*codec.MaxFixed < pb.SplitSize {
			e.buf = make([]byte, 0, 1+len(rest)*codec.MaxFixed)
		}
		e.buf, n = codec.AppendPart(e.buf[:0], rest, pb.SplitSize)
		rest = rest[n:]
		err = e.stream.Send(&pb.SourceMessage{
			Msg: &pb.SourceMessage_Batch{Batch: &pb.SourceBatch{
				Id: id, More: len(rest) > 0,
				Batch: &pb.Batch{Count: uint32(n), Events: e.buf, Source: source},
			}},
			Counts: e.s.counts.drain(),
		})
		if err != nil {
			break
		}
	}
	if cap(e.buf) > 4<<20 {
		e.buf = nil
	}
	e.sendMu.Unlock()
	if err != nil {
		e.emitted(id, "")
		e.ack(id, flow.ErrShutdown)
		return fmt.Errorf("send batch to host: %w", err)
	}
	if err := e.room(ctx); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return nil
}

// emitted records that the host's Emit returned for batch id, with the error it returned.
func (e *emitter) emitted(id uint64, emitErr string) {
	e.mu.Lock()
	delete(e.unaccepted, id)
	if emitErr != "" && e.refused == nil {
		e.refused = fmt.Errorf("the pipeline refused the batch: %s", emitErr)
	}
	e.broadcastLocked()
	e.mu.Unlock()
}

func (e *emitter) ack(id uint64, err error) {
	e.mu.Lock()
	b := e.pending[id]
	delete(e.pending, id)
	empty := len(e.pending) == 0
	e.mu.Unlock()
	if b != nil {
		b.Release(err)
	}
	if empty {
		select {
		case e.empty <- struct{}{}:
		default:
		}
	}
}

func (e *emitter) drained() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.pending) == 0
}

func (e *emitter) failAll(err error) {
	e.mu.Lock()
	e.dead = true
	e.broadcastLocked()
	pending := e.pending
	e.pending = map[uint64]*flow.Batch{}
	e.mu.Unlock()
	for _, b := range pending {
		b.Release(err)
	}
}

// counter is the component.Metrics a plugin's component counts with; the counts travel to
// the host with the next response.
type counter struct {
	mu sync.Mutex
	m  map[countKey]uint64
}

type countKey struct {
	kind   pb.Count_Kind
	reason string
}

func (c *counter) add(k pb.Count_Kind, reason string, n int) {
	if n <= 0 {
		return
	}
	c.mu.Lock()
	if c.m == nil {
		c.m = map[countKey]uint64{}
	}
	c.m[countKey{k, reason}] += uint64(n)
	c.mu.Unlock()
}

func (c *counter) Filtered(reason string, n int) { c.add(pb.Count_KIND_FILTERED, reason, n) }
func (c *counter) Dropped(reason string, n int)  { c.add(pb.Count_KIND_DROPPED, reason, n) }
func (c *counter) Errors(reason string, n int)   { c.add(pb.Count_KIND_ERRORS, reason, n) }

func (c *counter) drain() []*pb.Count {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) == 0 {
		return nil
	}
	out := make([]*pb.Count, 0, len(c.m))
	for k, n := range c.m {
		out = append(out, &pb.Count{Kind: k.kind, Reason: k.reason, N: n})
	}
	clear(c.m)
	return out
}
