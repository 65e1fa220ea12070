package testenv

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// LoopbackUDP looks up the UDP socket bound to 127.0.0.1:port in /proc/net/udp, without
// touching the port: found says whether one is bound, unread is its receive queue in bytes
// (0 once its owner has read every datagram). A test waiting for a collector to listen uses
// this rather than trying to bind the port itself, which, at the wrong instant, takes the
// port from the collector starting up.
func LoopbackUDP(t testing.TB, port int) (found bool, unread int) {
	t.Helper()
	data, err := os.ReadFile("/proc/net/udp")
	if err != nil {
		t.Fatal(err)
	}
	local := fmt.Sprintf("0100007F:%04X", port)
	for _, line := range strings.Split(string(data), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 4 && f[1] == local {
			_, rx, _ := strings.Cut(f[4], ":") // tx_queue:rx_queue, hexadecimal
			n, err := strconv.ParseInt(rx, 16, 64)
			if err != nil {
				t.Fatalf("/proc/net/udp: rx_queue %q of %s: %v", rx, local, err)
			}
			return true, int(n)
		}
	}
	return false, 0
}
