package userspace

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/flowpipe/flowpipe/internal/netns"
	"github.com/flowpipe/flowpipe/internal/privilege"

	"github.com/gopacket/gopacket/afpacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/net/bpf"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/sources/userspace/tracker"
)

// Capture ring timing: a block is handed to userspace when full or after blockTimeout, and a
// read gives up after pollTimeout so that the reader notices a stop.
const (
	blockTimeout = 20 * time.Millisecond
	pollTimeout  = 200 * time.Millisecond
	frameSize    = 1 << 16
	// drainAfterStop bounds how long a stopping capture keeps reading what is in the ring.
	drainAfterStop = 500 * time.Millisecond
)

// openLive opens the AF_PACKET ring on the interface, inside the configured namespace, and
// returns it with the interface's link type and addresses.
func (s *Source) openLive() (*afpacket.TPacket, layers.LinkType, []netip.Prefix, error) {
	var tp *afpacket.TPacket
	var local []netip.Prefix
	link := layers.LinkTypeEthernet
	err := netns.Run(s.config().Netns, func() error {
		ifc, err := net.InterfaceByName(s.config().Interface)
		if err != nil {
			return fmt.Errorf("interface %q: %w", s.config().Interface, err)
		}
		// Devices without a MAC address (tun, WireGuard) deliver bare IP packets.
		if len(ifc.HardwareAddr) == 0 {
			link = layers.LinkTypeRaw
		}
		if local, err = addrsOf(ifc); err != nil {
			return err
		}
		tp, err = afpacket.NewTPacket(
			afpacket.OptInterface(s.config().Interface),
			afpacket.OptTPacketVersion(afpacket.TPacketVersion3),
			afpacket.OptFrameSize(frameSize),
			afpacket.OptBlockSize(ringBlock),
			afpacket.OptNumBlocks(int(s.config().RingSize)/ringBlock),
			afpacket.OptBlockTimeout(blockTimeout),
			afpacket.OptPollTimeout(pollTimeout),
		)
		if err != nil {
			return fmt.Errorf("open AF_PACKET capture on %s: %w (live capture needs CAP_NET_RAW)", s.config().Interface, err)
		}
		err = setSnaplen(tp, s.config().Snaplen)
		if err == nil && s.config().Promiscuous {
			err = tp.SetPromiscuous(true)
		}
		if err != nil {
			tp.Close()
			return fmt.Errorf("configure capture on %s: %w", s.config().Interface, err)
		}
		return nil
	})
	return tp, link, local, err
}

// setSnaplen sets the snap length, a filter that keeps the first snaplen bytes of every
// packet; on an open capture too (Reconfigure).
func setSnaplen(tp *afpacket.TPacket, snaplen int) error {
	prog, err := bpf.Assemble([]bpf.Instruction{bpf.RetConstant{Val: uint32(snaplen)}})
	if err != nil {
		return err
	}
	return tp.SetBPF(prog)
}

// addrsOf returns the interface's addresses as single-address prefixes.
func addrsOf(ifc *net.Interface) ([]netip.Prefix, error) {
	addrs, err := ifc.Addrs()
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", ifc.Name, err)
	}
	var local []netip.Prefix
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
				ip = ip.Unmap()
				local = append(local, netip.PrefixFrom(ip, ip.BitLen()))
			}
		}
	}
	return local, nil
}

// interfaceAddrs reads the interface's current addresses inside the configured namespace.
func (s *Source) interfaceAddrs() ([]netip.Prefix, error) {
	var local []netip.Prefix
	err := netns.Run(s.config().Netns, func() error {
		ifc, err := net.InterfaceByName(s.config().Interface)
		if err != nil {
			return fmt.Errorf("interface %q: %w", s.config().Interface, err)
		}
		local, err = addrsOf(ifc)
		return err
	})
	return local, err
}

// addrRefresh is how often a live capture without local_prefixes rereads the interface's
// addresses (a VPN interface may get its address after the capture starts, or change it).
const addrRefresh = 30 * time.Second

// runLive captures until ctx ends, then ends the connections still open.
func (s *Source) runLive(ctx context.Context, out component.Emitter) error {
	tp, link, ifAddrs, err := s.openLive()
	err = privilege.Explain(err, s.config().Capabilities())
	if err != nil {
		return err
	}
	local := s.config().LocalPrefixes
	if len(local) == 0 {
		local = ifAddrs
	}
	tr := s.newTracker(local, s.config().MaxPending)
	em := newEmitter(out, s.config().batch())
	s.env.Logger.Info("capturing", "interface", s.config().Interface, "netns", s.config().Netns, "local", local)
	if s.started != nil {
		close(s.started)
	}

	var stop atomic.Bool
	readErr := make(chan error, 1)
	go func() { readErr <- s.read(tp, link, tr, &stop) }()

	ticker := time.NewTicker(s.config().FlushInterval)
	defer ticker.Stop()
	// The addresses are reread while local_prefixes is not set, which a reload may change.
	every := addrRefresh
	if s.addrRefresh > 0 {
		every = s.addrRefresh
	}
	refreshTicker := time.NewTicker(every)
	defer refreshTicker.Stop()
	refresh := refreshTicker.C
	var capErr error
	var dropsSeen uint
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case capErr = <-readErr:
			readErr = nil
			break loop
		case <-tr.Ready():
		case req := <-s.reconf:
			req.done <- s.applyLive(req.cfg, tp, tr, em, ticker)
			continue
		case <-refresh:
			if len(s.config().LocalPrefixes) > 0 {
				continue
			}
			if now, err := s.interfaceAddrs(); err != nil {
				s.env.Metrics.Errors("interface_addresses", 1)
				s.env.Logger.Warn("could not reread the interface's addresses; keeping the previous ones", "error", err)
			} else if fmt.Sprint(now) != fmt.Sprint(tr.LocalPrefixes()) {
				s.env.Logger.Info("interface addresses changed", "interface", s.config().Interface, "local", now)
				tr.SetLocalPrefixes(now)
				if s.addrsChanged != nil {
					select {
					case s.addrsChanged <- now:
					default:
					}
				}
			}
			continue
		case <-ticker.C:
			tr.Expire(flow.Now())
			if _, st, err := tp.SocketStats(); err == nil && st.Drops() > dropsSeen {
				s.capDrops.Add(float64(st.Drops() - dropsSeen))
				dropsSeen = st.Drops()
			}
		}
		if err := em.emit(ctx, tr.DrainEvents(em.buffer())); err != nil {
			break loop
		}
	}
	stop.Store(true)
	if readErr != nil {
		<-readErr // the reader drains the ring and stops within pollTimeout+drainAfterStop
	}
	tp.Close()
	// The connections still open end with the capture, so that their counters are not lost.
	sctx, cancel := context.WithTimeout(context.Background(), shutdownEmit)
	defer cancel()
	if err := em.emit(sctx, tr.DrainEvents(em.buffer())); err == nil {
		if err := s.flushAll(sctx, tr, em, flow.Now()); err != nil {
			s.env.Logger.Warn("could not hand over the end events of open connections", "error", err)
		}
	}
	st := tr.Stats()
	s.env.Logger.Info("capture stopped", "interface", s.config().Interface, "connections", st.Started, "evicted", st.Evicted)
	return capErr
}

// read is the capture loop: decode, track, count. It owns its counters and publishes them
// about once a second. Once stop is set it keeps reading for up to drainAfterStop, until the
// ring is empty, so that the packets of the last ring block are tracked too.
func (s *Source) read(tp *afpacket.TPacket, link layers.LinkType, tr *tracker.Tracker, stop *atomic.Bool) error {
	var (
		c       counters
		last    tracker.Stats
		p       tracker.Packet
		n       uint64
		stopped time.Time
	)
	published := time.Now()
	defer func() { s.publish(&c, tr, &last) }()
	for {
		if stopped.IsZero() && stop.Load() {
			stopped = time.Now()
		}
		if !stopped.IsZero() && time.Since(stopped) > drainAfterStop {
			return nil
		}
		data, ci, err := tp.ZeroCopyReadPacketData()
		switch {
		case err == nil:
		case errors.Is(err, afpacket.ErrTimeout):
			if !stopped.IsZero() {
				return nil // drained
			}
			if time.Since(published) >= time.Second {
				s.publish(&c, tr, &last)
				published = time.Now()
			}
			continue
		default:
			if stop.Load() {
				return nil
			}
			return fmt.Errorf("capture on %s: %w", s.config().Interface, err)
		}
		if err := decodeFrame(link, data, &p); err != nil {
			c.fail(err)
		} else {
			c.count(tr.ProcessAt(&p, flow.TimeOf(ci.Timestamp)))
		}
		if n++; n&1023 == 0 && time.Since(published) >= time.Second {
			s.publish(&c, tr, &last)
			published = time.Now()
		}
	}
}
