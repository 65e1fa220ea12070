package privilege

import (
	"errors"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

func TestLaunchDropsToDeclaredCapabilitiesAndUser(t *testing.T) {
	testenv.RequireRoot(t)
	nobody, err := user.Lookup("nobody")
	testenv.Require(t, err == nil, "a user nobody")
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	for _, tc := range []struct {
		name string
		spec Spec
		uid  int
		caps Set
	}{
		{"no capabilities, as root", Spec{}, 0, 0},
		{"net_admin as nobody", Spec{Caps: []string{"CAP_NET_ADMIN"}, User: &User{Name: "nobody", UID: uid, GID: gid}}, uid, 1 << 12},
		{"net_raw+net_admin as root", Spec{Caps: []string{"CAP_NET_RAW", "CAP_NET_ADMIN"}}, 0, 1<<12 | 1<<13},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command("/bin/cat", "/proc/self/status")
			if err := Wrap(cmd, tc.spec, nil); err != nil {
				t.Fatal(err)
			}
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			st, err := parseStatus(strings.NewReader(string(out)))
			if err != nil {
				t.Fatal(err)
			}
			want := Status{CapEff: tc.caps, CapPrm: tc.caps, CapInh: tc.caps, CapBnd: tc.caps, CapAmb: tc.caps, NoNewPrivs: true, UID: tc.uid, GID: 0}
			if tc.spec.User != nil {
				want.GID = gid
			}
			if tc.uid == 0 {
				want.CapAmb = tc.caps // root: ambient is raised all the same
			}
			if st != want {
				t.Errorf("status\n got %+v\nwant %+v", st, want)
			}
		})
	}
}

func TestLaunchRefusesAChangedBinary(t *testing.T) {
	cmd := exec.Command("/bin/true")
	if err := Wrap(cmd, Spec{}, make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "/bin/true has SHA-256") || !strings.Contains(string(out), "refusing to start it") {
		t.Fatalf("want a refusal naming the checksum, got %v: %s", err, out)
	}
}

func TestExplainNamesTheMissingCapability(t *testing.T) {
	eff, _, err := Current()
	if err != nil {
		t.Fatal(err)
	}
	if eff.Has(12) {
		// Drop CAP_NET_ADMIN in a child: run this test's binary without it.
		if os.Getenv("EXPLAIN_CHILD") == "" {
			cmd := exec.Command(os.Args[0], "-test.run=^TestExplainNamesTheMissingCapability$")
			cmd.Env = append(os.Environ(), "EXPLAIN_CHILD=1")
			if err := Wrap(cmd, Spec{Caps: []string{"CAP_NET_RAW"}}, nil); err != nil {
				t.Fatal(err)
			}
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			return
		}
		t.Fatal("child still has CAP_NET_ADMIN")
	}
	err = Explain(&os.SyscallError{Syscall: "socket", Err: syscall.EPERM}, []string{"CAP_NET_ADMIN", "CAP_NET_RAW"})
	msg := err.Error()
	missing := Set(1<<12|1<<13) &^ eff
	if !errors.Is(err, syscall.EPERM) || !strings.Contains(msg, "needs "+missing.String()+", which") ||
		!strings.Contains(msg, "AmbientCapabilities="+strings.Join(missing.Names(), " ")) {
		t.Errorf("explanation: %v", err)
	}
	if other := errors.New("boom"); Explain(other, []string{"CAP_NET_ADMIN"}) != other {
		t.Error("a non-permission error changed")
	}
}
