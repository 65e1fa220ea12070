package dedup

import (
	"time"

	"github.com/google/uuid"

	"github.com/flowpipe/flowpipe/core/options"
)

// Config is the event-ID de-duplication window of a source that can receive an event twice
// (`dedup:` in its options).
type Config struct {
	Window    time.Duration `yaml:"window"`     // remember delivered IDs this long (0: off)
	MaxEvents int           `yaml:"max_events"` // and at most this many
	// StateFile keeps delivered IDs across restarts, so that an event redelivered after the
	// process was killed is not passed on twice. Relative to pipeline.yaml's directory.
	// Empty: in memory only.
	StateFile string `yaml:"state_file"`
}

// DefaultConfig remembers delivered IDs for 10 minutes, at most a million of them.
func DefaultConfig() Config { return Config{Window: 10 * time.Minute, MaxEvents: 1_000_000} }

// Check adds the problems of c to errs, under key (for example "dedup").
func (c Config) Check(errs *options.FieldErrors, key string) {
	if c.Window < 0 {
		errs.Add(key+".window", "must not be negative (0 turns de-duplication off)")
	}
	if c.MaxEvents < 0 {
		errs.Add(key+".max_events", "must not be negative (0 turns de-duplication off)")
	}
}

// Gate passes each event ID on once: an ID is admitted unless it is in flight (admitted and
// not yet settled) or was delivered within the window. A source that is redelivered messages
// (JetStream, Kafka) admits the events of each message, and settles them when their batch is
// acknowledged. Like Window it is not safe for concurrent use: its owner holds a lock.
type Gate struct {
	window *Window // in-flight IDs too
}

// NewGate makes a gate with c's window (not loaded yet: see Load).
func NewGate(c Config) *Gate {
	return &Gate{window: NewWindow(c.Window, c.MaxEvents)}
}

// Load restores the window from the journal file (Config.StateFile, made absolute by
// resolve, such as component.Env.Path) and keeps appending to it; nothing when file is "".
func (g *Gate) Load(file string, resolve func(string) string, now time.Time) error {
	if file == "" {
		return nil
	}
	return g.window.Load(resolve(file), now)
}

// Admit reports whether id is new, and marks it in flight if so.
func (g *Gate) Admit(id uuid.UUID) bool {
	return g.window.Admit(id) == Absent
}

// Settle ends the flight of ids. Delivered ones are remembered in the window (and its
// journal, with one write, before the caller acknowledges upstream); the others may be
// admitted again when they are redelivered. The error is the journal's.
func (g *Gate) Settle(ids []uuid.UUID, delivered bool, now time.Time) error {
	return g.window.Settle(ids, delivered, now, nil)
}

// Remembered is how many delivered IDs the window holds.
func (g *Gate) Remembered() int { return g.window.Len() }

// Close closes the window's journal.
func (g *Gate) Close() error { return g.window.Close() }
