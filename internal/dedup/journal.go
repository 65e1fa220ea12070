// Package dedup keeps the IDs of delivered events for a window of time and count, optionally
// in a journal file so that the window survives a restart. Sources that can receive the same
// event twice (the gRPC receiver after a client's resend, the JetStream and Kafka sources after
// a redelivery) use it to pass each event on once.
package dedup

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/google/uuid"
)

// Journal keeps the IDs of delivered events in a file so that de-duplication survives a
// restart. Each record is 24 bytes: the event ID and the delivery time in Unix nanoseconds
// (big endian). Records are appended with one write per acknowledged batch, before the ACKs
// go to the clients: a record written is in the file even if the process is killed the next
// instant (a write is not lost with the process, only with the machine; the journal is not
// fsynced, because a power loss loses the sinks' unsynced tails too). The file is rewritten
// with only the records still inside the window when it grows to twice the window's size.
type Journal struct {
	path    string
	f       *os.File
	Records int // in the file
	buf     []byte
}

const journalRecord = 24

// Rec is one delivered event: its ID and when it was delivered.
type Rec struct {
	ID uuid.UUID
	At int64 // unix nanos
}

// OpenJournal reads the records of path that are still inside the window (newer than
// cutoff, the last max of them) and opens the file for appending.
func OpenJournal(path string, cutoff int64, max int) (*Journal, []Rec, error) {
	var recs []Rec
	f, err := os.Open(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, nil, fmt.Errorf("dedup state file: %w", err)
	default:
		r := bufio.NewReaderSize(f, 1<<16)
		var rec [journalRecord]byte
		for {
			if _, err := io.ReadFull(r, rec[:]); err != nil {
				// A torn last record (killed mid-write) is ignored.
				break
			}
			at := int64(binary.BigEndian.Uint64(rec[16:]))
			if at < cutoff {
				continue
			}
			recs = append(recs, Rec{ID: uuid.UUID(rec[:16]), At: at})
		}
		f.Close()
		if len(recs) > max {
			recs = recs[len(recs)-max:]
		}
	}
	j := &Journal{path: path}
	if err := j.Rewrite(recs); err != nil {
		return nil, nil, err
	}
	return j, recs, nil
}

// Rewrite replaces the file with recs, atomically, and reopens it for appending.
func (j *Journal) Rewrite(recs []Rec) error {
	tmp := j.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("dedup state file: %w", err)
	}
	w := bufio.NewWriterSize(f, 1<<16)
	var rec [journalRecord]byte
	for _, r := range recs {
		copy(rec[:16], r.ID[:])
		binary.BigEndian.PutUint64(rec[16:], uint64(r.At))
		w.Write(rec[:])
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("dedup state file %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("dedup state file %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("dedup state file %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, j.path); err != nil {
		return fmt.Errorf("dedup state file: %w", err)
	}
	if d, err := os.Open(filepath.Dir(j.path)); err == nil {
		d.Sync()
		d.Close()
	}
	if j.f != nil {
		j.f.Close()
	}
	j.f, err = os.OpenFile(j.path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("dedup state file: %w", err)
	}
	j.Records = len(recs)
	return nil
}

// Append writes ids delivered at at in one write.
func (j *Journal) Append(ids []uuid.UUID, at time.Time) error {
	j.buf = j.buf[:0]
	var rec [journalRecord]byte
	binary.BigEndian.PutUint64(rec[16:], uint64(at.UnixNano()))
	for _, id := range ids {
		copy(rec[:16], id[:])
		j.buf = append(j.buf, rec[:]...)
	}
	if _, err := j.f.Write(j.buf); err != nil {
		return fmt.Errorf("dedup state file %s: %w", j.path, err)
	}
	j.Records += len(ids)
	return nil
}

// Close closes the file.
func (j *Journal) Close() error { return j.f.Close() }
