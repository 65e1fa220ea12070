package pluginhost

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"gopkg.in/yaml.v3"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
	"github.com/flowpipe/flowpipe/internal/pluginserver"
)

// ServeInMemory serves the component f builds inside this process over a real gRPC
// connection (an in-memory pipe instead of a process and a socket), configures it with
// options as pipeline.yaml would, and returns it as the host sees a plugin: a
// component.Source, Enricher or Sink that also implements component.Starter and
// component.Closer. Batches cross the same protocol and encoding as with a process: the
// data channel, a socketpair within this process (gRPC with FLOWPIPE_PLUGIN_DATA_CHANNEL=off). Option
// problems come back as options.FieldErrors. It is what plugintest builds on.
func ServeInMemory(ctx context.Context, f component.Factory, version string, options map[string]any, env component.Env) (any, error) {
	return serveInMemory(ctx, f, version, options, env)
}

// serveInMemory is ServeInMemory with more options for the plugin side's gRPC server (tests
// intercept what it sends).
func serveInMemory(ctx context.Context, f component.Factory, version string, options map[string]any, env component.Env, extra ...grpc.ServerOption) (any, error) {
	if env.Logger == nil {
		env.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if env.Metrics == nil {
		env.Metrics = component.NopMetrics{}
	}
	if env.Name == "" {
		env.Name = f.Type
	}
	env.Kind, env.Type = f.Kind, f.Type
	optYAML, err := yaml.Marshal(options)
	if err != nil {
		return nil, fmt.Errorf("encode options: %w", err)
	}
	srv := pluginserver.New(f, version, env.Logger)
	lis := bufconn.Listen(4 << 20)
	g := grpc.NewServer(append(pb.ServerOptions(), extra...)...)
	srv.Register(g)
	go func() { _ = g.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///in-memory",
		append(pb.DialOptions(),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
			grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		g.Stop()
		return nil, err
	}
	p := &proc{
		comp: pb.NewComponentClient(conn), sink: pb.NewSinkClient(conn), enr: pb.NewEnricherClient(conn), src: pb.NewSourceClient(conn),
		done: make(chan struct{}), release: make(chan struct{}),
		onStop: func() { _ = conn.Close(); g.Stop() },
	}
	var data *pb.Channel
	if !pb.DataChannelOff() {
		ch, err := pb.NewChannel()
		if err != nil {
			p.kill()
			return nil, err
		}
		fc, err := ch.PluginConn()
		if err != nil {
			ch.Close()
			p.kill()
			return nil, err
		}
		srv.ServeData(fc, true)
		data = ch
	}
	spec := config.Component{Kind: f.Kind, Name: env.Name, Type: f.Type, Options: options}
	l := &launcher{describe: fmt.Sprintf("in-memory %s %q", f.Kind, f.Type), inMemory: true}
	holder, err := p.configure(ctx, l.describe, spec, env, defaultSettings().StartTimeout, optYAML)
	p.offerData(data, env.Logger)
	if err == nil && holder {
		err = fmt.Errorf("%s keeps events across batches (component.Holder) and cannot run as a plugin", l.describe)
	}
	if err != nil {
		p.kill()
		return nil, err
	}
	in := newInstance(spec, env, defaultSettings(), l, optYAML)
	in.adopt(p)
	return remote(f.Kind, in), nil
}
