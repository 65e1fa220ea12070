// Package flood opens many short UDP flows as fast as one thread can, for the conntrack
// source's burst test and benchmark: each flow is its own socket bound to its own source
// port, sending one datagram, so that every flow is a distinct conntrack entry.
package flood

import (
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// UDP sends one datagram of size bytes to dst from each source port in [firstPort,
// firstPort+n), from the address src (the unspecified address lets the kernel choose).
// Raw syscalls keep it to four per flow.
func UDP(src netip.Addr, dst netip.AddrPort, firstPort, n, size int) error {
	if firstPort < 1 || firstPort+n > 65536 {
		return fmt.Errorf("source ports %d..%d out of range", firstPort, firstPort+n-1)
	}
	family := unix.AF_INET
	var to unix.Sockaddr
	if dst.Addr().Is4() {
		to = &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
	} else {
		family = unix.AF_INET6
		to = &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()}
	}
	if !src.IsValid() {
		src = netip.IPv4Unspecified()
		if family == unix.AF_INET6 {
			src = netip.IPv6Unspecified()
		}
	}
	payload := make([]byte, size)
	for i := 0; i < n; i++ {
		fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		var local unix.Sockaddr
		if family == unix.AF_INET {
			local = &unix.SockaddrInet4{Port: firstPort + i, Addr: src.As4()}
		} else {
			local = &unix.SockaddrInet6{Port: firstPort + i, Addr: src.As16()}
		}
		if err := unix.Bind(fd, local); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind source port %d: %w", firstPort+i, err)
		}
		if err := unix.Sendto(fd, payload, 0, to); err != nil {
			unix.Close(fd)
			return fmt.Errorf("send from port %d: %w", firstPort+i, err)
		}
		unix.Close(fd)
	}
	return nil
}
