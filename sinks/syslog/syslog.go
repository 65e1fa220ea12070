// Package syslog is the syslog sink (`type: syslog`): one RFC 5424 message per event, to a
// syslog server or SIEM over TCP with octet-counting framing (RFC 6587), TLS (RFC 5425) or
// UDP (RFC 5426). The event travels as structured data (flowpipe's keys as SD-PARAMs, a
// short text as MSG) or as a JSON MSG in the flowpipe, ECS or OCSF schema.
//
// Syslog has no acknowledgement: over TCP and TLS a batch is accepted once the kernel took
// all of it (a connection the server closed is noticed and replaced before the next batch,
// and a batch cut off is sent again whole on a new connection, so a server may see some
// messages twice); over UDP once every datagram was sent, and what the network loses is
// lost. A failed write is retried by the runtime with backoff, reconnecting each time.
package syslog

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/schema"
	"github.com/flowpipe/flowpipe/internal/netout"
)

// Factory returns the syslog sink's factory.
func Factory() component.Factory {
	return component.NewSinkFactory("syslog", "RFC 5424 syslog over TCP (octet counting), TLS or UDP; structured data or JSON (flowpipe, ECS, OCSF)",
		defaults, func(env component.Env, c *Config) (component.Sink, error) { return New(env, c) })
}

// Sink writes batches as syslog messages; writes are serialised.
type Sink struct {
	cfg    Config
	env    component.Env
	conn   *netout.Conn
	hdr    header
	format schema.Format
	stream bool

	mu   sync.Mutex
	msg  []byte
	buf  []byte
	ends []int
	dgs  [][]byte

	messages prometheus.Counter
}

// New builds the sink; it connects in Start.
func New(env component.Env, c *Config) (*Sink, error) {
	s := &Sink{cfg: *c, env: env, stream: c.Transport != "udp"}
	s.format, _ = schema.Parse(c.Format)
	fac, _ := code(c.Facility, facilities)
	sev, _ := code(c.Severity, severities)
	host := c.Hostname
	if host == "" {
		host = "-"
	}
	s.hdr = header{
		pri:    []byte("<" + strconv.Itoa(fac*8+sev) + ">1 "),
		middle: []byte(" " + host + " " + c.AppName + " " + strconv.Itoa(os.Getpid()) + " "),
		sdID:   c.SDID,
		json:   c.Body == "json",
	}
	conn, err := c.Options.Conn(env.Path)
	if err != nil {
		return nil, err
	}
	s.conn = conn
	s.messages = prometheus.NewCounter(prometheus.CounterOpts{Name: "flowpipe_syslog_messages_total", Help: "Syslog messages written."})
	if err := env.Register(s.messages); err != nil {
		return nil, err
	}
	return s, nil
}

// Start connects. A server that cannot be reached yet is not an error: the first Write
// connects, and the runtime retries it until it can.
func (s *Sink) Start(ctx context.Context) error {
	if _, err := s.conn.Ensure(ctx); err != nil {
		s.env.Metrics.Errors("syslog_connect", 1)
		s.env.Logger.Warn("syslog server not reachable yet; will retry with the first batch", "address", s.cfg.Address, "error", err)
	}
	return nil
}

// Write sends one message per event; see the package comment for when that counts as
// accepted.
func (s *Sink) Write(ctx context.Context, b *flow.Batch) error {
	if len(b.Events) == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.conn.Ensure(ctx); err != nil {
		s.env.Metrics.Errors("syslog_connect", 1)
		return err
	}
	enc := schema.Encoder{Format: s.format}
	var te flow.Encoder
	s.buf, s.ends = s.buf[:0], s.ends[:0]
	for i := range b.Events {
		if !s.stream {
			s.buf = s.hdr.appendMessage(s.buf, &enc, &te, &b.Events[i])
			s.ends = append(s.ends, len(s.buf))
			continue
		}
		// Octet counting (RFC 6587 section 3.4.1, RFC 5425 section 4.3): MSG-LEN SP MSG.
		s.msg = s.hdr.appendMessage(s.msg[:0], &enc, &te, &b.Events[i])
		s.buf = strconv.AppendInt(s.buf, int64(len(s.msg)), 10)
		s.buf = append(s.buf, ' ')
		s.buf = append(s.buf, s.msg...)
	}
	var err error
	if s.stream {
		err = s.conn.Write(ctx, s.buf)
	} else {
		s.dgs = s.dgs[:0]
		start := 0
		for _, end := range s.ends {
			s.dgs = append(s.dgs, s.buf[start:end])
			start = end
		}
		err = s.conn.Write(ctx, s.dgs...)
	}
	if err != nil {
		s.env.Metrics.Errors("syslog_write", 1)
		return err
	}
	s.messages.Add(float64(len(b.Events)))
	return nil
}

// Close closes the connection.
func (s *Sink) Close(context.Context) error { return s.conn.Close() }

// String names the sink in errors.
func (s *Sink) String() string { return fmt.Sprintf("syslog %s://%s", s.cfg.Transport, s.cfg.Address) }
