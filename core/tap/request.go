package tap

import (
	"fmt"
	"net/url"
	"strconv"
	"time"
)

// Request is what a tap client asks for: the query string of GET /api/tap and /api/top.
type Request struct {
	At     string  // tap point; "" is Fanout
	Filter *Filter // nil: everything
	Last   int     // the newest Last matching events of the ring first (0: none)
	Since  time.Time
	Follow bool // then stream live events
	// Top only.
	By     []string
	Window time.Duration
	N      int
	Once   bool
}

// Values encodes r as query parameters.
func (r Request) Values() url.Values {
	v := url.Values{}
	if r.At != "" {
		v.Set("at", r.At)
	}
	for _, g := range r.Filter.Strings() {
		v.Add("filter", g)
	}
	if r.Last > 0 {
		v.Set("last", strconv.Itoa(r.Last))
	}
	if !r.Since.IsZero() {
		v.Set("since", r.Since.UTC().Format(time.RFC3339Nano))
	}
	if r.Follow {
		v.Set("follow", "1")
	}
	if len(r.By) > 0 {
		s := ""
		for i, k := range r.By {
			if i > 0 {
				s += ","
			}
			s += k
		}
		v.Set("by", s)
	}
	if r.Window > 0 {
		v.Set("window", r.Window.String())
	}
	if r.N > 0 {
		v.Set("n", strconv.Itoa(r.N))
	}
	if r.Once {
		v.Set("once", "1")
	}
	return v
}

// ParseRequest decodes query parameters; the error names the parameter.
func ParseRequest(v url.Values) (Request, error) {
	r := Request{At: v.Get("at"), Window: time.Minute, N: 10}
	var err error
	if r.Filter, err = ParseFilter(v["filter"]); err != nil {
		return r, fmt.Errorf("filter: %w", err)
	}
	if s := v.Get("last"); s != "" {
		if r.Last, err = strconv.Atoi(s); err != nil || r.Last < 0 {
			return r, fmt.Errorf("last=%s: want a number of events", s)
		}
	}
	if s := v.Get("since"); s != "" {
		if r.Since, err = ParseSince(s, time.Now()); err != nil {
			return r, err
		}
	}
	r.Follow = isTrue(v.Get("follow"))
	r.Once = isTrue(v.Get("once"))
	if s := v.Get("by"); s != "" {
		if r.By, err = ParseGroupBy(s); err != nil {
			return r, err
		}
	} else {
		r.By = []string{"src", "dst", "dport"}
	}
	if s := v.Get("window"); s != "" {
		if r.Window, err = time.ParseDuration(s); err != nil || r.Window < time.Second {
			return r, fmt.Errorf("window=%s: want a duration of at least 1s", s)
		}
	}
	if s := v.Get("n"); s != "" {
		if r.N, err = strconv.Atoi(s); err != nil || r.N < 1 {
			return r, fmt.Errorf("n=%s: want a positive number of rows", s)
		}
	}
	return r, nil
}

// ParseSince reads an RFC 3339 time or a duration before now ("5m").
func ParseSince(s string, now time.Time) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return t, fmt.Errorf("since=%s: want a duration (5m) or an RFC 3339 time (2006-01-02T15:04:05Z)", s)
	}
	return t, nil
}

func isTrue(s string) bool { return s == "1" || s == "true" }
