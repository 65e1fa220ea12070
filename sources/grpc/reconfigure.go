package grpcsource

import (
	"context"
	"crypto/tls"
	"fmt"
	"time"

	"google.golang.org/grpc/metadata"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/flowwire"
)

// A reload gives a running receiver new options through Reconfigure
// (component.Reconfigurer). The listener, the open streams, the events in flight and the
// de-duplication window's remembered IDs are kept; the new options apply to both protocols
// (NetBird's FlowService and the batch stream) at once:
//
//   - auth, secrets and max_token_lifetime decide which new streams are admitted. A stream
//     already open whose token the new secrets do not verify (its secret was removed, or
//     auth went from none to hmac) is closed with UNAUTHENTICATED: a revoked secret must not
//     keep a door open. Its client reconnects with its current token and resends what was
//     not ACKed; the events already delivered are recognised as duplicates, nothing is lost.
//     A stream whose token still verifies stays open, even if the new max_token_lifetime
//     would refuse the token on a new stream.
//   - max_streams, max_unacked_per_stream, max_message_size and max_batch_message_size apply
//     at once to every stream (a lowered max_streams refuses new streams until enough end).
//     The listener's own message limit is fixed when it starts: a size above it needs a
//     restart (below).
//   - initiator_timeout and idle_timeout apply to streams opened after the change.
//   - batch_size and batch_delay apply to the next batch; dedup.window and dedup.max_events
//     resize the window and keep the IDs it remembers (those beyond the new bounds are
//     forgotten).
//   - cert_file, key_file and client_ca_file are read again and serve the next TLS
//     handshakes; connections already open keep their session.
//   - listen, the keepalive options, turning TLS on or off, dedup.state_file and turning
//     de-duplication on or off return an error wrapping component.ErrRestartNeeded: the
//     runtime then starts a new receiver before it stops this one, which works for a new
//     listen address (on the same address the new one cannot bind, the reload reports it and
//     this receiver goes on with its old options).

// settings are the options in force, swapped whole by a reload.
type settings struct {
	cfg     *Config
	secrets [][]byte
}

func newSettings(c *Config) *settings {
	s := &settings{cfg: c}
	for _, k := range c.Secrets {
		s.secrets = append(s.secrets, []byte(k))
	}
	return s
}

func (r *Receiver) conf() *Config { return r.live.Load().cfg }

const revokedMessage = "the stream's token is no longer accepted: a reload removed its secret; reconnect with a current token"

// authorization is a stream's authorization header.
func authorization(ctx context.Context) string {
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get("authorization"); len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

// accepts tells whether the options in s would still have admitted st: its token checked
// against s's secrets as of its admission (so that a token expiring after it does not count).
func (r *Receiver) accepts(s *settings, st *stream) bool {
	if s.cfg.Auth != "hmac" {
		return true
	}
	return flowwire.VerifyAuthorizationLimits(st.token, s.secrets, st.admitted, 0).Err == nil
}

func (r *Receiver) track(st *stream) {
	r.openMu.Lock()
	r.tracked[st] = struct{}{}
	r.openMu.Unlock()
}

func (r *Receiver) untrack(st *stream) {
	r.openMu.Lock()
	delete(r.tracked, st)
	r.openMu.Unlock()
}

// restartKeys are the options a running receiver cannot change in place.
func (r *Receiver) restartKeys(old, c *Config) []string {
	var keys []string
	if old.Listen != c.Listen {
		keys = append(keys, "listen")
	}
	if old.KeepaliveTime != c.KeepaliveTime {
		keys = append(keys, "keepalive_time")
	}
	if old.KeepaliveTimeout != c.KeepaliveTimeout {
		keys = append(keys, "keepalive_timeout")
	}
	if old.KeepaliveMinTime != c.KeepaliveMinTime {
		keys = append(keys, "keepalive_min_time")
	}
	if (old.CertFile == "") != (c.CertFile == "") {
		keys = append(keys, "cert_file")
	}
	if old.Dedup.StateFile != c.Dedup.StateFile {
		keys = append(keys, "dedup.state_file")
	}
	on := func(c *Config) bool { return c.Dedup.Window > 0 && c.Dedup.MaxEvents > 0 }
	if on(old) != on(c) {
		keys = append(keys, "dedup.window")
	}
	if r.lis != nil {
		if int(c.MaxMessageSize) > r.maxRecv {
			keys = append(keys, "max_message_size")
		}
		if int(c.MaxBatchMessageSize) > r.maxRecv {
			keys = append(keys, "max_batch_message_size")
		}
	}
	return keys
}

// Reconfigure decodes and checks options as the factory does and applies them to the running
// receiver (see above). When it returns an error, nothing changed.
func (r *Receiver) Reconfigure(ctx context.Context, raw map[string]any) error {
	c := defaultConfig()
	if errs := options.Check(raw, c, ""); len(errs) > 0 {
		return errs
	}
	r.reconfMu.Lock()
	defer r.reconfMu.Unlock()
	old := r.conf()
	// r.lis is set once by Start, which runs before the runtime reconfigures.
	if keys := r.restartKeys(old, c); len(keys) > 0 {
		return fmt.Errorf("grpc source %s: %v changed, which needs a new listener: %w", r.env.Name, keys, component.ErrRestartNeeded)
	}
	var tc *tls.Config
	if c.CertFile != "" {
		var err error
		if tc, err = serverTLS(r.env, c); err != nil {
			return fmt.Errorf("grpc source %s: %w", r.env.Name, err)
		}
	}
	s := newSettings(c)

	// The swap happens under the collector's lock, so that an event is checked against one
	// window, and the window is trimmed to its new bounds at once.
	r.coll.mu.Lock()
	r.live.Store(s)
	var werr error
	if r.coll.dedupOn() {
		werr = r.coll.win.SetBounds(c.Dedup.Window, c.Dedup.MaxEvents, time.Now())
	}
	r.coll.mu.Unlock()
	if werr != nil {
		r.env.Metrics.Errors("dedup_state", 1)
		r.log.Error("dedup state file not compacted", "err", werr)
	}
	if tc != nil {
		r.tlsConf.Store(tc)
	}

	closed := 0
	r.openMu.Lock()
	for st := range r.tracked {
		if !r.accepts(s, st) {
			st.kickOnce.Do(func() { close(st.kick) })
			closed++
		}
	}
	r.openMu.Unlock()
	r.log.Info("grpc source reconfigured", "auth", c.Auth, "secrets", len(c.Secrets), "streams_closed", closed)
	return nil
}
