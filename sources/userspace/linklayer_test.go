package userspace

import (
	"strings"
	"testing"

	"github.com/gopacket/gopacket/layers"

	"github.com/flowpipe/flowpipe/sources/userspace/tracker"
)

// ipv4UDP is a minimal IPv4/UDP packet from 10.0.0.1:5000 to 10.0.0.2:53.
var ipv4UDP = []byte{
	0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
	0x13, 0x88, 0, 53, 0, 8, 0, 0,
}

func TestDecodeFrame(t *testing.T) {
	eth := append([]byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00}, ipv4UDP...)
	vlan := append([]byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x81, 0x00, 0, 7, 0x08, 0x00}, ipv4UDP...)
	qinq := append([]byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x88, 0xa8, 0, 7, 0x81, 0x00, 0, 8, 0x08, 0x00}, ipv4UDP...)
	padded := append(append([]byte(nil), eth...), make([]byte, 18)...) // to the 60-byte minimum frame
	sll := append([]byte{0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0, 0x08, 0x00}, ipv4UDP...)
	sll2 := append([]byte{0x08, 0x00, 0, 0, 0, 0, 0, 2, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0}, ipv4UDP...)
	null := append([]byte{2, 0, 0, 0}, ipv4UDP...)
	loop := append([]byte{0, 0, 0, 2}, ipv4UDP...)
	arp := append([]byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x06}, make([]byte, 28)...)
	for _, c := range []struct {
		name string
		link layers.LinkType
		b    []byte
		want error
	}{
		{"ethernet", layers.LinkTypeEthernet, eth, nil},
		{"vlan", layers.LinkTypeEthernet, vlan, nil},
		{"qinq", layers.LinkTypeEthernet, qinq, nil},
		{"padded", layers.LinkTypeEthernet, padded, nil},
		{"sll", layers.LinkTypeLinuxSLL, sll, nil},
		{"sll2", layers.LinkTypeLinuxSLL2, sll2, nil},
		{"raw", layers.LinkTypeRaw, ipv4UDP, nil},
		{"ipv4", layers.LinkTypeIPv4, ipv4UDP, nil},
		{"null", layers.LinkTypeNull, null, nil},
		{"loop", layers.LinkTypeLoop, loop, nil},
		{"arp", layers.LinkTypeEthernet, arp, errNotIP},
		{"short ethernet", layers.LinkTypeEthernet, eth[:10], tracker.ErrTruncated},
		{"short vlan", layers.LinkTypeEthernet, vlan[:16], tracker.ErrTruncated},
		{"unknown link", layers.LinkTypeFDDI, eth, errNotIP},
	} {
		var p tracker.Packet
		err := decodeFrame(c.link, c.b, &p)
		if err != c.want {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
			continue
		}
		if err == nil && (p.Proto != 17 || p.SrcPort != 5000 || p.DstPort != 53 || p.Length != 28) {
			t.Errorf("%s: %+v", c.name, p)
		}
	}
	if reason(errNotIP) != "not_ip" || reason(tracker.ErrTruncated) != "truncated" {
		t.Fatal("reasons")
	}
}

// FuzzDecodeFrame feeds arbitrary frames of every link type the source reads.
func FuzzDecodeFrame(f *testing.F) {
	f.Add(uint8(0), append([]byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00}, ipv4UDP...))
	f.Add(uint8(2), append([]byte{0x08, 0x00, 0, 0, 0, 0, 0, 2, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0}, ipv4UDP...))
	links := []layers.LinkType{layers.LinkTypeEthernet, layers.LinkTypeLinuxSLL, layers.LinkTypeLinuxSLL2,
		layers.LinkTypeRaw, layers.LinkTypeNull, layers.LinkTypeLoop, layers.LinkTypeIPv4, layers.LinkTypeIPv6}
	f.Fuzz(func(t *testing.T, l uint8, b []byte) {
		var p tracker.Packet
		if err := decodeFrame(links[int(l)%len(links)], b, &p); err != nil && reason(err) == "other" {
			t.Fatalf("unlabelled error %v", err)
		}
	})
}

func TestConfigValidate(t *testing.T) {
	c := defaults()
	if err := c.Validate(); err == nil {
		t.Fatal("no interface nor pcap accepted")
	}
	c.Interface, c.Pcap = "eth0", "x.pcap"
	c.Snaplen, c.BatchSize, c.Progress = 10, -1, "fancy"
	c.Timeouts.UDPStream = -1
	err := c.Validate()
	for _, key := range []string{"pcap", "snaplen", "batch_size", "progress", "timeouts.udp_stream"} {
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("error %v does not name %s", err, key)
		}
	}
}
