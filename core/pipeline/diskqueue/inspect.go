package diskqueue

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
	"github.com/flowpipe/flowpipe/internal/lockfile"
)

// Report is what Inspect found in a queue directory.
type Report struct {
	Dir       string
	InUse     bool   // another process holds the queue's lock
	Cursor    string // "segment N offset O" or why it is missing or damaged
	Segments  []SegmentReport
	Ignored   []string // files that are not part of the queue
	Records   int64    // valid records on disk
	Events    int64
	Bytes     int64
	Confirmed int64 // events on disk the sink has already confirmed (deleted soon)
	Pending   int64 // events the sink has not confirmed: delivered at the next start
	// Event times (the events' own timestamps) of the valid records on disk.
	OldestEvent, NewestEvent time.Time
	Damage                   []Damage
	Missing                  []Gap
}

// SegmentReport is one segment file.
type SegmentReport struct {
	File      string
	Bytes     int64
	Records   int64
	Events    int64
	HeaderErr string // a damaged or unknown segment header
	newer     bool
}

// Damage is a stretch of a segment that cannot be delivered.
type Damage struct {
	File   string
	Offset int64
	Bytes  int64
	Events int // -1 when the record header is gone too
	Reason string
}

// Gap is a jump in the event sequence before a record: events that were in the queue and
// are not any more (a segment or records removed, or cut by damage).
type Gap struct {
	File   string
	Offset int64
	Events uint64
}

// Clean reports whether every byte of every segment is a valid record.
func (r *Report) Clean() bool {
	if len(r.Damage) > 0 {
		return false
	}
	for _, s := range r.Segments {
		if s.HeaderErr != "" {
			return false
		}
	}
	return true
}

// Inspect reads a queue directory without changing it: every record's checksums and
// payload are checked. It may run beside the flowpipe that has the queue open (InUse).
func Inspect(dir string) (*Report, error) {
	r := &Report{Dir: dir}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	r.InUse = lockfile.Held(filepath.Join(dir, lockName))
	var cur position
	curOK := false
	if b, err := os.ReadFile(filepath.Join(dir, cursorName)); err == nil {
		if c, err := decodeCursor(b); err == nil {
			cur, curOK = c, true
			r.Cursor = fmt.Sprintf("segment %d offset %d (next event %d)", c.seg, c.off, c.seq)
		} else {
			r.Cursor = "damaged: " + err.Error() + " (flowpipe delivers everything again)"
		}
	} else {
		r.Cursor = "none (nothing confirmed yet)"
	}
	var ids []uint64
	for _, e := range entries {
		if id, ok := parseSegName(e.Name()); ok && e.Type().IsRegular() {
			ids = append(ids, id)
		} else if e.Name() != lockName && e.Name() != cursorName {
			r.Ignored = append(r.Ignored, e.Name())
		}
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	var expect uint64
	if curOK {
		expect = cur.seq
	}
	var buf []byte
	var evs []flow.Event
	for _, id := range ids {
		path := filepath.Join(dir, segName(id))
		sr, err := inspectSegment(r, path, id, cur, curOK, &expect, &buf, &evs)
		if err != nil {
			return nil, err
		}
		r.Segments = append(r.Segments, sr)
	}
	return r, nil
}

func inspectSegment(r *Report, path string, id uint64, cur position, curOK bool, expect *uint64, buf *[]byte, evs *[]flow.Event) (SegmentReport, error) {
	sr := SegmentReport{File: filepath.Base(path)}
	f, err := os.Open(path)
	if err != nil {
		return sr, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return sr, err
	}
	size := st.Size()
	sr.Bytes = size
	r.Bytes += size
	var hb [segHdrSize]byte
	n, _ := f.ReadAt(hb[:], 0)
	if err := parseSegHeader(hb[:n], id); err != nil {
		sr.HeaderErr = err.Error()
		sr.newer = errors.Is(err, errNewer)
		if sr.newer {
			return sr, nil // not ours to read
		}
	}
	confirmedBefore := func(off int64) bool {
		return curOK && (id < cur.seg || id == cur.seg && off < cur.off)
	}
	for off := int64(segHdrSize); off < size; {
		kind, h, next, err := scanAt(f, off, size, buf)
		switch {
		case kind == recOK && err == nil:
			var derr error
			*evs, derr = codec.Decode((*evs)[:0], *buf, int(h.events))
			if derr != nil {
				r.Damage = append(r.Damage, Damage{File: sr.File, Offset: off, Bytes: next - off, Events: int(h.events), Reason: derr.Error()})
				break
			}
			sr.Records++
			sr.Events += int64(h.events)
			r.Records++
			r.Events += int64(h.events)
			if confirmedBefore(off) {
				r.Confirmed += int64(h.events)
			} else {
				r.Pending += int64(h.events)
				if *expect != 0 && h.seq > *expect {
					r.Missing = append(r.Missing, Gap{File: sr.File, Offset: off, Events: h.seq - *expect})
				}
				*expect = h.seq + uint64(h.events)
			}
			for i := range *evs {
				t := (*evs)[i].Timestamp.Time()
				if r.OldestEvent.IsZero() || t.Before(r.OldestEvent) {
					r.OldestEvent = t
				}
				if t.After(r.NewestEvent) {
					r.NewestEvent = t
				}
			}
		case kind == recOK || kind == recBadPayload:
			reason := "payload checksum mismatch"
			if err != nil {
				reason = err.Error()
			}
			r.Damage = append(r.Damage, Damage{File: sr.File, Offset: off, Bytes: next - off, Events: int(h.events), Reason: reason})
			if !confirmedBefore(off) {
				if *expect != 0 && h.seq > *expect {
					r.Missing = append(r.Missing, Gap{File: sr.File, Offset: off, Events: h.seq - *expect})
				}
				*expect = h.seq + uint64(h.events)
			}
		case kind == recTorn:
			r.Damage = append(r.Damage, Damage{File: sr.File, Offset: off, Bytes: next - off, Events: int(h.events), Reason: "record cut short (torn tail)"})
		default:
			reason := "no valid record header"
			if err != nil {
				reason = err.Error()
			}
			r.Damage = append(r.Damage, Damage{File: sr.File, Offset: off, Bytes: next - off, Events: -1, Reason: reason})
		}
		off = next
	}
	return sr, nil
}

func leUint32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}
func leUint16(b []byte) uint16 { return uint16(b[0]) | uint16(b[1])<<8 }

// Repair rewrites every damaged segment with only its valid records (each written to a
// temporary file, fsynced and renamed over the old one), and removes segments left with no
// record. It needs the queue's lock: flowpipe must not be running on it. Segments written
// by a newer flowpipe are left alone. It returns the report of what it found before.
func Repair(dir string) (*Report, error) {
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlockDir(lock)
	rep, err := Inspect(dir)
	if err != nil {
		return nil, err
	}
	rep.InUse = false
	damaged := map[string]bool{}
	for _, d := range rep.Damage {
		damaged[d.File] = true
	}
	for _, s := range rep.Segments {
		if s.newer || !damaged[s.File] && s.HeaderErr == "" {
			continue
		}
		id, _ := parseSegName(s.File)
		if err := rewriteSegment(filepath.Join(dir, s.File), id); err != nil {
			return rep, fmt.Errorf("repair %s: %w", s.File, err)
		}
	}
	for _, name := range rep.Ignored {
		if filepath.Ext(name) == tmpSuffix {
			os.Remove(filepath.Join(dir, name))
		}
	}
	return rep, syncDir(dir)
}

func rewriteSegment(path string, id uint64) error {
	in, err := os.Open(path)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	tmp := path + tmpSuffix
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o640)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	kept := 0
	w := segHeader(id)
	var buf []byte
	var evs []flow.Event
	for off := int64(segHdrSize); off < st.Size(); {
		kind, h, next, err := scanAt(in, off, st.Size(), &buf)
		if kind == recOK && err == nil {
			if _, derr := codec.Decode(evs[:0], buf, int(h.events)); derr == nil {
				hb := make([]byte, recHdrSize)
				putRecHeader(hb, h)
				w = append(append(w, hb...), buf...)
				kept++
			}
		}
		off = next
		if len(w) > 4<<20 {
			if _, err := out.Write(w); err != nil {
				out.Close()
				return err
			}
			w = w[:0]
		}
	}
	if _, err := out.Write(w); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	if kept == 0 {
		return os.Remove(path)
	}
	return os.Rename(tmp, path)
}

// Pending counts the events a queue directory holds that the sink has not confirmed, from
// the record headers alone (no payload is read or checked): cheap enough to poll.
func Pending(dir string) (int64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var cur position
	curOK := false
	if b, err := os.ReadFile(filepath.Join(dir, cursorName)); err == nil {
		cur, err = decodeCursor(b)
		curOK = err == nil
	}
	var n int64
	for _, e := range entries {
		id, ok := parseSegName(e.Name())
		if !ok || curOK && id < cur.seg {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // deleted meanwhile
		}
		st, err := f.Stat()
		if err == nil {
			for off := int64(segHdrSize); off < st.Size(); {
				kind, h, next, err := scanAt(f, off, st.Size(), nil)
				if err != nil {
					break
				}
				if kind == recOK && (!curOK || id > cur.seg || off >= cur.off) {
					n += int64(h.events)
				}
				off = next
			}
		}
		f.Close()
	}
	return n, nil
}
