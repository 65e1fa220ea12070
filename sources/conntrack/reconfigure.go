package conntrack

import (
	"context"
	"fmt"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
)

// A reload gives a running source new options through Reconfigure (component.Reconfigurer).
// The netlink subscription, the socket's buffered events and the tracker's open connections
// with their flow IDs are kept, so that every connection still gets exactly one start and
// one end with the same flow ID. The reader goroutine applies the new options between two
// netlink messages: no message is decoded half under the old options and half under the new.
//
//   - Filters (protocols, include_prefixes, exclude_prefixes, mark, mark_mask, zone) select
//     the connections the source reports from then on. A connection already reported keeps
//     being tracked even if the new filters exclude it, and gets its real end when the kernel
//     destroys it. Connections the new filters include that were open already are found by a
//     table dump taken as the options change and get a start marked reconstructed (as
//     existing_flows does at start; with existing_flows: false they get none), then their
//     end.
//   - Direction (local_prefixes, ingress_mark, egress_mark, direction_mark_mask) applies to
//     the events produced from then on.
//   - read_buffer resizes the open socket's buffer; batch_size, flush_interval and
//     max_pending reshape the queue; resync_grace and sweep_interval apply at once;
//     existing_flows applies to connections that new filters include.
//   - netns, activate, counters and timestamps change which namespace is read or the host
//     itself: they return an error wrapping component.ErrRestartNeeded, and the runtime
//     replaces the source (docs/configuration.md, Reload).

// restartKeys are the options a running source cannot change in place.
func restartKeys(old, c *Config) []string {
	var keys []string
	if old.NetNS != c.NetNS {
		keys = append(keys, "netns")
	}
	if old.Activate != c.Activate {
		keys = append(keys, "activate")
	}
	if old.Counters != c.Counters {
		keys = append(keys, "counters")
	}
	if old.Timestamps != c.Timestamps {
		keys = append(keys, "timestamps")
	}
	return keys
}

// filtersOf is what decides which connections are reported, comparable as a string.
func filtersOf(c *Config) string {
	mark, zone := "-", "-"
	if c.Mark != nil {
		mark = fmt.Sprint(*c.Mark)
	}
	if c.Zone != nil {
		zone = fmt.Sprint(*c.Zone)
	}
	return fmt.Sprint(c.protoSet, c.IncludePrefixes, c.ExcludePrefixes, mark, c.MarkMask, zone)
}

type reconfRequest struct {
	cfg  *Config
	done chan error
}

// Reconfigure decodes and checks options as the factory does and applies them to the running
// source without closing its socket or forgetting a connection (see above). When it returns
// an error, nothing changed.
func (s *Source) Reconfigure(ctx context.Context, raw map[string]any) error {
	c := defaultConfig()
	if errs := options.Check(raw, c, ""); len(errs) > 0 {
		return errs
	}
	old := s.config()
	if keys := restartKeys(old, c); len(keys) > 0 {
		return fmt.Errorf("conntrack source %s: %v changed, which needs a new socket or changes the host: %w", s.env.Name, keys, component.ErrRestartNeeded)
	}
	s.reconfMu.Lock()
	defer s.reconfMu.Unlock()
	s.mu.Lock()
	running := s.running
	switch {
	case s.closed:
		s.mu.Unlock()
		return fmt.Errorf("conntrack source %s: reconfigured after Close", s.env.Name)
	case running == nil:
		// The reader does not run (yet): nothing reads the tracker or the socket but us.
		defer s.mu.Unlock()
		return s.apply(s.events, c)
	}
	ev := s.events
	s.mu.Unlock()
	// The request is queued first and the reader woken after, so that the reader, once
	// awake, finds it (reconfMu keeps the queue to this one request).
	req := &reconfRequest{cfg: c, done: make(chan error, 1)}
	s.reconf <- req
	if ev != nil {
		_ = ev.setDeadline(time.Now()) // wake a reader blocked on the socket
	}
	select {
	case err := <-req.done:
		return err
	case <-running:
	case <-ctx.Done():
	}
	select {
	case <-s.reconf: // not taken: nothing changed
		if ctx.Err() != nil {
			return fmt.Errorf("conntrack source %s: %w", s.env.Name, ctx.Err())
		}
		return s.applyStopped(c) // the reader has stopped
	default:
		return <-req.done // taken: the reader answers before it goes on
	}
}

// applyStopped applies options to a source whose reader has stopped.
func (s *Source) applyStopped(c *Config) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.apply(nil, c)
}

// apply puts c in force. It runs in the reader goroutine, or with s.mu held while no reader
// runs; ev is the open event socket, nil before Start and after the reader stopped. What
// can fail (the socket buffer, the table dump for newly included connections) comes first,
// so that an error changes nothing.
func (s *Source) apply(ev *eventConn, c *Config) error {
	old := s.config()
	refilter := filtersOf(old) != filtersOf(c)
	var dumped []ctFlow
	if ev != nil {
		if c.ReadBuffer != old.ReadBuffer {
			if err := ev.setReadBuffer(int(c.ReadBuffer), s.log); err != nil {
				return fmt.Errorf("conntrack source %s: read_buffer: resize the socket buffer: %w", s.env.Name, err)
			}
		}
		if refilter {
			var err error
			if dumped, err = s.dumpTable(); err != nil {
				if old.ReadBuffer != c.ReadBuffer {
					_ = ev.setReadBuffer(int(old.ReadBuffer), s.log)
				}
				return fmt.Errorf("conntrack source %s: new filters: %w", s.env.Name, err)
			}
			dumped = s.tr.changedFilters(dumped)
		}
	}
	s.cfg.Store(c)
	s.tr.cfg = c
	s.q.reshape(c.BatchSize, c.MaxPending)
	if s.ns != nil {
		s.refreshLocal()
	}
	if dumped != nil {
		s.stats.resyncs.Add(1)
		starts, missing := s.tr.onDump(dumped, flow.TimeOf(s.lastDump), c.ExistingFlows)
		s.stats.tracked.Store(int64(len(s.tr.known)))
		s.log.Info("conntrack source took new filters; table dump reconciled", "entries", len(dumped),
			"reconstructed_starts", starts, "missing_awaiting_destroy", missing)
	}
	s.log.Info("conntrack source reconfigured", "filters_changed", refilter)
	return nil
}
