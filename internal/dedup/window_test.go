package dedup

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/google/uuid"
)

func TestWindowSurvivesRestartAndForgetsByAgeAndCount(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ids")
	now := time.Now()
	w := NewWindow(time.Minute, 3)
	if err := w.Load(path, now); err != nil {
		t.Fatal(err)
	}
	a, b, c, d := uuid.New(), uuid.New(), uuid.New(), uuid.New()
	if err := w.Add([]uuid.UUID{a, b}, now.Add(-2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := w.Add([]uuid.UUID{c, d}, now); err != nil {
		t.Fatal(err)
	}
	if w.Has(a) || w.Has(b) || !w.Has(c) || !w.Has(d) {
		t.Fatalf("after expiry: a %v b %v c %v d %v", w.Has(a), w.Has(b), w.Has(c), w.Has(d))
	}
	w.Close()

	w2 := NewWindow(time.Minute, 3)
	if err := w2.Load(path, now); err != nil {
		t.Fatal(err)
	}
	if !w2.Has(c) || !w2.Has(d) || w2.Has(a) {
		t.Fatal("the journal did not restore the IDs inside the window")
	}
	e, f := uuid.New(), uuid.New()
	w2.Add([]uuid.UUID{e, f}, now)
	if w2.Len() != 3 || w2.Has(c) {
		t.Fatalf("count bound: %d IDs, oldest kept %v", w2.Len(), w2.Has(c))
	}
	w2.Close()
}
