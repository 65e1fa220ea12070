package options

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// ByteSize is a size in bytes written as a plain integer or with a unit: B, KB, MB, GB
// (powers of 1000) or KiB, MiB, GiB (powers of 1024).
type ByteSize int64

var byteUnits = []struct {
	suffix string
	mult   int64
}{
	{"KIB", 1 << 10}, {"MIB", 1 << 20}, {"GIB", 1 << 30}, {"TIB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30},
	{"B", 1},
}

// UnmarshalText parses "64MiB", "10MB", "512".
func (s *ByteSize) UnmarshalText(b []byte) error {
	text := strings.TrimSpace(string(b))
	upper := strings.ToUpper(text)
	mult := int64(1)
	for _, u := range byteUnits {
		if strings.HasSuffix(upper, u.suffix) {
			mult = u.mult
			upper = strings.TrimSpace(upper[:len(upper)-len(u.suffix)])
			break
		}
	}
	n, err := strconv.ParseFloat(upper, 64)
	if err != nil {
		return fmt.Errorf("want a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
	}
	if math.IsNaN(n) || math.IsInf(n, 0) {
		return fmt.Errorf("want a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
	}
	if n < 0 {
		return fmt.Errorf("must not be negative")
	}
	// Checked before converting: a float beyond int64 would wrap into a negative size.
	if total := n * float64(mult); total >= math.MaxInt64 {
		return fmt.Errorf("too large (at most 8EiB)")
	}
	*s = ByteSize(n * float64(mult))
	return nil
}

func (s ByteSize) String() string {
	switch {
	case s >= 1<<30 && s%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", s>>30)
	case s >= 1<<20 && s%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", s>>20)
	case s >= 1<<10 && s%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", s>>10)
	}
	return fmt.Sprintf("%dB", int64(s))
}
