package pluginhost

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	goplugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/options"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
	"github.com/flowpipe/flowpipe/internal/privilege"
)

// emitWindow is how many batches a source plugin may have sent that the pipeline has not
// taken yet (ConfigureRequest.emit_window). Its Emit blocks beyond that, as the in-process
// Emit blocks while the sinks' queues are full: what a stalled pipeline holds beyond its
// queues is at most this many batches per source plugin. A few let the plugin encode the
// next batches while the host decodes and queues the last one (one alone halves a source
// plugin's throughput; docs/benchmarks.md).
var emitWindow uint32 = 4

// proc is one running plugin process and its gRPC clients. A restart makes a new proc.
type proc struct {
	client *goplugin.Client
	cmd    *exec.Cmd
	comp   pb.ComponentClient
	sink   pb.SinkClient
	enr    pb.EnricherClient
	src    pb.SourceClient
	desc   *pb.DescribeResponse
	// data is the data channel, when the plugin serves its batches there (sink and enr
	// are then its clients); nil: every batch goes over gRPC.
	data *dataConn
	// changes: the host asked the enricher to answer with its changes
	// (ConfigureRequest.enrich_changes); an answer as changes is a bad answer otherwise.
	changes bool
	// pending is the data channel until Describe says how the plugin uses it (offerData).
	pending *pb.Channel

	// heard counts what came from the process besides health answers (data channel frames,
	// answers to calls, source messages): a sign that it is alive when a health answer is
	// late (instance.alive).
	heard atomic.Uint64

	failed error // why the instance failed it (under instance.mu)
	// killGroup kills the process and every process of its group, if it still runs.
	killGroup context.CancelFunc
	done      chan struct{} // closed when the proc is being stopped
	doneOnce  sync.Once
	release   chan struct{} // lets the OS thread that started the process go
	watch     context.CancelFunc
	onStop    func() // in memory: stops the server and the connection
}

// startProc starts the process, checks what it is and configures the component. The
// process is started from an OS thread locked for its whole life: the parent-death signal
// (SIGKILL) is tied to the thread that forked, so the plugin dies with flowpipe, even with
// kill -9, and never with a Go runtime thread that happens to exit.
func startProc(ctx context.Context, l *launcher, spec config.Component, env component.Env, s Settings, optYAML []byte) (*proc, bool, error) {
	cmd, err := l.cmd()
	if err != nil {
		return nil, false, err
	}
	if l.checksum != nil && l.path != "" {
		// The launcher checks again just before its exec (privilege.Wrap); checking here
		// first gives an error that says which hashes differ and what to do.
		sum, err := FileSHA256(cmd.Path)
		if err != nil {
			return nil, false, fmt.Errorf("%s: %w", l.describe, err)
		}
		if !bytes.Equal(sum, l.checksum) {
			return nil, false, options.FieldErrors{{Path: "sha256", Msg: fmt.Sprintf("%s has SHA-256 %x, but pipeline.yaml pins %s: refusing to start it. If you replaced the plugin on purpose, set sha256: to the output of `sha256sum %s`", cmd.Path, sum, hex.EncodeToString(l.checksum), cmd.Path)}}
		}
	}
	// Every plugin process starts through the privilege launcher: only the capabilities its
	// component declared, an emptied bounding set, no_new_privs, and the run_as user.
	priv := privilege.Spec{}
	if l.priv != nil {
		priv = *l.priv
	}
	var launchSum []byte
	if l.path != "" {
		launchSum = l.checksum // cmd.Path becomes the launcher: it checks the plugin's pin
	}
	if err := privilege.Wrap(cmd, priv, launchSum); err != nil {
		return nil, false, fmt.Errorf("%s: %w", l.describe, err)
	}
	// The whole start, handshake to configured component, is bounded by start_timeout. The
	// process leads its own process group, and stopping it kills the group: a plugin that
	// left a child holding its standard output (a shell script, say) would otherwise keep
	// go-plugin waiting for that output to end, for as long as the child lives.
	ctx, cancelStart := context.WithTimeout(ctx, s.StartTimeout)
	defer cancelStart()
	procCtx, killGroup := context.WithCancel(context.Background())
	cmd = groupCommand(procCtx, cmd)
	cmd.Env = append(cmd.Env, pb.ParentPIDEnv+"="+strconv.Itoa(os.Getpid()))
	// go-plugin owns the plugin's standard output (the handshake, then a gRPC stream that
	// copies asynchronously); flowpipe's own stdout goes along as fd 3, so that a component
	// writing to standard output (a file sink with path "-") writes where it would in
	// process, synchronously.
	cmd.ExtraFiles = []*os.File{os.Stdout}
	cmd.Env = append(cmd.Env, pb.StdoutFDEnv+"=3")
	// The data channel for batches: one end of a socketpair, as fd 4. It is offered to
	// every plugin; one built before it never looks at the descriptor, and Describe says
	// whether the plugin serves it (offerData closes the host's end if not).
	// Two socketpairs, one each way (pluginproto, FrameConn): fd 4 from the host, fd 5 to it;
	// a plugin built before the split uses fd 4 both ways.
	var channel *pb.Channel
	if !pb.DataChannelOff() {
		ch, err := pb.NewChannel()
		if err != nil {
			killGroup()
			return nil, false, fmt.Errorf("%s: %w", l.describe, err)
		}
		channel = ch
		cmd.ExtraFiles = append(cmd.ExtraFiles, ch.InChild, ch.OutChild)
		cmd.Env = append(cmd.Env, pb.DataFDEnv+"=4", pb.DataOutFDEnv+"=5")
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	log := env.Logger
	if log == nil {
		log = slog.Default()
	}
	out := &lineLogger{log: log, msg: "plugin output"}
	cfg := &goplugin.ClientConfig{
		HandshakeConfig:  pb.Handshake,
		VersionedPlugins: pb.PluginSets(nil),
		Cmd:              cmd,
		AllowedProtocols: []goplugin.Protocol{goplugin.ProtocolGRPC},
		AutoMTLS:         true,
		Logger:           newHCLogAdapter(log),
		GRPCDialOptions:  pb.DialOptions(),
		StartTimeout:     s.StartTimeout,
		SyncStdout:       out,
		SyncStderr:       out,
	}
	p := &proc{client: goplugin.NewClient(cfg), cmd: cmd, killGroup: killGroup, done: make(chan struct{}), release: make(chan struct{})}
	// Until Describe says whether and how the plugin serves it; closed with the process.
	p.pending = channel
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		_, err := p.client.Client()
		if channel != nil {
			channel.CloseChildren() // the process has its own copies (or never started)
		}
		started <- err
		if err != nil {
			return // the thread ends with this goroutine; go-plugin killed the process
		}
		<-p.release
		runtime.UnlockOSThread()
	}()
	select {
	case err := <-started:
		if err != nil {
			p.kill()
			switch {
			case ctx.Err() != nil:
				return nil, false, startErr(ctx, l, s, "did not complete the plugin handshake")
			case strings.Contains(err.Error(), "timeout while waiting for plugin to start"): // go-plugin's own clock
				return nil, false, startErr(context.Background(), l, s, "did not complete the plugin handshake")
			}
			return nil, false, explainStart(l, err)
		}
	case <-ctx.Done():
		p.abandon()
		return nil, false, startErr(ctx, l, s, "did not complete the plugin handshake")
	}
	rpc, _ := p.client.Client()
	raw, err := rpc.Dispense(pb.PluginName)
	if err != nil {
		p.kill()
		return nil, false, fmt.Errorf("%s: %w", l.describe, err)
	}
	conn := raw.(*grpc.ClientConn)
	p.comp = pb.NewComponentClient(conn)
	p.sink, p.enr, p.src = pb.NewSinkClient(conn), pb.NewEnricherClient(conn), pb.NewSourceClient(conn)
	data := p.pending
	p.pending = nil // offerData decides

	holder, err := p.configure(ctx, l.describe, spec, env, s.StartTimeout, optYAML)
	p.offerData(data, env.Logger)
	if err != nil {
		if ctx.Err() != nil {
			p.abandon()
			return nil, false, startErr(ctx, l, s, "did not answer once started")
		}
		p.shutdown() // a healthy plugin that refused its options: let it exit
		return nil, false, err
	}
	return p, holder, nil
}

// offerData makes ch the path of p's batches if the plugin said it serves the data channel,
// split or both ways on the first socketpair as it said, and closes it otherwise.
func (p *proc) offerData(ch *pb.Channel, log *slog.Logger) {
	if ch == nil {
		return
	}
	if !p.desc.GetDataChannel() {
		ch.Close()
		return
	}
	fc, err := ch.HostConn(p.desc.GetDataChannelOut())
	if err != nil {
		if log != nil {
			log.Warn("plugin data channel unusable; batches go over gRPC", "error", err)
		}
		return
	}
	d := newDataConn(fc)
	d.heard = &p.heard
	p.data = d
	p.sink, p.enr = sinkData{d}, enricherData{d}
}

// startErr says that starting l ended with ctx: start_timeout passed, or the caller gave up.
func startErr(ctx context.Context, l *launcher, s Settings, what string) error {
	if ctx.Err() == nil || errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%s %s within %s (process.start_timeout): is it a flowpipe plugin, and is the machine overloaded?", l.describe, what, s.StartTimeout)
	}
	return fmt.Errorf("start %s: %w", l.describe, ctx.Err())
}

// groupCommand is cmd run with ctx: when ctx is cancelled while the process runs, its whole
// process group is killed (it leads one: Setpgid).
func groupCommand(ctx context.Context, cmd *exec.Cmd) *exec.Cmd {
	c := exec.CommandContext(ctx, cmd.Path)
	c.Args, c.Env, c.Dir, c.Err = cmd.Args, cmd.Env, cmd.Dir, cmd.Err
	c.ExtraFiles, c.SysProcAttr = cmd.ExtraFiles, cmd.SysProcAttr
	c.Cancel = func() error {
		_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
		return c.Process.Kill()
	}
	return c
}

// configure describes the plugin, checks that it is what spec asks for and configures the
// component; a spec without a kind only describes (plugins list).
func (p *proc) configure(ctx context.Context, describe string, spec config.Component, env component.Env, timeout time.Duration, optYAML []byte) (bool, error) {
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	desc, err := p.comp.Describe(cctx, &pb.DescribeRequest{})
	if err != nil {
		return false, fmt.Errorf("%s: describe: %w", describe, err)
	}
	p.desc = desc
	if spec.Kind == "" {
		return false, nil // Inspect: describe only
	}
	if desc.ProtocolVersion != pb.ProtocolVersion {
		return false, fmt.Errorf("%s speaks flowpipe plugin protocol %d, this flowpipe speaks %d", describe, desc.ProtocolVersion, pb.ProtocolVersion)
	}
	if desc.Kind != string(spec.Kind) {
		return false, fmt.Errorf("%s is a %s plugin (type %q), but it is configured as a %s", describe, desc.Kind, desc.Type, spec.Kind)
	}
	if spec.Plugin == "" && desc.Type != spec.Type {
		return false, fmt.Errorf("%s served type %q instead", describe, desc.Type)
	}
	p.changes = spec.Kind == component.KindEnricher && !pb.EnrichChangesOff()
	resp, err := p.comp.Configure(cctx, &pb.ConfigureRequest{Name: spec.Name, ConfigDir: env.ConfigDir, DataDir: env.DataDir, OptionsYaml: optYAML, EmitWindow: emitWindow, EnrichChanges: p.changes})
	if err != nil {
		return false, fmt.Errorf("%s: configure: %w", describe, err)
	}
	if len(resp.FieldErrors) > 0 {
		var errs options.FieldErrors
		for _, fe := range resp.FieldErrors {
			errs = append(errs, options.FieldError{Path: fe.Path, Msg: fe.Message})
		}
		return false, errs
	}
	if resp.Error != "" {
		return false, fmt.Errorf("%s: %s", describe, resp.Error)
	}
	return resp.Holder, nil
}

func explainStart(l *launcher, err error) error {
	msg := err.Error()
	switch {
	case errors.Is(err, goplugin.ErrChecksumsDoNotMatch) && l.path == "":
		return fmt.Errorf("%s: the flowpipe binary changed on disk since flowpipe started (an upgrade?); refusing to start it as a plugin of this flowpipe: restart flowpipe", l.describe)
	case errors.Is(err, goplugin.ErrChecksumsDoNotMatch):
		return fmt.Errorf("%s: SHA-256 does not match the pin; refusing to start it", l.describe)
	case strings.Contains(msg, "incompatible API version"):
		return fmt.Errorf("%s speaks another version of the flowpipe plugin protocol than this flowpipe (%d): rebuild it with a matching flowpipe SDK (%v)", l.describe, pb.ProtocolVersion, err)
	case strings.Contains(msg, "exited before we could connect"), strings.Contains(msg, "Unrecognized remote plugin message"):
		return fmt.Errorf("%s is not a flowpipe plugin, or failed as it started (its output is logged above): %v", l.describe, err)
	}
	return fmt.Errorf("start %s: %w", l.describe, err)
}

// stop ends the proc's background work (health checks, watch) once.
func (p *proc) stop() bool {
	first := false
	p.doneOnce.Do(func() {
		first = true
		close(p.done)
		if p.watch != nil {
			p.watch()
		}
	})
	return first
}

// kill stops the process at once: it crashed, hung, or is not wanted.
func (p *proc) kill() {
	if !p.stop() {
		return
	}
	if p.killGroup != nil {
		p.killGroup()
	}
	p.end()
}

// abandon kills the process group at once and lets go-plugin let go of it in the
// background: a start that timed out returns its error without waiting for go-plugin.
func (p *proc) abandon() {
	if !p.stop() {
		return
	}
	p.killGroup()
	go p.end()
}

// shutdown stops a healthy process that is not wanted (its options were refused): go-plugin
// asks it to exit and kills it only if it does not.
func (p *proc) shutdown() {
	if p.stop() {
		p.end()
	}
}

// killGrace is how long stopping a plugin waits for go-plugin to let go of it before the
// process group is killed, and then again before giving up on it.
var killGrace = 5 * time.Second

func (p *proc) end() {
	if p.client != nil {
		// go-plugin's Kill returns only once the plugin's output ends: bounded, so that a
		// child holding that output cannot hold the host.
		done := make(chan struct{})
		go func() { p.client.Kill(); close(done) }()
		select {
		case <-done:
		case <-time.After(killGrace):
			p.killGroup()
			select {
			case <-done:
			case <-time.After(killGrace):
				// Something outside the group holds the plugin's output; go-plugin's
				// readers stay until it ends, the host goes on.
			}
		}
		if p.killGroup != nil {
			p.killGroup()
		}
		select {
		case <-done:
			// The process was waited for: what is left of its group (children it left
			// behind) goes too.
			if pid := p.pid(); pid > 0 {
				_ = syscall.Kill(-pid, syscall.SIGKILL)
			}
		default:
		}
	}
	if p.data != nil {
		p.data.close()
	}
	if p.pending != nil {
		p.pending.Close()
	}
	if p.onStop != nil {
		p.onStop()
	}
	close(p.release)
}

// close closes the component (it flushes) and then stops the process gracefully, killing
// it if it does not exit.
func (p *proc) close(ctx context.Context) error {
	resp, err := p.comp.Close(ctx, &pb.CloseRequest{})
	if !p.stop() {
		return err
	}
	p.end()
	if err != nil {
		return fmt.Errorf("close: %w", err)
	}
	return pb.ErrorFromProto(resp.Failure, resp.Error)
}

func (p *proc) pid() int {
	if p.cmd != nil && p.cmd.Process != nil {
		return p.cmd.Process.Pid
	}
	return 0
}
