package pluginserver

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"syscall"

	"github.com/hashicorp/go-hclog"
	goplugin "github.com/hashicorp/go-plugin"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/flowpipe/flowpipe/core/component"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// Serve serves the component that f builds as a plugin process until the host is done with
// it, and returns the process's exit status. Run by hand, outside flowpipe, it explains that
// it is a plugin and returns 1.
func Serve(f component.Factory, version string) int {
	if os.Getenv(pb.Handshake.MagicCookieKey) != pb.Handshake.MagicCookieValue {
		fmt.Fprintf(os.Stderr, "This is a flowpipe %s plugin (type %q, version %s); flowpipe starts it.\n"+
			"Configure it in pipeline.yaml under %ss with plugin: <path or name>, then run flowpipe.\n", f.Kind, f.Type, version, f.Kind)
		return 1
	}
	// The parent-death signal was armed in this process between fork and exec; if the
	// parent was already gone by then, nobody will signal us: check once.
	if want, err := strconv.Atoi(os.Getenv(pb.ParentPIDEnv)); err == nil && want != os.Getppid() {
		fmt.Fprintln(os.Stderr, "flowpipe plugin: the flowpipe process that started this plugin is gone; exiting")
		return 1
	}
	// Not dumpable: another process of the same user (a sibling plugin running as the same
	// run_as user, compromised) cannot ptrace this one or read its memory and environment
	// (secrets in options, the mTLS certificate); no core dumps either (docs/security.md).
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
	// A service manager stopping flowpipe may signal its whole process group; the plugin
	// must stay until flowpipe has flushed and closed it (go-plugin already ignores
	// SIGINT). It cannot outlive flowpipe: the parent-death signal is SIGKILL, and the
	// Watch stream ends when flowpipe is gone.
	signal.Ignore(syscall.SIGTERM, syscall.SIGHUP) // nor a terminal hangup behind flowpipe's back
	// go-plugin swaps os.Stderr for a pipe once serving; logs go to the real stderr, where
	// the host reads them line by line as hclog JSON.
	stderr := os.Stderr
	log := slog.New(newHCLogHandler(stderr, slog.LevelDebug))
	srv := New(f, version, log)
	srv.hostGone = func() { os.Exit(3) }
	if fd, err := strconv.Atoi(os.Getenv(pb.StdoutFDEnv)); err == nil && fd > 2 {
		srv.stdout = os.NewFile(uintptr(fd), "flowpipe-stdout")
	}
	// The data channel the host passed down, unless turned off here (a plugin then speaks
	// as one built before the channel: every batch over gRPC).
	if fd, err := strconv.Atoi(os.Getenv(pb.DataFDEnv)); err == nil && fd > 2 && !pb.DataChannelOff() {
		out := -1 // a host before the split passes one socketpair, used both ways
		if o, err := strconv.Atoi(os.Getenv(pb.DataOutFDEnv)); err == nil && o > 2 {
			out = o
		}
		if fc, split, err := pb.OpenDataFDs(fd, out); err != nil {
			log.Warn("plugin data channel unusable; batches go over gRPC", "error", err)
		} else {
			srv.ServeData(fc, split)
		}
	}
	// FLOWPIPE_PLUGIN_CPUPROFILE=prefix writes a CPU profile of each plugin process to
	// prefix.<type>.<pid> when it stops cleanly (docs/plugins.md, Debug it).
	if prefix := os.Getenv("FLOWPIPE_PLUGIN_CPUPROFILE"); prefix != "" {
		if pf, err := os.Create(fmt.Sprintf("%s.%s.%d", prefix, f.Type, os.Getpid())); err == nil {
			if err := pprof.StartCPUProfile(pf); err == nil {
				defer func() { pprof.StopCPUProfile(); pf.Close() }()
			}
		}
	}
	goplugin.Serve(&goplugin.ServeConfig{
		HandshakeConfig:  pb.Handshake,
		VersionedPlugins: pb.PluginSets(srv.Register),
		GRPCServer: func(opts []grpc.ServerOption) *grpc.Server {
			return grpc.NewServer(append(opts, pb.ServerOptions()...)...)
		},
		Logger: hclog.New(&hclog.LoggerOptions{Output: stderr, JSONFormat: true, Level: hclog.Info, Name: f.Type}),
	})
	return 0
}
