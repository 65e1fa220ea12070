// Package pluginproto is the flowpipe plugin wire protocol, flowpipe.plugin.v1: the generated
// gRPC services and messages (plugin.proto), and what both sides of the boundary must agree
// on beyond them: the go-plugin handshake, message limits and gRPC options, the one buffer
// pool and codec of the connection, how a batch too large for one message is split, and how
// an acknowledgement keeps its meaning. The host (internal/pluginhost) and the plugin side
// (internal/pluginserver, reached through the public sdk) both import it, and nothing else
// of each other.
package pluginproto

import (
	"context"
	"errors"

	goplugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/experimental"

	"github.com/flowpipe/flowpipe/core/flow"
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
// would exceed SplitSize are sent in several parts.
const MaxMessageSize = 256 << 20

// ParentPIDEnv tells a plugin process the PID of the flowpipe that started it, so that it
// can exit at once if that parent died before the parent-death signal was armed.
const ParentPIDEnv = "FLOWPIPE_PLUGIN_PARENT_PID"

// StdoutFDEnv names the file descriptor of flowpipe's standard output in a plugin process.
const StdoutFDEnv = "FLOWPIPE_PLUGIN_STDOUT_FD"

// LogAttrsKey is the key under which a plugin's log line (hclog JSON on its stderr) carries
// its attributes, in order, as one list [key, value, key, value, ...]: go-plugin parses each
// line into a map, which would lose the order. The host unfolds the list, so a component's
// line reads the same in and out of process.
const LogAttrsKey = "@attrs"

// PluginName is the single plugin name in each go-plugin plugin set.
const PluginName = "component"

// A batch is hundreds of kilobytes: with HTTP/2's default 64 KiB flow-control window, each
// one waited for window updates from the other side, and 32 KiB I/O buffers cut it into
// many system calls. Both ends are on one machine, so large windows cost nothing.
const (
	windowSize   = 64 << 20
	ioBufferSize = 1 << 20
)

// ServerOptions are the gRPC options of the plugin side's server.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(MaxMessageSize), grpc.MaxSendMsgSize(MaxMessageSize),
		experimental.BufferPool(Buffers), grpc.ForceServerCodecV2(Codec{}),
		grpc.InitialWindowSize(windowSize), grpc.InitialConnWindowSize(windowSize),
		grpc.WriteBufferSize(ioBufferSize), grpc.ReadBufferSize(ioBufferSize),
	}
}

// DialOptions are the gRPC options of the host's connection to a plugin.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize), grpc.ForceCodecV2(Codec{})),
		experimental.WithBufferPool(Buffers),
		grpc.WithInitialWindowSize(windowSize), grpc.WithInitialConnWindowSize(windowSize),
		grpc.WithWriteBufferSize(ioBufferSize), grpc.WithReadBufferSize(ioBufferSize),
	}
}

// grpcPlugin is the go-plugin glue: the plugin side registers its servers, the host side
// gets the client connection.
type grpcPlugin struct {
	goplugin.NetRPCUnsupportedPlugin
	register func(*grpc.Server) // plugin side only
}

func (p *grpcPlugin) GRPCServer(_ *goplugin.GRPCBroker, s *grpc.Server) error {
	p.register(s)
	return nil
}

func (p *grpcPlugin) GRPCClient(_ context.Context, _ *goplugin.GRPCBroker, c *grpc.ClientConn) (any, error) {
	return c, nil
}

// PluginSets is the go-plugin plugin set of this protocol version. The plugin side passes
// the function that registers its services; the host passes nil and dispenses PluginName
// as a *grpc.ClientConn.
func PluginSets(register func(*grpc.Server)) map[int]goplugin.PluginSet {
	return map[int]goplugin.PluginSet{ProtocolVersion: {PluginName: &grpcPlugin{register: register}}}
}

// AckToProto and AckFromProto carry a source batch's acknowledgement across the boundary.
func AckToProto(id uint64, err error) *SourceAck {
	a := &SourceAck{Id: id}
	var drop *flow.DropError
	switch {
	case err == nil:
	case errors.As(err, &drop):
		a.Status, a.Component, a.Reason, a.Message = SourceAck_STATUS_DROPPED, drop.Component, drop.Reason, drop.Message
	case errors.Is(err, flow.ErrShutdown):
		a.Status = SourceAck_STATUS_SHUTDOWN
	default:
		a.Status, a.Message = SourceAck_STATUS_FAILED, err.Error()
	}
	return a
}

func AckFromProto(a *SourceAck) error {
	switch a.Status {
	case SourceAck_STATUS_DELIVERED:
		return nil
	case SourceAck_STATUS_DROPPED:
		return &flow.DropError{Component: a.Component, Reason: a.Reason, Message: a.Message}
	case SourceAck_STATUS_SHUTDOWN:
		return flow.ErrShutdown
	}
	return errors.New(a.Message)
}
