package userspace

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/sources/userspace/tracker"
)

// packetReader is what pcapgo's pcap and pcapng readers have in common.
type packetReader interface {
	ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error)
	LinkType() layers.LinkType
}

// countingReader counts the bytes read from the file, for progress.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}

// openCapture opens a pcap or pcapng file, telling them apart by their magic number.
func openCapture(f io.Reader) (packetReader, func(int) layers.LinkType, error) {
	br := bufio.NewReaderSize(f, 1<<20)
	magic, err := br.Peek(4)
	if err != nil {
		return nil, nil, fmt.Errorf("read the file header: %w", err)
	}
	if magic[0] == 0x0a && magic[1] == 0x0d && magic[2] == 0x0d && magic[3] == 0x0a {
		r, err := pcapgo.NewNgReader(br, pcapgo.DefaultNgReaderOptions)
		if err != nil {
			return nil, nil, fmt.Errorf("not a readable pcapng file: %w", err)
		}
		// pcapng interfaces may differ in link type; packets say which interface they came in.
		linkOf := func(i int) layers.LinkType {
			if ifc, err := r.Interface(i); err == nil {
				return ifc.LinkType
			}
			return r.LinkType()
		}
		return r, linkOf, nil
	}
	r, err := pcapgo.NewReader(br)
	if err != nil {
		return nil, nil, fmt.Errorf("not a pcap or pcapng file: %w", err)
	}
	return r, func(int) layers.LinkType { return r.LinkType() }, nil
}

// runPcap replays the file at full speed; each packet's timestamp is the tracker's clock.
func (s *Source) runPcap(ctx context.Context, out component.Emitter) error {
	f, err := os.Open(s.pcap)
	if err != nil {
		return fmt.Errorf("open %s: %w", s.pcap, err)
	}
	defer f.Close()
	var size int64
	if st, err := f.Stat(); err == nil {
		size = st.Size()
	}
	cr := &countingReader{r: f}
	r, linkOf, err := openCapture(cr)
	if err != nil {
		return fmt.Errorf("%s: %w", s.pcap, err)
	}
	// A replay waits for the pipeline rather than drop events: no MaxPending.
	tr := s.newTracker(s.config().LocalPrefixes, 0)
	em := newEmitter(out, s.config().batch())
	prog := newProgress(s.config().Progress, s.config().ProgressInterval, s.env.Logger, s.pcap, size)
	var (
		c        counters
		last     tracker.Stats
		p        tracker.Packet
		now      flow.Time
		pkts     uint64
		linkIdx  = -1
		link     layers.LinkType
		readErr  error
		stopped  bool
		frameLen uint64
	)
	for {
		data, ci, err := r.ZeroCopyReadPacketData()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				readErr = err
			}
			break
		}
		pkts++
		frameLen += uint64(ci.Length)
		if t := flow.TimeOf(ci.Timestamp); t > now {
			now = t // a capture is not always in order; time never goes back
		}
		if ci.InterfaceIndex != linkIdx {
			linkIdx, link = ci.InterfaceIndex, linkOf(ci.InterfaceIndex)
		}
		if err := decodeFrame(link, data, &p); err != nil {
			c.fail(err)
		} else {
			c.count(tr.ProcessAt(&p, now))
		}
		if pkts&63 == 0 {
			if tr.Pending() >= s.config().batch() {
				if err := em.emit(ctx, tr.DrainEvents(em.buffer())); err != nil {
					stopped = true
					break
				}
			}
			if pkts&4095 == 0 {
				select {
				case req := <-s.reconf:
					s.applyReplay(req.cfg, tr, em, prog, now)
					req.done <- nil
				default:
				}
				if ctx.Err() != nil {
					stopped = true
					break
				}
				prog.update(pkts, frameLen, cr.n)
				s.publish(&c, tr, &last)
			}
		}
	}
	prog.done(pkts, frameLen, cr.n)
	if stopped {
		s.publish(&c, tr, &last)
		return nil
	}
	// The capture is over: every connection still open ends with it.
	if err := em.emit(ctx, tr.DrainEvents(em.buffer())); err != nil {
		return nil
	}
	// In batches of the batch size, the table emptied at once rather than connection by
	// connection (Tracker.DrainBatches).
	if _, err := tr.DrainBatches(now, em.size, em.buffer, func(evs []flow.Event) error { return em.emit(ctx, evs) }); err != nil {
		return nil
	}
	s.publish(&c, tr, &last)
	st := tr.Stats()
	if readErr != nil {
		if errors.Is(readErr, io.ErrUnexpectedEOF) {
			s.env.Metrics.Errors("truncated_file", 1)
			s.env.Logger.Warn("capture file ends in the middle of a packet; replayed what was complete", "file", s.pcap, "packets", pkts)
		} else {
			return fmt.Errorf("read %s after %d packets: %w", s.pcap, pkts, readErr)
		}
	}
	s.env.Logger.Info("replay finished", "file", s.pcap, "packets", pkts, "connections", st.Started,
		"evicted", st.Evicted, "untracked", st.Invalid, "undecodable", c.failedAll)
	return nil
}
