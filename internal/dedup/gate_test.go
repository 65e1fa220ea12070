package dedup

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/options"
)

func TestGateAdmitsEachIDOnceAndAgainOnlyAfterAFailedFlight(t *testing.T) {
	dir := t.TempDir()
	resolve := func(p string) string { return filepath.Join(dir, p) }
	now := time.Now()
	g := NewGate(DefaultConfig())
	if err := g.Load("ids.journal", resolve, now); err != nil {
		t.Fatal(err)
	}
	a, b := uuid.New(), uuid.New()
	if !g.Admit(a) || !g.Admit(b) {
		t.Fatal("new IDs not admitted")
	}
	if g.Admit(a) {
		t.Fatal("an ID in flight was admitted again")
	}
	if err := g.Settle([]uuid.UUID{b}, false, now); err != nil {
		t.Fatal(err)
	}
	if !g.Admit(b) {
		t.Fatal("an ID whose batch failed was not admitted on redelivery")
	}
	if err := g.Settle([]uuid.UUID{a, b}, true, now); err != nil {
		t.Fatal(err)
	}
	if g.Admit(a) || g.Admit(b) || g.Remembered() != 2 {
		t.Fatalf("delivered IDs admitted again (remembered %d)", g.Remembered())
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	// The journal carries the delivered IDs over a restart.
	g2 := NewGate(DefaultConfig())
	if err := g2.Load("ids.journal", resolve, now); err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	if g2.Admit(a) || g2.Admit(b) {
		t.Fatal("delivered IDs admitted after a restart")
	}
	if !g2.Admit(uuid.New()) {
		t.Fatal("a new ID was not admitted after a restart")
	}
}

func TestConfigCheckNamesTheKey(t *testing.T) {
	var errs options.FieldErrors
	Config{Window: -time.Second, MaxEvents: -1}.Check(&errs, "dedup")
	got := errs.Error()
	for _, want := range []string{"dedup.window", "dedup.max_events"} {
		if !strings.Contains(got, want) {
			t.Errorf("problems %q do not name %s", got, want)
		}
	}
}
