// Package backoff is flowpipe's one retry policy: exponential backoff, doubling from an
// initial delay up to a maximum, each delay spread by a jitter so that many agents (or many
// plugins) failing at once do not retry in step. The runtime's sink retries, plugin
// restarts, the gRPC sink's reconnects and the conntrack reader's reopens all use it.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Jitter is the spread of every delay: ±20 %.
const Jitter = 0.2

// Multiplier is how much each delay grows over the one before.
const Multiplier = 2

// Policy is a backoff from Initial to Max.
type Policy struct {
	Initial time.Duration
	Max     time.Duration
}

// Delay is the wait before retry number attempt (from 1): Initial·2^(attempt-1), at most
// Max, spread by ±Jitter.
func (p Policy) Delay(attempt int) time.Duration {
	d := p.Initial
	for i := 1; i < attempt && d < p.Max; i++ {
		d *= Multiplier
	}
	if p.Max > 0 {
		d = min(d, p.Max)
	}
	return time.Duration(float64(d) * (1 - Jitter + 2*Jitter*rand.Float64()))
}

// Backoff counts consecutive failures under a policy.
type Backoff struct {
	Policy
	failures int
}

// Next counts one more failure and returns the wait before the next attempt.
func (b *Backoff) Next() time.Duration {
	b.failures++
	return b.Delay(b.failures)
}

// Reset starts over after a success.
func (b *Backoff) Reset() { b.failures = 0 }

// Failures is the number of consecutive failures counted since the last Reset.
func (b *Backoff) Failures() int { return b.failures }

// Sleep waits d, or until ctx is done; it reports whether the full wait passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// FailingAfter is how many consecutive failures make a component report itself unhealthy
// (/readyz): a sink whose writes keep failing, a plugin that keeps crashing.
const FailingAfter = 3
