package netns

import (
	"net"
	"os/exec"
	"strings"
	"testing"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

func TestOpenErrorsSayWhatIsWrong(t *testing.T) {
	if _, err := Open("flowpipe-no-such-namespace"); err == nil || !strings.Contains(err.Error(), "/run/netns/flowpipe-no-such-namespace") {
		t.Errorf("missing namespace: %v", err)
	}
	if _, err := Open("/etc/hostname"); err == nil || !strings.Contains(err.Error(), "not a namespace") {
		t.Errorf("regular file: %v", err)
	}
	ns, err := Open("")
	if ns != nil || err != nil {
		t.Errorf(`Open("") = %v, %v; want the current namespace (nil)`, ns, err)
	}
}

func TestRunEntersTheNamespace(t *testing.T) {
	testenv.RequireRoot(t)
	p := testenv.NewPair(t)
	var names []string
	err := Run(p.A, func() error {
		ifs, err := net.Interfaces()
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(names, ",") != "lo,"+p.IfA {
		t.Fatalf("interfaces inside %s: %v, want lo and %s", p.A, names, p.IfA)
	}
	// The calling goroutine's thread is still in the original namespace.
	out, _ := exec.Command("ip", "link", "show", p.IfA).CombinedOutput()
	if !strings.Contains(string(out), "does not exist") {
		t.Errorf("%s is visible outside its namespace: %s", p.IfA, out)
	}
}
