package backoff

import (
	"context"
	"testing"
	"time"
)

// Delays double from Initial, stop growing at Max, and stay within the jitter.
func TestDelayDoublesUpToMaxWithinJitter(t *testing.T) {
	p := Policy{Initial: 100 * time.Millisecond, Max: time.Second}
	for attempt, base := range map[int]time.Duration{1: 100 * time.Millisecond, 2: 200 * time.Millisecond, 4: 800 * time.Millisecond, 5: time.Second, 50: time.Second} {
		lo, hi := time.Duration(float64(base)*(1-Jitter)), time.Duration(float64(base)*(1+Jitter))
		for range 100 {
			if d := p.Delay(attempt); d < lo || d > hi {
				t.Fatalf("attempt %d: %s, want %s..%s", attempt, d, lo, hi)
			}
		}
	}
}

func TestBackoffCountsAndResets(t *testing.T) {
	b := Backoff{Policy: Policy{Initial: time.Second, Max: time.Minute}}
	b.Next()
	b.Next()
	if b.Failures() != 2 {
		t.Fatalf("failures = %d", b.Failures())
	}
	b.Reset()
	if d := b.Next(); d > time.Duration(float64(time.Second)*(1+Jitter)) {
		t.Fatalf("after Reset the first delay is %s", d)
	}
}

func TestSleepStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Sleep(ctx, time.Hour) {
		t.Fatal("Sleep waited out an hour with a cancelled context")
	}
	if !Sleep(context.Background(), time.Millisecond) {
		t.Fatal("Sleep did not finish its wait")
	}
}
