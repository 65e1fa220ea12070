package grpcsink

import (
	"context"
	"sync"
	"time"

	"github.com/flowpipe/flowpipe/internal/flowwire"
)

// tokenSource puts the authorization metadata on every stream the sink opens. With an
// hmac_secret it mints tokens valid for token_ttl and renews one once half its life is gone,
// so a reconnect never presents an expired token.
type tokenSource struct {
	fixed  string
	secret []byte
	ttl    time.Duration

	mu      sync.Mutex
	current string
	renewAt time.Time
}

func newTokenSource(c *Config) (*tokenSource, error) {
	switch {
	case c.Token != nil:
		return &tokenSource{fixed: flowwire.Token{Payload: c.Token.Payload, Signature: c.Token.Signature}.Authorization()}, nil
	case c.HMACSecret != "":
		return &tokenSource{secret: []byte(c.HMACSecret), ttl: c.TokenTTL}, nil
	}
	return nil, nil
}

func (t *tokenSource) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": t.value(time.Now())}, nil
}

func (t *tokenSource) value(now time.Time) string {
	if t.fixed != "" {
		return t.fixed
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.current == "" || !now.Before(t.renewAt) {
		t.current = flowwire.MintToken(t.secret, now.Add(t.ttl)).Authorization()
		t.renewAt = now.Add(t.ttl / 2)
	}
	return t.current
}

// RequireTransportSecurity is false: like NetBird's client, the sink may talk plain text to a
// collector on a trusted network (an http:// URL is the operator's explicit choice).
func (*tokenSource) RequireTransportSecurity() bool { return false }
