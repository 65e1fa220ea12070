package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// verifyUnit runs systemd-analyze verify on a unit file and fails t on any complaint: it
// exits 0 on unknown keys and only prints them.
func verifyUnit(t *testing.T, unit string) {
	t.Helper()
	_, err := exec.LookPath("systemd-analyze")
	testenv.Require(t, err == nil, "systemd-analyze in PATH (Debian package systemd)")
	out, err := exec.Command("systemd-analyze", "verify", unit).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unit, err, out)
	}
}

func TestServiceUnitVerifies(t *testing.T) {
	data, err := os.ReadFile("../../packaging/flowpipe.service")
	if err != nil {
		t.Fatal(err)
	}
	// verify checks that every Exec*= binary exists: point them at the binary under test
	// (the package test verifies the installed unit as it is).
	unit := filepath.Join(t.TempDir(), "flowpipe.service")
	writeFile(t, unit, strings.ReplaceAll(string(data), "/usr/bin/flowpipe", binary))
	verifyUnit(t, unit)
	for _, want := range []string{"Type=notify", "ExecReload=/usr/bin/flowpipe reload --hup-pid $MAINPID", "StateDirectory=flowpipe",
		"ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes", "Restart=on-failure",
		"Environment=FLOWPIPE_CONFIG=/etc/flowpipe/pipeline.yaml", "WatchdogSec="} {
		if !strings.Contains(string(data), "\n"+want) {
			t.Errorf("unit lacks %s", want)
		}
	}
}

// fakeNotifySocket listens where systemd would ($NOTIFY_SOCKET) and returns every datagram
// received, one state per element, on the channel. A fake because systemd is not PID 1 here;
// the datagrams are what sd_notify(3) specifies.
func fakeNotifySocket(t *testing.T, abstract bool) (string, <-chan string) {
	t.Helper()
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	name := filepath.Join(t.TempDir(), "notify")
	if abstract {
		name = "@flowpipe-test-" + hex.EncodeToString(rnd[:])
	}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ch := make(chan string, 1024)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(ch)
				return
			}
			for _, s := range strings.Split(strings.TrimSpace(string(buf[:n])), "\n") {
				ch <- s
			}
		}
	}()
	return name, ch
}

// waitState reads states until want arrives, returning those seen before it.
func waitState(t *testing.T, ch <-chan string, want string) []string {
	t.Helper()
	var seen []string
	timeout := time.After(60 * time.Second)
	for {
		select {
		case s, ok := <-ch:
			if !ok {
				t.Fatalf("notify socket closed before %s (saw %v)", want, seen)
			}
			if s == want {
				return seen
			}
			seen = append(seen, s)
		case <-timeout:
			t.Fatalf("no %s from flowpipe (saw %v)", want, seen)
		}
	}
}

func TestRunNotifiesSystemd(t *testing.T) {
	for _, abstract := range []bool{false, true} {
		t.Run(fmt.Sprintf("abstract=%v", abstract), func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, "pipeline.yaml"), generateToFile)
			sock, states := fakeNotifySocket(t, abstract)
			// stderr is a file whose device and inode are in $JOURNAL_STREAM, as systemd does
			// for a service whose output goes to the journal.
			logf, err := os.Create(filepath.Join(dir, "stderr"))
			if err != nil {
				t.Fatal(err)
			}
			defer logf.Close()
			var st syscall.Stat_t
			if err := syscall.Fstat(int(logf.Fd()), &st); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(binary, "run")
			cmd.Dir = dir
			cmd.Stderr = logf
			cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=200000",
				fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino))
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Process.Kill()

			before := waitState(t, states, "READY=1")
			if len(before) != 0 {
				t.Errorf("states before READY=1: %v", before)
			}
			// READY=1 means the pipeline runs: events reach the sink.
			eventually(t, "events in flows.jsonl", func() bool {
				st, err := os.Stat(filepath.Join(dir, "flows.jsonl"))
				return err == nil && st.Size() > 0
			})
			waitState(t, states, "WATCHDOG=1")
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			waitState(t, states, "STOPPING=1")
			if err := cmd.Wait(); err != nil {
				t.Fatalf("flowpipe exited with %v", err)
			}
			logs, _ := os.ReadFile(filepath.Join(dir, "stderr"))
			lines := strings.Split(strings.TrimSpace(string(logs)), "\n")
			if len(lines) < 2 {
				t.Fatalf("too few log lines:\n%s", logs)
			}
			for _, l := range lines {
				if !strings.HasPrefix(l, "<") || strings.Contains(l, "time=") || strings.Contains(l, "level=") {
					t.Errorf("not a journal line (priority prefix, no time or level): %s", l)
				}
			}
			if !strings.Contains(string(logs), "<6>msg=\"pipeline running\"") {
				t.Errorf("no info-priority \"pipeline running\" line:\n%s", logs)
			}
		})
	}
}

func TestRunLogsTimestampsOutsideTheJournal(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), "admin: {listen: \"\"}\nsources: {g: {type: generate, count: 10}}\nsinks: {o: {type: discard}}\n")
	// A JOURNAL_STREAM that is not our stderr (inherited by a shell started from a unit)
	// changes nothing.
	cmd := exec.Command(binary, "run")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "JOURNAL_STREAM=1:1", "NOTIFY_SOCKET=")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("run: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "time=") || strings.HasPrefix(string(out), "<") {
		t.Errorf("want ordinary text logs with timestamps:\n%s", out)
	}
}

func TestVersion(t *testing.T) {
	out, _, code := flowpipe(t, t.TempDir(), "version")
	if code != 0 || !strings.HasPrefix(out, "flowpipe devel") {
		t.Errorf("version of a plain build (exit %d): %q, want flowpipe devel...", code, out)
	}
	// A build from a git clone (not a worktree: Go stamps only a .git directory) carries
	// the commit: devel+<12 digits>.
	if info, err := exec.Command("go", "version", "-m", binary).Output(); err == nil {
		for _, l := range strings.Split(string(info), "\n") {
			if rev, ok := strings.CutPrefix(strings.TrimSpace(l), "build\tvcs.revision="); ok {
				if want := "flowpipe devel+" + rev[:12]; !strings.HasPrefix(out, want) {
					t.Errorf("version %q, want %s...", out, want)
				}
			}
		}
	}
	// What scripts/release.sh stamps.
	bin := filepath.Join(t.TempDir(), "flowpipe")
	ld := "-X main.version=v9.8.7 -X main.commit=0123456789abcdef0123456789abcdef01234567 -X main.date=2026-01-02T03:04:05Z"
	if out, err := exec.Command("go", "build", "-ldflags", ld, "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	got, err := exec.Command(bin, "version").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"flowpipe v9.8.7\n", "commit:  0123456789abcdef0123456789abcdef01234567\n", "date:    2026-01-02T03:04:05Z\n"} {
		if !strings.Contains(string(got), want) {
			t.Errorf("stamped version lacks %q:\n%s", want, got)
		}
	}
}
