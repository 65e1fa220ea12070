package privilege

import (
	"os/exec"
	"testing"
)

// BenchmarkStart is what the launcher adds to starting a plugin process: /bin/true started
// directly, and through Wrap (one more exec, of the host binary, which then drops privileges).
func BenchmarkStart(b *testing.B) {
	b.Run("direct", func(b *testing.B) {
		for b.Loop() {
			if err := exec.Command("/bin/true").Run(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("launcher", func(b *testing.B) {
		for b.Loop() {
			cmd := exec.Command("/bin/true")
			if err := Wrap(cmd, Spec{Caps: []string{"CAP_NET_ADMIN"}}, nil); err != nil {
				b.Fatal(err)
			}
			if err := cmd.Run(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
