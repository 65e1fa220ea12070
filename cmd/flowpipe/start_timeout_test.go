package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestValidateBlamesThePluginThatHangsStartUp: a plugin that prints a valid handshake to an
// address where nobody answers makes `flowpipe validate` fail within process.start_timeout,
// at the line of that plugin, and not of the healthy source started beside it.
func TestValidateBlamesThePluginThatHangsStartUp(t *testing.T) {
	dir, err := os.MkdirTemp("", "fp-validate") // short: it holds a Unix socket
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	deaf := filepath.Join(dir, "deaf.sock")
	lis, err := net.Listen("unix", deaf) // never accepts
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	writeFile(t, filepath.Join(dir, "flowpipe-sink-deaf"), "#!/bin/sh\necho '1|1|unix|"+deaf+"|grpc|'\nexec sleep 3600\n")
	if err := os.Chmod(filepath.Join(dir, "flowpipe-sink-deaf"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "pipeline.yaml"), `admin: {listen: ""}
sources:
  gen: {type: generate}
sinks:
  out:
    plugin: ./flowpipe-sink-deaf
    process: {start_timeout: 1s}
`)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, "validate")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("validate still running after a minute with start_timeout: 1s:\n%s", out)
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("validate: %v, want exit code 1:\n%s", err, out)
	}
	var problems []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "pipeline.yaml:") {
			problems = append(problems, l)
		}
	}
	if len(problems) != 1 || !strings.Contains(problems[0], "pipeline.yaml:5: sinks.out:") || !strings.Contains(problems[0], "process.start_timeout") {
		t.Fatalf("want one problem, at sinks.out, about process.start_timeout; got:\n%s", strings.Join(problems, "\n"))
	}
}
