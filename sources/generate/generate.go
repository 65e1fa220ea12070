// Package generate is a source of synthetic but realistic flows (`type: generate`): a mix of
// TCP, UDP and ICMP over IPv4 and IPv6, each flow a start event followed later by its end
// event with counters. It is for demos, tests and benchmarks.
package generate

import (
	"context"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Config is the generate source's options.
type Config struct {
	// Rate is events per second; 0 is as fast as the pipeline takes them.
	Rate int `yaml:"rate"`
	// Count stops the source after exactly this many events; 0 runs until stopped. The last
	// events end the flows still open, so every start has its end within count (which is
	// therefore even).
	Count int64 `yaml:"count"`
	// BatchSize is the number of events per batch.
	BatchSize int `yaml:"batch_size"`
	// Flows is how many flows are open at once.
	Flows int `yaml:"flows"`
	// Seed makes the sequence repeatable; 0 picks a random one.
	Seed uint64 `yaml:"seed"`
}

func defaults() *Config { return &Config{BatchSize: 1024, Flows: 4096} }

// Validate checks the options.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	if c.Rate < 0 {
		errs.Add("rate", "must not be negative")
	}
	if c.Count < 0 {
		errs.Add("count", "must not be negative")
	} else if c.Count%2 != 0 {
		errs.Add("count", "must be even: every flow is a start and an end, got %d", c.Count)
	}
	if c.BatchSize < 1 || c.BatchSize > 1<<20 {
		errs.Add("batch_size", "must be between 1 and 1048576, got %d", c.BatchSize)
	}
	if c.Flows < 1 || c.Flows > 1<<24 {
		errs.Add("flows", "must be between 1 and 16777216, got %d", c.Flows)
	}
	return errs.Err()
}

// Factory returns the generate source's factory.
func Factory() component.Factory {
	return component.NewSourceFactory("generate", "synthetic flows at a set rate, for demos, tests and benchmarks",
		defaults, func(env component.Env, c *Config) (component.Source, error) { return New(env, c), nil })
}

// Source generates flows.
type Source struct {
	cfg  Config
	env  component.Env
	pool sync.Pool // []flow.Event slices returned by acknowledgements
}

// New makes a generate source.
func New(env component.Env, c *Config) *Source { return &Source{cfg: *c, env: env} }

type openFlow struct {
	ev   flow.Event // the start event, reused for the end
	open bool
}

// Run emits batches until ctx is done or count events were emitted.
func (s *Source) Run(ctx context.Context, out component.Emitter) error {
	seed := s.cfg.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	g := &gen{rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), ids: flow.NewIDGen(), flows: make([]openFlow, s.cfg.Flows)}
	var emitted int64
	start := time.Now()
	batchSize := s.cfg.BatchSize
	if s.cfg.Rate > 0 {
		// About ten batches a second, so that a low rate still streams smoothly.
		batchSize = max(1, min(batchSize, s.cfg.Rate/10))
	}
	for ctx.Err() == nil {
		n := batchSize
		if s.cfg.Count > 0 {
			left := s.cfg.Count - emitted
			if left <= 0 {
				return nil
			}
			n = int(min(int64(n), left))
		}
		events := s.slice(n)
		now := flow.Now()
		for i := range events {
			if s.cfg.Count > 0 && s.cfg.Count-emitted-int64(i) <= int64(g.open) {
				g.endNext(&events[i], now) // what is left of count ends the open flows
				continue
			}
			g.next(&events[i], now)
		}
		emitted += int64(n)
		if err := out.Emit(ctx, flow.NewBatch(events, s.recycle(events))); err != nil {
			return nil
		}
		if s.cfg.Rate > 0 {
			due := start.Add(time.Duration(float64(emitted) / float64(s.cfg.Rate) * float64(time.Second)))
			if d := time.Until(due); d > 0 {
				t := time.NewTimer(d)
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
				}
			}
		}
	}
	return nil
}

func (s *Source) slice(n int) []flow.Event {
	if p, ok := s.pool.Get().(*[]flow.Event); ok && cap(*p) >= n {
		return (*p)[:n]
	}
	return make([]flow.Event, n, max(n, s.cfg.BatchSize))
}

// recycle returns the events' memory to the pool once the batch is acknowledged.
func (s *Source) recycle(events []flow.Event) func(error) {
	return func(error) {
		events = events[:0]
		s.pool.Put(&events)
	}
}

// gen is the flow generator state; it belongs to one goroutine.
type gen struct {
	rng   *rand.Rand
	ids   *flow.IDGen
	flows []openFlow
	slot  int
	open  int // flows started and not ended
}

var (
	local4  = [4]byte{10, 0, 0, 0}
	remote4 = [][4]byte{{198, 51, 100, 0}, {203, 0, 113, 0}, {192, 0, 2, 0}}
	local6  = [16]byte{0xfd, 0x00, 0xf1, 0x0e}
	remote6 = [16]byte{0x20, 0x01, 0x0d, 0xb8}
	ports   = []uint16{443, 443, 443, 80, 53, 22, 8080, 5432, 3478, 123}
)

// next fills e with the next event: the end of the flow in the current slot if one is
// open, else the start of a new one.
func (g *gen) next(e *flow.Event, now flow.Time) {
	f := g.advance()
	if f.open {
		g.end(e, f, now)
		return
	}
	g.start(&f.ev, now)
	f.open = true
	g.open++
	*e = f.ev
}

// endNext fills e with the end of the next open flow, in slot order.
func (g *gen) endNext(e *flow.Event, now flow.Time) {
	for {
		if f := g.advance(); f.open {
			g.end(e, f, now)
			return
		}
	}
}

// advance returns the flow in the current slot and moves to the next, round the table.
func (g *gen) advance() *openFlow {
	f := &g.flows[g.slot]
	g.slot++
	if g.slot == len(g.flows) {
		g.slot = 0
	}
	return f
}

func (g *gen) start(e *flow.Event, now flow.Time) {
	r := g.rng.Uint64()
	*e = flow.Event{EventID: g.ids.New(), FlowID: g.ids.New(), Type: flow.TypeStart, Timestamp: now, Start: now}
	v6 := r%5 == 0
	switch p := (r >> 8) % 20; {
	case p < 14:
		e.Protocol = flow.ProtoTCP
	case p < 19:
		e.Protocol = flow.ProtoUDP
	default:
		if v6 {
			e.Protocol = flow.ProtoICMPv6
			e.ICMPType = 128
		} else {
			e.Protocol = flow.ProtoICMP
			e.ICMPType = 8
		}
	}
	var local, remote netip.Addr
	if v6 {
		l, rm := local6, remote6
		l[15] = byte(r >> 16)
		rm[14], rm[15] = byte(r>>24), byte(r>>32)
		local, remote = netip.AddrFrom16(l), netip.AddrFrom16(rm)
	} else {
		l, rm := local4, remote4[(r>>40)%uint64(len(remote4))]
		l[3] = byte(r>>16) | 1
		rm[3] = byte(r >> 24)
		local, remote = netip.AddrFrom4(l), netip.AddrFrom4(rm)
	}
	localPort := uint16(32768 + (r>>44)%28000)
	remotePort := ports[(r>>60)%uint64(len(ports))]
	if e.Protocol == flow.ProtoUDP && remotePort == 443 {
		remotePort = 53
	}
	if (r>>7)%4 == 0 {
		e.Direction = flow.Ingress
		e.SrcAddr, e.DstAddr = remote, local
		if !flow.IsICMP(e.Protocol) {
			e.SrcPort, e.DstPort = localPort, remotePort
		}
	} else {
		e.Direction = flow.Egress
		e.SrcAddr, e.DstAddr = local, remote
		if !flow.IsICMP(e.Protocol) {
			e.SrcPort, e.DstPort = localPort, remotePort
		}
	}
}

func (g *gen) end(e *flow.Event, f *openFlow, now flow.Time) {
	*e = f.ev
	f.open = false
	g.open--
	r := g.rng.Uint64()
	e.EventID = g.ids.New()
	e.Type = flow.TypeEnd
	e.Timestamp, e.End = now, now
	e.TxPackets = 1 + r%64
	e.RxPackets = 1 + (r>>8)%64
	e.TxBytes = e.TxPackets * (60 + (r>>16)%1400)
	e.RxBytes = e.RxPackets * (60 + (r>>32)%1400)
}
