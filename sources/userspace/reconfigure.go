package userspace

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/gopacket/gopacket/afpacket"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/sources/userspace/tracker"
)

// A reload gives a running source new options through Reconfigure (component.Reconfigurer).
// The capture (or the replay's place in its file) and the tracker's open connections with
// their flow IDs are kept: every connection still gets one start and one end. The capture
// loop applies the options between two packets.
//
//   - snaplen and promiscuous change the open capture socket;
//   - local_prefixes decide the direction of connections opened from then on (empty: the
//     interface's addresses, reread as at start);
//   - max_entries, timeouts, batch_size, max_pending and flush_interval apply at once to
//     the tracker and the batches (a lower max_entries evicts the excess, each with its
//     end event);
//   - progress and progress_interval apply to a replay's progress report at once;
//   - interface, pcap, netns and ring_size need a new capture (a ring cannot be resized,
//     and a second one on the same interface would count every packet twice): they return
//     an error wrapping component.ErrRestartNeeded, and the runtime replaces the source,
//     whose open connections then end with it.

func restartKeys(old, c *Config) []string {
	var keys []string
	if old.Interface != c.Interface {
		keys = append(keys, "interface")
	}
	if old.Pcap != c.Pcap {
		keys = append(keys, "pcap")
	}
	if old.Netns != c.Netns {
		keys = append(keys, "netns")
	}
	if old.RingSize != c.RingSize {
		keys = append(keys, "ring_size")
	}
	return keys
}

type reconfRequest struct {
	cfg  *Config
	done chan error
}

// Reconfigure decodes and checks options as the factory does and applies them to the
// running capture or replay (see above). When it returns an error, nothing changed.
func (s *Source) Reconfigure(ctx context.Context, raw map[string]any) error {
	c := defaults()
	if errs := options.Check(raw, c, ""); len(errs) > 0 {
		return errs
	}
	s.reconfMu.Lock()
	defer s.reconfMu.Unlock()
	if keys := restartKeys(s.config(), c); len(keys) > 0 {
		return fmt.Errorf("userspace source %s: %v changed, which needs a new capture: %w", s.env.Name, keys, component.ErrRestartNeeded)
	}
	s.mu.Lock()
	running := s.running
	if running == nil {
		s.cfg.Store(c) // not running yet: Run (which sets running under mu) starts with these
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()
	req := &reconfRequest{cfg: c, done: make(chan error, 1)}
	select {
	case s.reconf <- req:
		return <-req.done // taken: applied or refused, whatever ctx does now
	case <-running:
		s.cfg.Store(c) // Run has returned: nothing runs with them
		return nil
	case <-ctx.Done():
		return fmt.Errorf("userspace source %s: %w", s.env.Name, ctx.Err())
	}
}

// applyLive applies c to the running capture; what can fail comes first, so that an error
// changes nothing.
func (s *Source) applyLive(c *Config, tp *afpacket.TPacket, tr *tracker.Tracker, em *emitter, flush *time.Ticker) error {
	old := s.config()
	local := c.LocalPrefixes
	if len(local) == 0 {
		if len(old.LocalPrefixes) == 0 {
			local = tr.LocalPrefixes() // the interface's, as last reread
		} else {
			addrs, err := s.interfaceAddrs()
			if err != nil {
				return fmt.Errorf("userspace source %s: local_prefixes: %w", s.env.Name, err)
			}
			local = addrs
		}
	}
	if c.Snaplen != old.Snaplen {
		if err := setSnaplen(tp, c.Snaplen); err != nil {
			return fmt.Errorf("userspace source %s: snaplen: %w", s.env.Name, err)
		}
	}
	if c.Promiscuous != old.Promiscuous {
		if err := tp.SetPromiscuous(c.Promiscuous); err != nil {
			if c.Snaplen != old.Snaplen {
				_ = setSnaplen(tp, old.Snaplen)
			}
			return fmt.Errorf("userspace source %s: promiscuous: %w", s.env.Name, err)
		}
	}
	tr.Retune(s.trackerConfig(c, local, c.MaxPending), flow.Now())
	em.size = c.batch()
	flush.Reset(c.FlushInterval)
	s.cfg.Store(c)
	s.env.Logger.Info("userspace source reconfigured", "interface", c.Interface, "local", local,
		"connections", tr.Len(), "changed_local", !slices.Equal(local, old.LocalPrefixes))
	return nil
}

// applyReplay applies c to a replay at the capture's time now.
func (s *Source) applyReplay(c *Config, tr *tracker.Tracker, em *emitter, prog *progress, now flow.Time) {
	tr.Retune(s.trackerConfig(c, c.LocalPrefixes, 0), now)
	em.size = c.batch()
	prog.setMode(c.Progress, c.ProgressInterval)
	s.cfg.Store(c)
	s.env.Logger.Info("userspace source reconfigured", "file", s.pcap, "connections", tr.Len())
}
