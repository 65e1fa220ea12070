package userspace

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// progress reports how far a replay has got: a bar redrawn in place on an interactive
// terminal, else a log line now and then.
type progress struct {
	bar      bool
	off      bool
	w        io.Writer
	log      *slog.Logger
	file     string
	size     int64
	interval time.Duration
	start    time.Time
	last     time.Time
}

func newProgress(mode string, interval time.Duration, log *slog.Logger, file string, size int64) *progress {
	p := &progress{w: os.Stderr, log: log, file: file, size: size, start: time.Now()}
	p.last = p.start
	p.setMode(mode, interval)
	return p
}

// setMode sets how progress is shown (the progress and progress_interval options).
func (p *progress) setMode(mode string, interval time.Duration) {
	p.interval, p.off, p.bar = interval, false, false
	switch mode {
	case "off":
		p.off = true
	case "bar":
		p.bar = true
	case "auto":
		f, ok := p.w.(*os.File)
		p.bar = ok && isTerminal(f)
	}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// barRedraw is how often the bar is redrawn.
const barRedraw = 200 * time.Millisecond

func (p *progress) update(pkts, bytes uint64, read int64) {
	if p.off {
		return
	}
	now := time.Now()
	every := p.interval
	if p.bar {
		every = barRedraw
	}
	if now.Sub(p.last) < every {
		return
	}
	p.last = now
	p.report(now, pkts, bytes, read, false)
}

func (p *progress) done(pkts, bytes uint64, read int64) {
	if p.off {
		return
	}
	p.report(time.Now(), pkts, bytes, read, true)
}

func (p *progress) report(now time.Time, pkts, bytes uint64, read int64, final bool) {
	elapsed := now.Sub(p.start).Seconds()
	rate := 0.0
	if elapsed > 0 {
		rate = float64(pkts) / elapsed
	}
	frac, left := 0.0, time.Duration(0)
	if p.size > 0 {
		frac = min(float64(read)/float64(p.size), 1)
		if frac > 0 && !final {
			left = time.Duration(elapsed * (1 - frac) / frac * float64(time.Second)).Round(time.Second)
		}
	}
	if !p.bar {
		if final {
			p.log.Info("replay read the whole file", "file", p.file, "packets", pkts, "bytes", bytes,
				"packets_per_second", int64(rate), "elapsed", now.Sub(p.start).Round(time.Millisecond))
			return
		}
		p.log.Info("replay progress", "file", p.file, "percent", int(frac*100), "packets", pkts, "bytes", bytes,
			"packets_per_second", int64(rate), "time_left", left)
		return
	}
	const width = 30
	filled := int(frac * width)
	bar := strings.Repeat("=", filled)
	if filled < width {
		bar += ">" + strings.Repeat(" ", width-filled-1)
	}
	line := fmt.Sprintf("\r[%s] %3d%%  %s pkts  %s  %s pkt/s  left %v ", bar, int(frac*100),
		human(float64(pkts), ""), human(float64(bytes), "B"), human(rate, ""), left)
	if final {
		line += "\n"
	}
	_, _ = io.WriteString(p.w, line)
}

// human writes n with a k/M/G suffix.
func human(n float64, unit string) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.1fG%s", n/1e9, unit)
	case n >= 1e6:
		return fmt.Sprintf("%.1fM%s", n/1e6, unit)
	case n >= 1e3:
		return fmt.Sprintf("%.1fk%s", n/1e3, unit)
	}
	return fmt.Sprintf("%.0f%s", n, unit)
}
