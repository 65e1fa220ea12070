// Package testenv holds what flowpipe's tests share about their environment: whether they
// may need root, and network namespaces with veth pairs for tests that send real packets.
package testenv

import (
	"os"
	"testing"
)

// RequireRootEnv, when set to 1 (as .ci/run does), turns the skip of a test that needs root
// into a failure, so that CI cannot pass by skipping the tests that matter.
const RequireRootEnv = "FLOWPIPE_TEST_REQUIRE_ROOT"

// RequireRoot skips t when the process is not root, or fails it when RequireRootEnv is 1.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv(RequireRootEnv) == "1" {
		t.Fatalf("this test needs root (network namespaces, netlink) and %s=1 forbids skipping it", RequireRootEnv)
	}
	t.Skip("skipped: this test needs root (network namespaces, netlink); run the tests as root, e.g. sudo go test ./...")
}

// Require fails or skips t (as RequireRoot does) when cond is false; what names the missing
// prerequisite, e.g. "tcpdump in PATH".
func Require(t testing.TB, cond bool, what string) {
	t.Helper()
	if cond {
		return
	}
	if os.Getenv(RequireRootEnv) == "1" {
		t.Fatalf("missing prerequisite: %s (and %s=1 forbids skipping)", what, RequireRootEnv)
	}
	t.Skipf("skipped: missing prerequisite: %s", what)
}
