package dedup

import (
	"time"

	"github.com/google/uuid"
)

// Window is the set of event IDs a source has seen: those in flight (admitted, their batch
// not yet settled) and those delivered, remembered for a window bounded by age and count
// (Ring, oldest first), optionally kept in a journal file. Both are one Table, so checking an
// ID and marking it in flight is one probe. In-flight IDs are tracked even when the window
// is off (a zero duration or count), for Gate. It is not safe for concurrent use: its owner
// holds a lock around it.
type Window struct {
	dur     time.Duration
	max     int
	ids     Table
	done    Ring // delivered, oldest first
	journal *Journal
}

// NewWindow remembers delivered IDs for dur, and at most max of them. A zero dur or max
// remembers nothing (de-duplication off).
func NewWindow(dur time.Duration, max int) *Window {
	return &Window{dur: dur, max: max}
}

// On reports whether the window remembers anything.
func (w *Window) On() bool { return w.dur > 0 && w.max > 0 }

// SetBounds changes the window's duration and count (a reload) and forgets at once what is
// now outside it; the IDs still inside are kept.
func (w *Window) SetBounds(dur time.Duration, maxEvents int, now time.Time) error {
	w.dur, w.max = dur, maxEvents
	for w.done.Len() > max(w.max, 0) {
		w.forgetOldest()
	}
	return w.Expire(now)
}

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
func (w *Window) Has(id uuid.UUID) bool { return w.ids.Get(id) == Delivered }

// Len is the number of delivered IDs remembered.
func (w *Window) Len() int { return w.done.Len() }

// Admit marks id in flight if the window does not know it, and returns what it knew before:
// Absent (admitted now), InFlight or Waiting (a duplicate of an event in flight), Delivered
// (a duplicate of a delivered one).
func (w *Window) Admit(id uuid.UUID) State { return w.ids.Admit(id) }

// See is Admit for an owner that tracks its IDs in flight itself (the gRPC collector, in
// small per-batch tables that stay in cache): an unknown id is entered as Delivered at once,
// so that the table is probed once per event on admission and never on delivery (Remember);
// true if the window knew id (the owner tells in flight from delivered). A failed delivery
// must Forget its IDs.
func (w *Window) See(id uuid.UUID) bool { return w.ids.AdmitAs(id, Delivered) != Absent }

// Remember records ids that See entered and that are now delivered: in the journal (one
// write) and the window's FIFO, which pushes the oldest out of a full window; the table is
// not probed for them. The error is the journal's.
func (w *Window) Remember(ids []uuid.UUID, now time.Time) error {
	var err error
	if w.journal != nil && len(ids) > 0 {
		err = w.journal.Append(ids, now)
	}
	at := now.UnixNano()
	for _, id := range ids {
		w.push(Rec{ID: id, At: at})
	}
	if xerr := w.Expire(now); xerr != nil && err == nil {
		err = xerr
	}
	return err
}

// Forget removes ids that See entered and whose delivery failed, so that they are admitted
// again when they are redelivered.
func (w *Window) Forget(ids []uuid.UUID) {
	for _, id := range ids {
		w.ids.Remove(id, Delivered, Delivered)
	}
}

// Settle ends the flight of ids. Delivered ones are remembered in the window (and its
// journal, with one write, before the caller acknowledges upstream); the others are
// forgotten, so that they may be admitted again when they are redelivered. waited, if not
// nil, is called for each ID that was marked Waiting. The error is the journal's: the IDs are
// remembered in memory anyway.
func (w *Window) Settle(ids []uuid.UUID, delivered bool, now time.Time, waited func(uuid.UUID)) error {
	if !delivered || !w.On() {
		for _, id := range ids {
			if w.ids.Remove(id, InFlight, Waiting) == Waiting && waited != nil {
				waited(id)
			}
		}
		return nil
	}
	var err error
	if w.journal != nil && len(ids) > 0 {
		err = w.journal.Append(ids, now)
	}
	at := now.UnixNano()
	for _, id := range ids {
		switch w.ids.Set(id, Delivered) {
		case Delivered:
			continue // already remembered (an ID settled twice): keep its first record
		case Waiting:
			if waited != nil {
				waited(id)
			}
		}
		w.push(Rec{ID: id, At: at})
	}
	if xerr := w.Expire(now); xerr != nil && err == nil {
		err = xerr
	}
	return err
}

// Add records ids as delivered at now (in the journal first, with one write), and forgets
// what left the window. An error is the journal's: the IDs are remembered in memory anyway.
func (w *Window) Add(ids []uuid.UUID, now time.Time) error {
	if !w.On() || len(ids) == 0 {
		return nil
	}
	return w.Settle(ids, true, now, nil)
}

// Expire forgets the IDs delivered before the window's duration, and compacts the journal
// when it has grown to twice the window.
func (w *Window) Expire(now time.Time) error {
	cutoff := now.Add(-w.dur).UnixNano()
	for w.done.Len() > 0 && w.done.Oldest().At < cutoff {
		w.forgetOldest()
	}
	if w.journal != nil && w.journal.Records > 2*w.max+1024 {
		return w.journal.Rewrite(w.done.All())
	}
	return nil
}

// remember records a delivered ID read from the journal.
func (w *Window) remember(r Rec) {
	if w.ids.Set(r.ID, Delivered) == Delivered {
		return
	}
	w.push(r)
}

func (w *Window) push(r Rec) {
	for w.done.Len() >= w.max {
		w.forgetOldest()
	}
	w.done.Push(r, w.max)
}

func (w *Window) forgetOldest() {
	id := w.done.Pop().ID
	// Only a delivered entry leaves with its record: the ID may be in flight again (it left
	// the window earlier by count and was redelivered) — then it is not the window's.
	w.ids.Remove(id, Delivered, Delivered)
}

// Close frees the window's table (it then remembers nothing) and closes the journal.
func (w *Window) Close() error {
	w.ids.Free()
	w.done = Ring{}
	if w.journal == nil {
		return nil
	}
	return w.journal.Close()
}
