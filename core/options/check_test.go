package options

import (
	"strings"
	"testing"
)

// A size that does not fit in 64 bits is "too large", not a wrapped negative number.
func TestByteSizeOverflow(t *testing.T) {
	for _, in := range []string{"99999999999999999999GiB", "1e30", "9223372036854775807", "inf", "NaN"} {
		var s ByteSize
		err := s.UnmarshalText([]byte(in))
		if err == nil {
			t.Errorf("%q: accepted as %d", in, int64(s))
			continue
		}
		if strings.Contains(err.Error(), "negative") {
			t.Errorf("%q: %v, want an overflow error", in, err)
		}
	}
	var s ByteSize
	if err := s.UnmarshalText([]byte("99999999999999999999GiB")); err == nil || !strings.Contains(err.Error(), "too large") {
		t.Errorf("got %v, want too large", err)
	}
	if err := s.UnmarshalText([]byte("4TiB")); err != nil || s != 4<<40 {
		t.Errorf("4TiB = %d, %v", s, err)
	}
}

type checked struct {
	Rate  int    `yaml:"rate"`
	Name  string `yaml:"name"`
	Limit int    `yaml:"limit"`
}

func (c *checked) Validate() error {
	var errs FieldErrors
	if c.Rate < 0 {
		errs.Add("rate", "must not be negative")
	}
	if c.Limit > 10 {
		errs.Add("limit", "at most 10")
	}
	return errs.Err()
}

// A decoding problem (an unknown key, a wrong type) does not hide what Validate finds in the
// other keys; Validate's opinion of a key that failed to decode is left out.
func TestCheckReportsEverything(t *testing.T) {
	c := &checked{}
	errs := Check(map[string]any{"ratee": 1, "limit": 11, "rate": "x", "name": "n"}, c, "")
	got := map[string]bool{}
	for _, e := range errs {
		got[e.Path] = true
	}
	if len(errs) != 3 || !got["ratee"] || !got["limit"] || !got["rate"] {
		t.Fatalf("got %v, want ratee (unknown), rate (type) and limit (Validate)", errs)
	}
}
