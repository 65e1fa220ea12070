package pluginserver

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// A plugin whose host connection goes away without a Close gives up (in a process: exits);
// after a Close it does not.
func TestPluginNoticesHostGone(t *testing.T) {
	for _, closeFirst := range []bool{false, true} {
		srv := New(discardFactory, "test", discardLogger())
		gone := make(chan struct{})
		srv.hostGone = func() { close(gone) }
		lis := bufconn.Listen(1 << 20)
		g := grpc.NewServer()
		srv.Register(g)
		go func() { _ = g.Serve(lis) }()
		conn, err := grpc.NewClient("passthrough:///x", grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }))
		if err != nil {
			t.Fatal(err)
		}
		c := pb.NewComponentClient(conn)
		stream, err := c.Watch(context.Background(), &pb.WatchRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Header(); err != nil { // the server has the stream
			t.Fatal(err)
		}
		if closeFirst {
			if _, err := c.Close(context.Background(), &pb.CloseRequest{}); err != nil {
				t.Fatal(err)
			}
			// After a Close the watch ends cleanly: the plugin no longer watches.
			if _, err := stream.Recv(); err != io.EOF {
				t.Fatalf("watch after Close: %v, want EOF", err)
			}
		}
		conn.Close() // the host goes away
		if !closeFirst {
			<-gone // no deadline but the test's: the plugin must notice
		} else {
			select {
			case <-gone:
				t.Fatal("plugin gave up although the host closed it first")
			default:
			}
		}
		g.Stop()
	}
}

type discardConfig struct{}

type discardSink struct{}

func (discardSink) Write(context.Context, *flow.Batch) error { return nil }

var discardFactory = component.NewSinkFactory("discard", "", func() *discardConfig { return &discardConfig{} },
	func(component.Env, *discardConfig) (component.Sink, error) { return discardSink{}, nil })

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
