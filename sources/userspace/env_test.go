package userspace

import (
	"os/exec"
	"testing"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

func requireTool(t testing.TB, name string) {
	t.Helper()
	_, err := exec.LookPath(name)
	testenv.Require(t, err == nil, name+" in PATH")
}
