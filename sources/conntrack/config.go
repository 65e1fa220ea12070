package conntrack

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
)

// Config is the options of a `type: conntrack` source (docs/configuration.md).
type Config struct {
	// NetNS is the network namespace to read: a name from `ip netns` (/run/netns/NAME) or a
	// path such as /proc/PID/ns/net; empty is flowpipe's own namespace.
	NetNS string `yaml:"netns"`
	// Activate adds a minimal nftables table that makes the kernel track connections in the
	// namespace, removed on stop.
	Activate bool `yaml:"activate"`
	// Counters and Timestamps set nf_conntrack_acct and nf_conntrack_timestamp for the
	// namespace while the source runs, and restore them on stop.
	Counters   bool `yaml:"counters"`
	Timestamps bool `yaml:"timestamps"`

	// LocalPrefixes decide direction; empty means the addresses of the namespace's interfaces.
	LocalPrefixes []netip.Prefix `yaml:"local_prefixes"`
	// IngressMark and EgressMark, when not zero, decide direction by the connection mark
	// (after DirectionMarkMask) before addresses are looked at.
	IngressMark       uint32 `yaml:"ingress_mark"`
	EgressMark        uint32 `yaml:"egress_mark"`
	DirectionMarkMask uint32 `yaml:"direction_mark_mask"`

	// Filters.
	Protocols       []string       `yaml:"protocols"`
	IncludePrefixes []netip.Prefix `yaml:"include_prefixes"`
	ExcludePrefixes []netip.Prefix `yaml:"exclude_prefixes"`
	Mark            *uint32        `yaml:"mark"`
	MarkMask        uint32         `yaml:"mark_mask"`
	Zone            *uint16        `yaml:"zone"`

	// ExistingFlows emits a start for every connection already in the table when the source
	// starts, so that every end has a start.
	ExistingFlows bool `yaml:"existing_flows"`

	// ReadBuffer is the kernel socket buffer for events, set with SO_RCVBUFFORCE as root.
	ReadBuffer config.ByteSize `yaml:"read_buffer"`
	// BatchSize and FlushInterval shape the batches: a batch is emitted when it is full or
	// when its oldest event has waited FlushInterval.
	BatchSize     int           `yaml:"batch_size"`
	FlushInterval time.Duration `yaml:"flush_interval"`
	// MaxPending bounds the events read from the kernel but not yet accepted by the pipeline.
	MaxPending int `yaml:"max_pending"`
	// ResyncGrace is how long a connection that vanished from the table without its DESTROY
	// event may still get that event before an end is reconstructed for it.
	ResyncGrace time.Duration `yaml:"resync_grace"`
	// SweepInterval is how often the table is dumped while connections are known that the
	// kernel may never send a DESTROY for (those found by a dump rather than a NEW event).
	SweepInterval time.Duration `yaml:"sweep_interval"`

	protoSet map[uint8]bool
}

func defaultConfig() *Config {
	return &Config{
		Counters:          true,
		Timestamps:        true,
		ExistingFlows:     true,
		DirectionMarkMask: 0xffffffff,
		MarkMask:          0xffffffff,
		ReadBuffer:        32 << 20,
		BatchSize:         2048,
		FlushInterval:     200 * time.Millisecond,
		MaxPending:        1 << 18,
		ResyncGrace:       10 * time.Second,
		SweepInterval:     time.Minute,
	}
}

var protocolNames = map[string]uint8{
	"tcp": flow.ProtoTCP, "udp": flow.ProtoUDP, "sctp": flow.ProtoSCTP,
	"icmp": flow.ProtoICMP, "icmpv6": flow.ProtoICMPv6,
	"udplite": 136, "dccp": 33, "gre": 47,
}

// Validate checks the options and resolves protocol names.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	c.protoSet = nil
	for i, p := range c.Protocols {
		n, ok := protocolNames[strings.ToLower(p)]
		if !ok {
			v, err := strconv.ParseUint(p, 10, 8)
			if err != nil {
				errs.Add(fmt.Sprintf("protocols[%d]", i), "unknown protocol %q (use tcp, udp, sctp, icmp, icmpv6, udplite, dccp, gre or a number 0-255)", p)
				continue
			}
			n = uint8(v)
		}
		if c.protoSet == nil {
			c.protoSet = map[uint8]bool{}
		}
		c.protoSet[n] = true
	}
	if c.MarkMask != 0xffffffff && c.Mark == nil {
		errs.Add("mark_mask", "set without mark; add mark: VALUE (the connection mark, after the mask, must equal it)")
	}
	if c.IngressMark != 0 && c.IngressMark == c.EgressMark {
		errs.Add("egress_mark", "equals ingress_mark (%#x); they must differ", c.IngressMark)
	}
	if (c.IngressMark != 0 || c.EgressMark != 0) && c.DirectionMarkMask == 0 {
		errs.Add("direction_mark_mask", "is 0, so no mark could ever match")
	}
	if c.ReadBuffer < 64<<10 || c.ReadBuffer > 2<<30 {
		errs.Add("read_buffer", "must be between 64KiB and 2GiB, got %d bytes", int64(c.ReadBuffer))
	}
	if c.BatchSize < 1 || c.BatchSize > 1<<16 {
		errs.Add("batch_size", "must be between 1 and 65536, got %d", c.BatchSize)
	}
	if c.FlushInterval <= 0 {
		errs.Add("flush_interval", "must be positive, such as 200ms")
	}
	if c.MaxPending < c.BatchSize {
		errs.Add("max_pending", "must be at least batch_size (%d), got %d", c.BatchSize, c.MaxPending)
	}
	if c.ResyncGrace <= 0 {
		errs.Add("resync_grace", "must be positive, such as 10s")
	}
	if c.SweepInterval < time.Second {
		errs.Add("sweep_interval", "must be at least 1s, got %s", c.SweepInterval)
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// Capabilities: netlink conntrack and nftables need CAP_NET_ADMIN; entering another network
// namespace needs CAP_SYS_ADMIN.
func (c *Config) Capabilities() []string {
	caps := []string{"CAP_NET_ADMIN"}
	if c.NetNS != "" {
		caps = append(caps, "CAP_SYS_ADMIN")
	}
	return caps
}
