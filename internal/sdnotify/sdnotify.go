// Package sdnotify speaks systemd's service notification protocol (sd_notify(3)): a few
// newline-separated VAR=value assignments in one datagram to the Unix socket named by
// $NOTIFY_SOCKET, so that a Type=notify unit knows when flowpipe is ready, stopping, or
// alive (watchdog). Without $NOTIFY_SOCKET (not started by systemd) every call does nothing.
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// SocketEnv names the socket systemd listens on; a name starting with @ is in the abstract
// namespace.
const SocketEnv = "NOTIFY_SOCKET"

// The states flowpipe sends.
const (
	Ready     = "READY=1"     // the pipeline runs: its sinks, enrichers and sources started
	Stopping  = "STOPPING=1"  // shutdown began: sources stop, in-flight batches drain
	Reloading = "RELOADING=1" // a reload began; send with MonotonicUsec, then Ready when it ends
	Watchdog  = "WATCHDOG=1"  // still alive, sent every half WatchdogSec
)

// Notify sends the assignments (e.g. Ready, "STATUS=running") in one datagram. It reports
// false when $NOTIFY_SOCKET is not set (nothing to tell); an error when the socket cannot
// be reached.
func Notify(states ...string) (bool, error) {
	name := os.Getenv(SocketEnv)
	if name == "" {
		return false, nil
	}
	if !strings.HasPrefix(name, "/") && !strings.HasPrefix(name, "@") {
		return false, fmt.Errorf("$%s=%q: want an absolute path or an @abstract name", SocketEnv, name)
	}
	// Go's net package maps a leading @ to the abstract namespace (a leading NUL byte).
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return false, fmt.Errorf("notify systemd at %s: %w", name, err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(strings.Join(states, "\n") + "\n")); err != nil {
		return false, fmt.Errorf("notify systemd at %s: %w", name, err)
	}
	return true, nil
}

// WatchdogInterval returns how often to send Watchdog: half of the unit's WatchdogSec=, as
// systemd passes it in $WATCHDOG_USEC (for this process: $WATCHDOG_PID, when set, must be
// ours). ok is false when no watchdog is armed.
func WatchdogInterval() (time.Duration, bool, error) {
	usec := os.Getenv("WATCHDOG_USEC")
	if usec == "" {
		return 0, false, nil
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0, false, nil // meant for another process (our parent)
	}
	n, err := strconv.ParseUint(usec, 10, 63)
	if err != nil || n == 0 {
		return 0, false, errors.New("$WATCHDOG_USEC: want a positive number of microseconds, got " + strconv.Quote(usec))
	}
	return time.Duration(n) * time.Microsecond / 2, true, nil
}

// MonotonicUsec is the MONOTONIC_USEC=... assignment that goes with Reloading: the time of
// CLOCK_MONOTONIC in microseconds, which systemd (Type=notify-reload, systemd 253 and later)
// uses to tell this reload from an earlier one.
func MonotonicUsec() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return "MONOTONIC_USEC=0"
	}
	return "MONOTONIC_USEC=" + strconv.FormatInt(ts.Nano()/1000, 10)
}
