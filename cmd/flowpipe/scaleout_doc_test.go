package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"
)

// TestScaleOutExamplesValidate runs `flowpipe validate` on every pipeline example of
// docs/scale-out.md (the yaml blocks that start with "# name.yaml").
func TestScaleOutExamplesValidate(t *testing.T) {
	doc, err := os.ReadFile("../../docs/scale-out.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```yaml\n# ([a-z-]+\\.yaml)\n(.*?)```").FindAllSubmatch(doc, -1)
	if len(blocks) < 4 {
		t.Fatalf("%d examples found in docs/scale-out.md, want 4", len(blocks))
	}
	for _, b := range blocks {
		name := string(b[1])
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, name), string(b[2]))
			cmd := exec.Command(binary, "validate", "-c", name)
			cmd.Dir = dir
			cmd.Env = append(os.Environ(), "FLOW_SECRET=0123456789abcdef0123", "KAFKA_PASSWORD=secret")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("flowpipe validate %s: %v\n%s", name, err, out)
			}
		})
	}
}
