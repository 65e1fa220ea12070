package plugin

import (
	"context"
	"errors"
	"fmt"

	goplugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/experimental"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	pb "github.com/flowpipe/flowpipe/core/plugin/proto/v1"
)

// ProtocolVersion is the major version of the plugin protocol this package speaks. A plugin
// and a host agree on it during the go-plugin handshake; a plugin that speaks only another
// version is refused with an error that names both.
const ProtocolVersion = 1

// Handshake is the go-plugin handshake. The cookie is not a secret: it only makes a plugin
// binary run by hand say what it is instead of waiting for a host.
var Handshake = goplugin.HandshakeConfig{
	ProtocolVersion:  ProtocolVersion,
	MagicCookieKey:   "FLOWPIPE_PLUGIN_MAGIC_COOKIE",
	MagicCookieValue: "8e2e3a2c-flowpipe-plugin-6f1d0b4e",
}

// MaxMessageSize is the largest gRPC message either side accepts. Batches whose encoding
// would exceed splitSize are sent in several parts.
const MaxMessageSize = 256 << 20

// splitSize bounds the encoded events of one message, leaving room for the envelope.
var splitSize = 64 << 20

// emitWindow is how many batches a source plugin may have sent that the pipeline has not
// taken yet (ConfigureRequest.emit_window). Its Emit blocks beyond that, as the in-process
// Emit blocks while the sinks' queues are full: what a stalled pipeline holds beyond its
// queues is at most this many batches per source plugin. Two lets the plugin encode the
// next batch while the host decodes and queues the last one.
var emitWindow uint32 = 4

// parentPIDEnv tells a plugin process the PID of the flowpipe that started it, so that it
// can exit at once if that parent died before the parent-death signal was armed.
const parentPIDEnv = "FLOWPIPE_PLUGIN_PARENT_PID"

// stdoutFDEnv names the file descriptor of flowpipe's standard output in a plugin process.
const stdoutFDEnv = "FLOWPIPE_PLUGIN_STDOUT_FD"

// pluginName is the single plugin name in each go-plugin plugin set.
const pluginName = "component"

// A batch is hundreds of kilobytes: with HTTP/2's default 64 KiB flow-control window, each
// one waited for window updates from the other side, and 32 KiB I/O buffers cut it into
// many system calls. Both ends are on one machine, so large windows cost nothing.
const (
	windowSize   = 64 << 20
	ioBufferSize = 1 << 20
)

func grpcServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxMessageSize), grpc.MaxSendMsgSize(MaxMessageSize),
		experimental.BufferPool(bufferPool), grpc.ForceServerCodecV2(protoCodec{}),
		grpc.InitialWindowSize(windowSize), grpc.InitialConnWindowSize(windowSize),
		grpc.WriteBufferSize(ioBufferSize), grpc.ReadBufferSize(ioBufferSize),
	}
}

func grpcDialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize), grpc.ForceCodecV2(protoCodec{})),
		experimental.WithBufferPool(bufferPool),
		grpc.WithInitialWindowSize(windowSize), grpc.WithInitialConnWindowSize(windowSize),
		grpc.WithWriteBufferSize(ioBufferSize), grpc.WithReadBufferSize(ioBufferSize),
	}
}

// grpcPlugin is the go-plugin glue: the plugin side registers its servers, the host side
// gets the client connection.
type grpcPlugin struct {
	goplugin.NetRPCUnsupportedPlugin
	srv *server // plugin side only
}

func (p *grpcPlugin) GRPCServer(_ *goplugin.GRPCBroker, s *grpc.Server) error {
	p.srv.register(s)
	return nil
}

func (p *grpcPlugin) GRPCClient(_ context.Context, _ *goplugin.GRPCBroker, c *grpc.ClientConn) (any, error) {
	return c, nil
}

func pluginSets(srv *server) map[int]goplugin.PluginSet {
	return map[int]goplugin.PluginSet{ProtocolVersion: {pluginName: &grpcPlugin{srv: srv}}}
}

// ackToProto and ackFromProto carry a source batch's acknowledgement across the boundary.
func ackToProto(id uint64, err error) *pb.SourceAck {
	a := &pb.SourceAck{Id: id}
	var drop *flow.DropError
	switch {
	case err == nil:
	case errors.As(err, &drop):
		a.Status, a.Component, a.Reason = pb.SourceAck_STATUS_DROPPED, drop.Component, drop.Reason
	case errors.Is(err, flow.ErrShutdown):
		a.Status = pb.SourceAck_STATUS_SHUTDOWN
	default:
		a.Status, a.Message = pb.SourceAck_STATUS_FAILED, err.Error()
	}
	return a
}

func ackFromProto(a *pb.SourceAck) error {
	switch a.Status {
	case pb.SourceAck_STATUS_DELIVERED:
		return nil
	case pb.SourceAck_STATUS_DROPPED:
		return &flow.DropError{Component: a.Component, Reason: a.Reason}
	case pb.SourceAck_STATUS_SHUTDOWN:
		return flow.ErrShutdown
	}
	return errors.New(a.Message)
}

func kindOf(s string) (component.Kind, error) {
	switch k := component.Kind(s); k {
	case component.KindSource, component.KindEnricher, component.KindSink:
		return k, nil
	}
	return "", fmt.Errorf("unknown component kind %q", s)
}

// applyCounts adds what the plugin counted to the host's metrics for the component.
func applyCounts(m component.Metrics, counts []*pb.Count) {
	for _, c := range counts {
		n := int(c.N)
		switch c.Kind {
		case pb.Count_KIND_FILTERED:
			m.Filtered(c.Reason, n)
		case pb.Count_KIND_DROPPED:
			m.Dropped(c.Reason, n)
		case pb.Count_KIND_ERRORS:
			m.Errors(c.Reason, n)
		}
	}
}
