package dedup

import (
	"time"

	"github.com/google/uuid"
)

// Window is a set of delivered event IDs bounded by age and count, optionally kept in a
// journal file. It is not safe for concurrent use: its owner holds a lock around it.
type Window struct {
	dur     time.Duration
	max     int
	ids     map[uuid.UUID]struct{}
	done    Ring
	journal *Journal
}

// NewWindow remembers delivered IDs for dur, and at most max of them. A zero dur or max
// remembers nothing (de-duplication off).
func NewWindow(dur time.Duration, max int) *Window {
	return &Window{dur: dur, max: max, ids: map[uuid.UUID]struct{}{}}
}

// On reports whether the window remembers anything.
func (w *Window) On() bool { return w.dur > 0 && w.max > 0 }

// Load restores the IDs of the journal at path that are still inside the window and keeps
// appending to it.
func (w *Window) Load(path string, now time.Time) error {
	if !w.On() {
		return nil
	}
	j, recs, err := OpenJournal(path, now.Add(-w.dur).UnixNano(), w.max)
	if err != nil {
		return err
	}
	w.journal = j
	for _, r := range recs {
		w.remember(r)
	}
	return nil
}

// Has reports whether id was delivered within the window.
func (w *Window) Has(id uuid.UUID) bool {
	_, ok := w.ids[id]
	return ok
}

// Len is the number of IDs remembered.
func (w *Window) Len() int { return len(w.ids) }

// Add records ids as delivered at now (in the journal first, with one write), and forgets
// what left the window. An error is the journal's: the IDs are remembered in memory anyway.
func (w *Window) Add(ids []uuid.UUID, now time.Time) error {
	if !w.On() || len(ids) == 0 {
		return nil
	}
	var err error
	if w.journal != nil {
		err = w.journal.Append(ids, now)
	}
	at := now.UnixNano()
	for _, id := range ids {
		w.remember(Rec{ID: id, At: at})
	}
	cutoff := now.Add(-w.dur).UnixNano()
	for w.done.Len() > 0 && w.done.Oldest().At < cutoff {
		w.forgetOldest()
	}
	if w.journal != nil && w.journal.Records > 2*w.max+1024 {
		if cerr := w.journal.Rewrite(w.done.All()); cerr != nil && err == nil {
			err = cerr
		}
	}
	return err
}

func (w *Window) remember(r Rec) {
	if _, dup := w.ids[r.ID]; dup {
		return
	}
	if w.done.Len() == w.max {
		w.forgetOldest()
	}
	w.done.Push(r, w.max)
	w.ids[r.ID] = struct{}{}
}

func (w *Window) forgetOldest() {
	delete(w.ids, w.done.Pop().ID)
}

// Close closes the journal.
func (w *Window) Close() error {
	if w.journal == nil {
		return nil
	}
	return w.journal.Close()
}
