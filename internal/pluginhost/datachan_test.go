package pluginhost

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// instanceOf is the host side of a plugin component.
func instanceOf(t *testing.T, c any) *instance {
	t.Helper()
	switch r := c.(type) {
	case *remoteSink:
		return r.in
	case *remoteEnricher:
		return r.in
	case *remoteSource:
		return r.in
	}
	t.Fatalf("%T is not a plugin component", c)
	return nil
}

func currentProc(t *testing.T, c any) *proc {
	t.Helper()
	p, err := instanceOf(t, c).get(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Every kind of plugin built with this SDK gets its batches over the data channel, and one
// built before it (the test plugin under a name ending in v1 declines the channel, as the
// SDK before it did: no data_channel in Describe, the descriptor never read) works over gRPC,
// with the same results.
func TestDataChannelNegotiated(t *testing.T) {
	if pb.DataChannelOff() {
		t.Skip(pb.DataChannelEnv + "=off: the host offers no data channel")
	}
	for _, old := range []bool{false, true} {
		suffix := ""
		if old {
			suffix = "v1"
		}
		t.Run("sink"+suffix, func(t *testing.T) {
			f := newFixture(t, component.KindSink, "out")
			path := filepath.Join(t.TempDir(), "out.jsonl")
			c, err := f.instantiate(t, "jsonl"+suffix, map[string]any{"path": path})
			if err != nil {
				t.Fatal(err)
			}
			if got := currentProc(t, c).data != nil; got == old {
				t.Fatalf("data channel in use: %v, want %v", got, !old)
			}
			if err := c.(component.Starter).Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			for i := range 3 {
				if err := c.(component.Sink).Write(context.Background(), flow.NewBatch(seqEvents(i*500, 500), nil)); err != nil {
					t.Fatal(err)
				}
			}
			if err := c.(component.Closer).Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			lines := readLines(t, path)
			if len(lines) != 1500 {
				t.Fatalf("%d lines written, want 1500", len(lines))
			}
			for i, l := range lines {
				e := testEvent(i)
				if l != string(flow.AppendJSON(nil, &e)) {
					t.Fatalf("line %d: %s", i, l)
				}
			}
		})
		t.Run("enricher"+suffix, func(t *testing.T) {
			f := newFixture(t, component.KindEnricher, "tag")
			c, err := f.instantiate(t, "tag"+suffix, map[string]any{"rule": "r-2", "drop_every": 4})
			if err != nil {
				t.Fatal(err)
			}
			if got := currentProc(t, c).data != nil; got == old {
				t.Fatalf("data channel in use: %v, want %v", got, !old)
			}
			b := flow.NewBatch(seqEvents(0, 1000), nil)
			if err := c.(component.Enricher).Enrich(context.Background(), b); err != nil {
				t.Fatal(err)
			}
			if len(b.Events) != 750 {
				t.Fatalf("kept %d events, want 750", len(b.Events))
			}
			for _, e := range b.Events {
				if e.RuleID != "r-2" || e.SrcPort%4 == 0 {
					t.Fatalf("event not enriched or not filtered: %+v", e)
				}
			}
			if n := f.m.get("filtered/port_multiple"); n != 250 {
				t.Errorf("filtered count %d, want 250", n)
			}
		})
		t.Run("source"+suffix, func(t *testing.T) {
			f := newFixture(t, component.KindSource, "seq")
			acks := filepath.Join(t.TempDir(), "acks")
			c, err := f.instantiate(t, "seq"+suffix, map[string]any{"count": 5000, "batch": 700, "acks": acks})
			if err != nil {
				t.Fatal(err)
			}
			if got := currentProc(t, c).data != nil; got == old {
				t.Fatalf("data channel in use: %v, want %v", got, !old)
			}
			if err := c.(component.Starter).Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			out := &ackingEmitter{}
			if err := c.(component.Source).Run(context.Background(), out); err != nil {
				t.Fatal(err)
			}
			if len(out.events) != 5000 {
				t.Fatalf("got %d events, want 5000", len(out.events))
			}
			for i, e := range out.events {
				if e.SrcPort != uint16(i) {
					t.Fatalf("event %d out of order: %+v", i, e)
				}
			}
			if lines := readLines(t, acks); len(lines) != 8 {
				t.Fatalf("plugin saw %d acknowledgements, want 8: %q", len(lines), lines)
			}
		})
	}
}

// A plugin that writes bytes that are no frame into its data channel is failed and
// restarted, as after a crash; the batch it was writing is redelivered to the new process;
// another plugin of the same host is not touched.
func TestGarbageFrameFailsOnlyThatPlugin(t *testing.T) {
	if pb.DataChannelOff() {
		t.Skip(pb.DataChannelEnv + "=off: the host offers no data channel")
	}
	dir := t.TempDir()
	bad := newFixture(t, component.KindSink, "bad")
	badPath, marker := filepath.Join(dir, "bad.jsonl"), filepath.Join(dir, "garbage-written")
	badC, err := bad.instantiate(t, "jsonl", map[string]any{"path": badPath, "garbage_once": marker})
	if err != nil {
		t.Fatal(err)
	}
	good := newFixture(t, component.KindSink, "good")
	goodPath := filepath.Join(dir, "good.jsonl")
	goodC, err := good.instantiate(t, "jsonl", map[string]any{"path": goodPath})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []any{badC, goodC} {
		if err := c.(component.Starter).Start(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	badPID, goodPID := currentProc(t, badC).pid(), currentProc(t, goodC).pid()
	batch := flow.NewBatch(seqEvents(0, 100), nil)
	err = badC.(component.Sink).Write(context.Background(), batch)
	if err == nil || !strings.Contains(err.Error(), "bad frame") {
		t.Fatalf("Write to the plugin that sent garbage returned %v, want an error about a bad frame", err)
	}
	// The runtime retries the batch: it waits for the restarted process.
	if err := badC.(component.Sink).Write(context.Background(), batch); err != nil {
		t.Fatalf("the batch was not written after the restart: %v", err)
	}
	if p := currentProc(t, badC).pid(); p == badPID {
		t.Fatalf("the plugin that sent garbage (pid %d) was not replaced", badPID)
	}
	if r := bad.metric(t, "flowpipe_plugin_restarts_total"); r != 1 {
		t.Errorf("restarts_total = %v, want 1", r)
	}
	if err := goodC.(component.Sink).Write(context.Background(), flow.NewBatch(seqEvents(0, 100), nil)); err != nil {
		t.Fatal(err)
	}
	if p := currentProc(t, goodC).pid(); p != goodPID {
		t.Fatalf("the other plugin was restarted (pid %d, then %d)", goodPID, p)
	}
	if r := good.metric(t, "flowpipe_plugin_restarts_total"); r != 0 {
		t.Errorf("the other plugin's restarts_total = %v, want 0", r)
	}
	for _, c := range []any{badC, goodC} {
		if err := c.(component.Closer).Close(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	for _, path := range []string{badPath, goodPath} {
		if n := len(readLines(t, path)); n != 100 {
			t.Errorf("%s: %d lines, want the batch's 100", path, n)
		}
	}
	if !strings.Contains(bad.logs.String(), "no frame magic") {
		t.Errorf("the host's log does not say what was wrong with the frame:\n%s", bad.logs.String())
	}
}

// The data channel is an unnamed socketpair: no path, no abstract name, so no other process
// can connect to it; a socket cannot be opened through /proc either; the plugin keeps no
// inheritable copy of it (a child it starts does not get the channel).
func TestDataChannelNotReachable(t *testing.T) {
	if pb.DataChannelOff() {
		t.Skip(pb.DataChannelEnv + "=off: the host offers no data channel")
	}
	f := newFixture(t, component.KindSink, "out")
	c, err := f.instantiate(t, "jsonl", map[string]any{"path": filepath.Join(t.TempDir(), "out.jsonl")})
	if err != nil {
		t.Fatal(err)
	}
	p := currentProc(t, c)
	if p.data == nil {
		t.Fatal("the plugin does not use the data channel")
	}
	raw, err := p.data.fc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var (
		names [2]uint32 // address lengths of the host's end and of its peer
		inode uint64
		serr  error
	)
	_ = raw.Control(func(fd uintptr) {
		for i, call := range []uintptr{unix.SYS_GETSOCKNAME, unix.SYS_GETPEERNAME} {
			var sa unix.RawSockaddrAny
			n := uint32(unsafe.Sizeof(sa))
			if _, _, e := unix.RawSyscall(call, fd, uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n))); e != 0 {
				serr = e
				return
			}
			names[i] = n
		}
		var st unix.Stat_t
		serr = unix.Fstat(int(fd), &st)
		inode = st.Ino
	})
	if serr != nil {
		t.Fatal(serr)
	}
	// An unnamed socket's address is its family alone: no path, no abstract name.
	for i, what := range []string{"host end", "plugin end"} {
		if names[i] != uint32(unsafe.Sizeof(uint16(0))) {
			t.Errorf("%s of the data channel has an address (%d bytes): something could connect to it", what, names[i])
		}
	}
	// /proc/net/unix lists the host's end without a path.
	data, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) >= 7 && fields[6] == strconv.FormatUint(inode, 10) {
			found = true
			if len(fields) > 7 {
				t.Errorf("the data channel is listed with a path: %q", line)
			}
		}
	}
	if !found {
		t.Errorf("socket inode %d not in /proc/net/unix", inode)
	}
	// In the plugin: fd 4 (as inherited) is closed, every socket it holds closes on exec,
	// and none can be opened through /proc.
	pid := p.pid()
	if _, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/4", pid)); err == nil {
		// fd 4 may have been reused by something else the plugin opened since; it must not be
		// the inherited, inheritable channel.
		if flags, ok := fdFlags(t, pid, 4); ok && flags&unix.O_CLOEXEC == 0 {
			t.Errorf("the plugin keeps fd 4 open and inheritable (flags %o)", flags)
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	sockets := 0
	for _, e := range fds {
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if err != nil || !strings.HasPrefix(link, "socket:") {
			continue
		}
		sockets++
		fd, _ := strconv.Atoi(e.Name())
		if flags, ok := fdFlags(t, pid, fd); ok && flags&unix.O_CLOEXEC == 0 {
			t.Errorf("plugin socket fd %d (%s) is inheritable (flags %o)", fd, link, flags)
		}
		if fh, err := os.Open(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); err == nil {
			fh.Close()
			t.Errorf("plugin socket fd %d (%s) could be opened through /proc", fd, link)
		} else if !errors.Is(err, syscall.ENXIO) {
			t.Logf("open /proc/%d/fd/%d: %v", pid, fd, err)
		}
	}
	if sockets == 0 {
		t.Fatal("no sockets found in the plugin process")
	}
}

// fdFlags reads the open flags of a process's descriptor from /proc/pid/fdinfo; ok is false
// when the descriptor was closed meanwhile.
func fdFlags(t *testing.T, pid, fd int) (flags int, ok bool) {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, fd))
	if errors.Is(err, os.ErrNotExist) {
		return 0, false
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
			if err != nil {
				t.Fatal(err)
			}
			return int(n), true
		}
	}
	t.Fatalf("no flags in fdinfo of %d/%d", pid, fd)
	return 0, false
}

// forwardingEmitter writes each batch to a sink, as a pipeline without enrichers does, and
// acknowledges it with the result; change, when set, changes each batch's events first.
type forwardingEmitter struct {
	sink   component.Sink
	change bool
	n      int
}

func (e *forwardingEmitter) Emit(ctx context.Context, b *flow.Batch) error {
	if e.change {
		b.DropEncoded() // as the runtime does before enrichers
		for i := range b.Events {
			b.Events[i].RuleID = "changed"
		}
	}
	e.n += len(b.Events)
	b.Release(e.sink.Write(ctx, b))
	return nil
}

// A batch from a source plugin goes to a sink plugin in the encoding it arrived in, and the
// sink writes exactly the source's events; once something changes the events, they are
// encoded again, with the change.
func TestSourceToSinkPassThrough(t *testing.T) {
	for _, change := range []bool{false, true} {
		t.Run(fmt.Sprintf("change=%v", change), func(t *testing.T) {
			sf := newFixture(t, component.KindSink, "out")
			path := filepath.Join(t.TempDir(), "out.jsonl")
			sc := sf.started(t, "jsonl", map[string]any{"path": path})
			f := newFixture(t, component.KindSource, "seq")
			c := f.started(t, "seq", map[string]any{"count": 3000, "batch": 500})
			before := passedThrough.Load()
			out := &forwardingEmitter{sink: sc.(component.Sink), change: change}
			if err := c.(component.Source).Run(context.Background(), out); err != nil {
				t.Fatal(err)
			}
			passed := passedThrough.Load() - before
			if err := sc.(component.Closer).Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			if want := int64(6); !change && passed != want {
				t.Errorf("%d batches passed through, want %d", passed, want)
			} else if change && passed != 0 {
				t.Errorf("%d changed batches passed through in their old encoding", passed)
			}
			lines := readLines(t, path)
			if len(lines) != 3000 || out.n != 3000 {
				t.Fatalf("%d lines written, %d events emitted, want 3000", len(lines), out.n)
			}
			for i, l := range lines {
				e := testpluginEvent(i)
				if change {
					e.RuleID = "changed"
				}
				if want := string(flow.AppendJSON(nil, &e)); l != want {
					t.Fatalf("line %d:\n got %s\nwant %s", i, l, want)
				}
			}
		})
	}
}

// testpluginEvent is the test plugin's seq source's i-th event (testplugin.Event).
func testpluginEvent(i int) flow.Event {
	var id uuid.UUID
	binary.BigEndian.PutUint64(id[8:], uint64(i))
	return flow.Event{
		EventID: id, FlowID: id, Type: flow.TypeStart, Timestamp: flow.Time(1_700_000_000_000_000_000 + int64(i)),
		SrcAddr: netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), DstAddr: netip.MustParseAddr("192.0.2.1"),
		SrcPort: uint16(i), DstPort: 443, Protocol: flow.ProtoTCP, Direction: flow.Egress, Source: "seq",
	}
}
