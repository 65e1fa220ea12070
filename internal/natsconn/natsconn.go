// Package natsconn is what the JetStream sink and source share: the options that say how to
// reach and authenticate to a NATS cluster, and the connection made from them.
package natsconn

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/internal/backoff"
	"github.com/flowpipe/flowpipe/internal/tlsfiles"
)

// Config is how to reach a NATS cluster. Inlined into the sink's and the source's options.
type Config struct {
	// Servers are nats:// (or tls://) URLs of the cluster's servers; the client discovers the
	// others and reconnects to any of them.
	Servers []string `yaml:"servers" required:"true"`

	// At most one way to authenticate.
	CredsFile    string `yaml:"creds_file"`     // a .creds file (user JWT and nkey seed)
	NKeySeedFile string `yaml:"nkey_seed_file"` // a file holding an nkey user seed (SU…)
	User         string `yaml:"user"`
	Password     string `yaml:"password"`
	Token        string `yaml:"token"`

	CAFile     string `yaml:"ca_file"`     // PEM roots to trust (TLS); implies TLS
	CertFile   string `yaml:"cert_file"`   // client certificate for mTLS
	KeyFile    string `yaml:"key_file"`    // its key
	ServerName string `yaml:"server_name"` // TLS name to verify, when not the URL's host

	ConnectTimeout time.Duration `yaml:"connect_timeout"` // per server, at start and on reconnect
	// RequestTimeout bounds a JetStream API request (stream and consumer look-ups, creation).
	RequestTimeout time.Duration `yaml:"request_timeout"`
}

// Defaults fills the timeouts.
func Defaults() Config {
	return Config{ConnectTimeout: 5 * time.Second, RequestTimeout: 10 * time.Second}
}

// Validate adds the problems of c to errs.
func (c *Config) Validate(errs *config.FieldErrors) {
	if len(c.Servers) == 0 {
		errs.Add("servers", "list at least one server, e.g. [nats://nats-1:4222]")
	}
	for i, s := range c.Servers {
		u, err := url.Parse(s)
		if err != nil || u.Host == "" {
			errs.Add(fmt.Sprintf("servers[%d]", i), "%q: want nats://host:port or tls://host:port", s)
			continue
		}
		switch u.Scheme {
		case "nats", "tls", "ws", "wss":
		default:
			errs.Add(fmt.Sprintf("servers[%d]", i), "scheme %q: want nats://, tls://, ws:// or wss://", u.Scheme)
		}
	}
	n := 0
	for _, set := range []bool{c.CredsFile != "", c.NKeySeedFile != "", c.User != "" || c.Password != "", c.Token != ""} {
		if set {
			n++
		}
	}
	if n > 1 {
		errs.Add("creds_file", "set one of creds_file, nkey_seed_file, user/password or token")
	}
	if (c.User == "") != (c.Password == "") {
		errs.Add("user", "user and password go together")
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		errs.Add("cert_file", "cert_file and key_file go together")
	}
	if c.ConnectTimeout <= 0 {
		errs.Add("connect_timeout", "must be positive")
	}
	if c.RequestTimeout <= 0 {
		errs.Add("request_timeout", "must be positive")
	}
}

// Conn is a connection and its JetStream context, with the state /readyz reports.
type Conn struct {
	NC *nats.Conn
	JS jetstream.JetStream

	mu      sync.Mutex
	lastErr error // the last asynchronous error (permissions, slow consumer), cleared on reconnect
}

// Connect connects to the cluster; it fails when no server can be reached or authentication
// is refused, with the server's reason. extra options come last (e.g. JetStream's
// asynchronous publishing window).
func Connect(ctx context.Context, env component.Env, c *Config, jsOpts ...jetstream.JetStreamOpt) (*Conn, error) {
	log := env.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cn := &Conn{}
	opts := []nats.Option{
		nats.Name("flowpipe " + string(env.Kind) + " " + env.Name),
		nats.Timeout(c.ConnectTimeout),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.ReconnectJitter(100*time.Millisecond, time.Second),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("NATS connection lost; reconnecting", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			cn.setErr(nil)
			log.Info("NATS reconnected", "server", nc.ConnectedUrlRedacted())
		}),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			cn.setErr(err)
			log.Warn("NATS error", "err", err)
		}),
	}
	switch {
	case c.CredsFile != "":
		opts = append(opts, nats.UserCredentials(env.Path(c.CredsFile)))
	case c.NKeySeedFile != "":
		o, err := nats.NkeyOptionFromSeed(env.Path(c.NKeySeedFile))
		if err != nil {
			return nil, fmt.Errorf("nkey_seed_file: %w", err)
		}
		opts = append(opts, o)
	case c.User != "":
		opts = append(opts, nats.UserInfo(c.User, c.Password))
	case c.Token != "":
		opts = append(opts, nats.Token(c.Token))
	}
	if c.CAFile != "" || c.CertFile != "" || c.ServerName != "" {
		tc, err := tlsConfig(env, c)
		if err != nil {
			return nil, err
		}
		opts = append(opts, nats.Secure(tc))
	}
	nc, err := nats.Connect(strings.Join(c.Servers, ","), opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS %s: %w%s", strings.Join(c.Servers, ","), err, hint(err))
	}
	js, err := jetstream.New(nc, append([]jetstream.JetStreamOpt{jetstream.WithDefaultTimeout(c.RequestTimeout)}, jsOpts...)...)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("JetStream: %w", err)
	}
	cn.NC, cn.JS = nc, js
	return cn, nil
}

func hint(err error) string {
	switch {
	case errors.Is(err, nats.ErrAuthorization), strings.Contains(strings.ToLower(err.Error()), "authorization"):
		return " (the server refused the credentials: check user/password, token, creds_file or nkey_seed_file)"
	case errors.Is(err, nats.ErrNoServers):
		return " (is the server running and reachable from here?)"
	}
	return ""
}

func (cn *Conn) setErr(err error) {
	cn.mu.Lock()
	cn.lastErr = err
	cn.mu.Unlock()
}

// Health is nil while the connection is up and no asynchronous error was reported since.
func (cn *Conn) Health() error {
	if cn == nil || cn.NC == nil {
		return errors.New("not connected to NATS")
	}
	if st := cn.NC.Status(); st != nats.CONNECTED {
		if err := cn.NC.LastError(); err != nil {
			return fmt.Errorf("NATS connection %s: %v", st, err)
		}
		return fmt.Errorf("NATS connection %s", st)
	}
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.lastErr != nil {
		return fmt.Errorf("NATS: %w", cn.lastErr)
	}
	return nil
}

// Close closes the connection (after Drain where the caller wants it).
func (cn *Conn) Close() {
	if cn != nil && cn.NC != nil {
		cn.NC.Close()
	}
}

func tlsConfig(env component.Env, c *Config) (*tls.Config, error) {
	return tlsfiles.Client(env.Path(c.CAFile), env.Path(c.CertFile), env.Path(c.KeyFile), c.ServerName)
}

// Transient reports whether a JetStream API error is one a cluster gives while it elects a
// leader (a node just died, or the cluster is starting): a timeout, no responders, or 503
// "JetStream system temporarily unavailable".
func Transient(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, jetstream.ErrJetStreamNotEnabled) || (errors.As(err, &apiErr) && apiErr.Code == 503)
}

// Retry runs fn until it succeeds, fails with an error that is not Transient, or budget has
// passed (then the last error is returned); each attempt gets its own timeout.
func Retry(ctx context.Context, log *slog.Logger, what string, timeout, budget time.Duration, fn func(context.Context) error) error {
	deadline := time.Now().Add(budget)
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, timeout)
		err := fn(actx)
		cancel()
		if err == nil || !Transient(err) || time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		if log != nil {
			log.Warn(what+" failed; the cluster may be electing a leader, trying again", "attempt", attempt, "err", err)
		}
		if !backoff.Sleep(ctx, backoff.Policy{Initial: 250 * time.Millisecond, Max: 2 * time.Second}.Delay(attempt)) {
			return err
		}
	}
}
