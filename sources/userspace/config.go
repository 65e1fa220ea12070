// Package userspace is the `type: userspace` source: a userspace connection tracker
// (sub-package tracker) fed by packets, either captured live from an interface with AF_PACKET
// or replayed from a pcap or pcapng file, emitting the same start and end events as the
// kernel conntrack source.
//
// A live capture uses wall-clock time for timeouts; a replay uses each packet's own
// timestamp, runs at full speed and ends the connections still open when the file ends. On
// an interactive terminal a replay shows a progress bar; otherwise it logs its progress.
package userspace

import (
	"net/netip"
	"strconv"
	"time"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/sources/userspace/tracker"
)

// Config is the userspace source's options.
type Config struct {
	// Interface to capture from live (AF_PACKET, TPACKET_V3 ring). Exactly one of interface
	// and pcap.
	Interface string `yaml:"interface"`
	// Pcap is a pcap or pcapng file to replay; relative to the directory of pipeline.yaml.
	Pcap string `yaml:"pcap"`
	// Netns is the network namespace of the interface: a name under /run/netns or a path
	// such as /proc/PID/ns/net. Empty is flowpipe's own namespace.
	Netns string `yaml:"netns"`
	// Snaplen is how many bytes of each packet the capture keeps; headers are all the
	// tracker reads, and byte counts come from the IP header, not the captured length.
	Snaplen int `yaml:"snaplen"`
	// Promiscuous captures traffic not addressed to the interface too.
	Promiscuous bool `yaml:"promiscuous"`
	// RingSize is the size of the capture ring shared with the kernel.
	RingSize config.ByteSize `yaml:"ring_size"`
	// LocalPrefixes are the host's addresses, which decide direction and rx/tx. Empty means
	// the live interface's own addresses; a replay without them reports direction unknown.
	LocalPrefixes []netip.Prefix `yaml:"local_prefixes"`
	// MaxEntries caps the connection table (finished, then least recently active connections
	// are evicted and counted).
	MaxEntries int `yaml:"max_entries"`
	// Timeouts override the Linux nf_conntrack defaults per state.
	Timeouts tracker.Timeouts `yaml:"timeouts"`
	// BatchSize is how many events make a batch; 0 (the default) is 1,024 for a live
	// capture and 4,096 for a replay (fewer, larger batches: a file sink fsyncs per batch).
	BatchSize int `yaml:"batch_size"`
	// FlushInterval is the longest a live event waits for its batch to fill.
	FlushInterval time.Duration `yaml:"flush_interval"`
	// MaxPending caps the events a live capture holds while the pipeline pushes back; beyond
	// it events are dropped and counted (reason pending_full). A replay waits instead.
	MaxPending int `yaml:"max_pending"`
	// Progress of a replay: auto (a bar on a terminal, else log lines), bar, log or off.
	Progress string `yaml:"progress"`
	// ProgressInterval is how often a replay without a terminal logs its progress.
	ProgressInterval time.Duration `yaml:"progress_interval"`
}

func defaults() *Config {
	return &Config{
		Snaplen:          256,
		RingSize:         8 << 20,
		MaxEntries:       1 << 18,
		FlushInterval:    time.Second,
		MaxPending:       1 << 16,
		Progress:         "auto",
		ProgressInterval: 10 * time.Second,
	}
}

// Default batch sizes of a live capture and of a replay.
const (
	liveBatch   = 1024
	replayBatch = 4096
)

// batch is the number of events per batch: BatchSize, or the default for a live capture or
// a replay.
func (c *Config) batch() int {
	switch {
	case c.BatchSize > 0:
		return c.BatchSize
	case c.Pcap != "":
		return replayBatch
	default:
		return liveBatch
	}
}

// ringBlock is the size of one block of the capture ring.
const ringBlock = 1 << 20

// Validate checks the options.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	switch {
	case c.Interface == "" && c.Pcap == "":
		errs.Add("interface", "set interface (live capture) or pcap (replay a file)")
	case c.Interface != "" && c.Pcap != "":
		errs.Add("pcap", "set either interface or pcap, not both")
	}
	if c.Pcap != "" && c.Netns != "" {
		errs.Add("netns", "only applies to a live capture (interface)")
	}
	if c.Snaplen < 64 || c.Snaplen > 65535 {
		errs.Add("snaplen", "must be between 64 and 65535, got %d", c.Snaplen)
	}
	if c.RingSize < ringBlock {
		errs.Add("ring_size", "must be at least 1MiB, got %v", c.RingSize)
	}
	if c.MaxEntries < 1 {
		errs.Add("max_entries", "must be at least 1, got %d", c.MaxEntries)
	}
	if c.BatchSize < 0 {
		errs.Add("batch_size", "must not be negative (0: the default), got %d", c.BatchSize)
	}
	if c.FlushInterval <= 0 {
		errs.Add("flush_interval", "must be positive")
	}
	if c.MaxPending < c.batch() {
		errs.Add("max_pending", "must be at least batch_size (%d), got %d", c.batch(), c.MaxPending)
	}
	switch c.Progress {
	case "auto", "bar", "log", "off":
	default:
		errs.Add("progress", "unknown mode %q (want auto, bar, log or off)", c.Progress)
	}
	if c.ProgressInterval <= 0 {
		errs.Add("progress_interval", "must be positive")
	}
	for i, p := range c.LocalPrefixes {
		if !p.IsValid() {
			errs.Add("local_prefixes["+strconv.Itoa(i)+"]", "invalid prefix")
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"tcp_syn_sent", c.Timeouts.TCPSynSent}, {"tcp_syn_recv", c.Timeouts.TCPSynRecv},
		{"tcp_established", c.Timeouts.TCPEstablished}, {"tcp_fin_wait", c.Timeouts.TCPFinWait},
		{"tcp_close_wait", c.Timeouts.TCPCloseWait}, {"tcp_last_ack", c.Timeouts.TCPLastAck},
		{"tcp_time_wait", c.Timeouts.TCPTimeWait}, {"tcp_close", c.Timeouts.TCPClose},
		{"udp_unreplied", c.Timeouts.UDPUnreplied}, {"udp_stream", c.Timeouts.UDPStream},
		{"icmp", c.Timeouts.ICMP},
	} {
		if d.v < 0 {
			errs.Add("timeouts."+d.name, "must not be negative")
		}
	}
	return errs.Err()
}

// Factory returns the userspace source's factory.
func Factory() component.Factory {
	f := component.NewSourceFactory("userspace",
		"tracks connections in userspace from packets: live AF_PACKET capture or a pcap/pcapng replay",
		defaults, func(env component.Env, c *Config) (component.Source, error) { return New(env, c) })
	f.Reasons.Dropped = []string{"pending_full"}
	return f
}

// Capabilities: a live capture (AF_PACKET) needs CAP_NET_RAW, promiscuous mode CAP_NET_ADMIN,
// entering another network namespace CAP_SYS_ADMIN; reading a pcap file needs none.
func (c *Config) Capabilities() []string {
	var caps []string
	if c.Interface != "" {
		caps = append(caps, "CAP_NET_RAW")
		if c.Promiscuous {
			caps = append(caps, "CAP_NET_ADMIN")
		}
	}
	if c.Netns != "" {
		caps = append(caps, "CAP_SYS_ADMIN")
	}
	return caps
}
