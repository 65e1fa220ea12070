// Package ipfix is the IPFIX exporter sink (`type: ipfix`): flow records per RFC 7011 to a
// collector over UDP, TCP or TLS, as biflows (RFC 5103) with 64-bit counters, millisecond
// times, ICMP type and code, flow direction and, optionally, the rule and resource IDs as
// enterprise-specific elements. docs/configuration.md lists the templates and elements.
//
// IPFIX has no acknowledgement. Over TCP and TLS a batch is accepted once the kernel took all
// of it (a connection the collector closed is noticed and replaced before the next batch,
// and a batch cut off by a failing connection is sent again whole on the next one); over UDP
// a batch is accepted once it was sent, and a datagram the network or the collector loses is
// lost: prefer TCP or TLS where that matters.
package ipfix

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/netout"
)

// Factory returns the IPFIX sink's factory.
func Factory() component.Factory {
	f := component.NewSinkFactory("ipfix", "IPFIX (RFC 7011) export to a collector over UDP, TCP or TLS; biflows, 64-bit counters",
		defaults, func(env component.Env, c *Config) (component.Sink, error) { return New(env, c) })
	f.Reasons.Dropped = []string{"ipfix_no_address", "ipfix_record_too_large"}
	f.Reasons.Filtered = []string{"ipfix_event_type"}
	return f
}

// Sink exports batches as IPFIX messages. Writes are serialised: one transport session, one
// sequence of records.
type Sink struct {
	cfg    Config
	env    component.Env
	conn   *netout.Conn
	types  [8]bool
	tmpls  []template
	stream bool // tcp or tls

	mu       sync.Mutex // the packer, the sequence number and the template timer
	pk       packer
	seq      uint32
	lastTmpl time.Time
	msgs     [][]byte

	stop chan struct{}
	done chan struct{}

	records, messages, templateSends prometheus.Counter
}

// New builds the sink; it connects in Start.
func New(env component.Env, c *Config) (*Sink, error) {
	s := &Sink{cfg: *c, env: env, tmpls: templates(c.EnterpriseNumber), stream: c.Transport != "udp",
		stop: make(chan struct{})}
	s.types, _ = parseEvents(c.Events)
	conn, err := c.Options.Conn(env.Path)
	if err != nil {
		return nil, err
	}
	s.conn = conn
	s.pk = packer{max: maxMessageSize, domain: c.ObservationDomainID, seq: &s.seq, tmpls: s.tmpls}
	if !s.stream {
		// The largest UDP payload in one IP packet of mtu bytes, with room for an IPv6 header.
		s.pk.max = c.MTU - 40 - 8
	}
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: "flowpipe_ipfix_" + name, Help: help})
	}
	s.records = counter("records_total", "IPFIX data records written.")
	s.messages = counter("messages_total", "IPFIX messages written.")
	s.templateSends = counter("template_sends_total", "Times the templates were sent (connect, UDP refresh).")
	if err := env.Register(s.records, s.messages, s.templateSends); err != nil {
		return nil, err
	}
	return s, nil
}

// Start connects and sends the templates. A collector that cannot be reached yet is not an
// error: the first Write connects, and the runtime retries it until it can.
func (s *Sink) Start(ctx context.Context) error {
	s.mu.Lock()
	if err := s.sendLocked(ctx, nil); err != nil {
		s.env.Logger.Warn("IPFIX collector not reachable yet; will retry with the first batch", "address", s.cfg.Address, "error", err)
	}
	s.mu.Unlock()
	if !s.stream {
		s.done = make(chan struct{})
		go s.refresh()
	}
	return nil
}

// refresh re-sends the templates over UDP, where a collector that restarted or lost a
// datagram has no other way to learn them.
func (s *Sink) refresh() {
	defer close(s.done)
	t := time.NewTicker(s.cfg.TemplateRefresh / 4)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		if time.Since(s.lastTmpl) >= s.cfg.TemplateRefresh {
			ctx, cancel := context.WithTimeout(context.Background(), s.cfg.WriteTimeout)
			if err := s.sendLocked(ctx, nil); err != nil {
				s.env.Metrics.Errors("ipfix_templates", 1)
				s.env.Logger.Warn("cannot re-send IPFIX templates", "address", s.cfg.Address, "error", err)
			}
			cancel()
		}
		s.mu.Unlock()
	}
}

// Write sends the batch's records; see the package comment for when that counts as accepted.
func (s *Sink) Write(ctx context.Context, b *flow.Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sendLocked(ctx, b.Events)
}

// sendLocked packs events (none: templates only) into messages and writes them, preceded by
// the templates on a new connection or when the UDP refresh is due.
func (s *Sink) sendLocked(ctx context.Context, events []flow.Event) error {
	fresh, err := s.conn.Ensure(ctx)
	if err != nil {
		s.env.Metrics.Errors("ipfix_connect", 1)
		return err
	}
	if fresh && s.stream {
		s.seq = 0 // a new transport session
	}
	seq := s.seq
	s.pk.reset(s.pk.buf)
	s.pk.now = uint32(time.Now().Unix())
	withTemplates := fresh || events == nil || (!s.stream && time.Since(s.lastTmpl) >= s.cfg.TemplateRefresh)
	if withTemplates {
		s.pk.templatesMessage()
	}
	var skipped, noAddr, tooLarge int
	for i := range events {
		e := &events[i]
		if !s.types[e.Type] {
			skipped++
			continue
		}
		t := s.template(e)
		if t == nil {
			noAddr++
			continue
		}
		if !s.pk.add(t, e) {
			tooLarge++
		}
	}
	s.pk.closeMessage()
	if s.stream {
		err = s.conn.Write(ctx, s.pk.buf)
	} else {
		s.msgs = s.pk.messages(s.msgs[:0])
		err = s.conn.Write(ctx, s.msgs...)
	}
	if err != nil {
		s.seq = seq
		s.env.Metrics.Errors("ipfix_write", 1)
		return err
	}
	if withTemplates {
		s.lastTmpl = time.Now()
		s.templateSends.Inc()
	}
	s.messages.Add(float64(len(s.pk.ends)))
	s.records.Add(float64(s.seq - seq))
	if skipped > 0 {
		s.env.Metrics.Filtered("ipfix_event_type", skipped)
	}
	if noAddr > 0 {
		s.env.Metrics.Dropped("ipfix_no_address", noAddr)
	}
	if tooLarge > 0 {
		s.env.Metrics.Dropped("ipfix_record_too_large", tooLarge)
		s.env.Logger.Warn("IPFIX records larger than a message were dropped; raise mtu or use tcp", "records", tooLarge, "mtu", s.cfg.MTU)
	}
	return nil
}

// template picks the template of e by its type and address family; nil when e has no
// usable addresses.
func (s *Sink) template(e *flow.Event) *template {
	src, dst := e.SrcAddr.Unmap(), e.DstAddr.Unmap()
	var i int
	switch {
	case src.Is4() && dst.Is4():
	case src.Is6() && dst.Is6():
		i = 1
	default:
		return nil
	}
	switch e.Type {
	case flow.TypeAggregate:
		i += 2
	case flow.TypeStart:
		i += 4
	}
	return &s.tmpls[i]
}

// Close stops the template timer and closes the connection.
func (s *Sink) Close(context.Context) error {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	if s.done != nil {
		<-s.done
	}
	return s.conn.Close()
}

// String names the sink in errors.
func (s *Sink) String() string { return fmt.Sprintf("ipfix %s://%s", s.cfg.Transport, s.cfg.Address) }
