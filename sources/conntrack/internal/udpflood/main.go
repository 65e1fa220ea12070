// Command udpflood opens many short UDP flows as fast as it can, one datagram from each of n
// consecutive source ports; scripts/bench-conntrack.sh runs it inside a network namespace.
package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"time"

	"github.com/flowpipe/flowpipe/sources/conntrack/internal/flood"
)

func main() {
	dst := flag.String("dst", "", "destination address:port")
	n := flag.Int("n", 20000, "number of flows")
	first := flag.Int("first-port", 20000, "first source port")
	size := flag.Int("size", 16, "payload bytes per datagram")
	workers := flag.Int("workers", runtime.NumCPU(), "threads opening flows in parallel")
	flag.Parse()
	ap, err := netip.ParseAddrPort(*dst)
	if err != nil {
		fmt.Fprintf(os.Stderr, "udpflood: -dst: %v\n", err)
		os.Exit(2)
	}
	start := time.Now()
	errs := make(chan error, *workers)
	per := (*n + *workers - 1) / *workers
	for w := 0; w < *workers; w++ {
		lo := w * per
		cnt := min(per, *n-lo)
		go func() {
			if cnt <= 0 {
				errs <- nil
				return
			}
			errs <- flood.UDP(netip.Addr{}, ap, *first+lo, cnt, *size)
		}()
	}
	for w := 0; w < *workers; w++ {
		if err := <-errs; err != nil {
			fmt.Fprintf(os.Stderr, "udpflood: %v\n", err)
			os.Exit(1)
		}
	}
	d := time.Since(start)
	fmt.Printf("opened %d UDP flows in %.3fs (%.0f flows/s)\n", *n, d.Seconds(), float64(*n)/d.Seconds())
}
