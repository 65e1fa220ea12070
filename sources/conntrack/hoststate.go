package conntrack

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/nftables"

	"github.com/flowpipe/flowpipe/internal/lockfile"
	"github.com/flowpipe/flowpipe/internal/netns"
)

// What the source changes on the host (the sysctls and the nftables table) is recorded in a
// file under its state directory before it is changed, and the file is removed once the
// change is undone. A source killed before it could undo (kill -9, a crash, a power cut)
// finds the record when it starts again and puts the host back first, so that it never takes
// its own leftovers for the host's settings.
//
// Each running instance has its own record (host-changes-<id>.json) and its own nftables
// table, and holds a lock (flock on host-changes-<id>.lock) while it runs, which the kernel
// drops when its process dies however it dies. Several instances can run at once: two
// sources reading one namespace, and above all a source and the instance that replaces it
// in a reload (they overlap, so that nothing is missed between them). So:
//   - a record whose lock is free is a leftover, and is undone; a record whose lock is held
//     belongs to a live instance and is left alone (a replacement must not take the running
//     instance's changes for leftovers and undo them under it);
//   - a sysctl is shared by everything in its namespace: every instance records the sysctls
//     it needs, with the value before flowpipe when it was the one that changed it. An
//     instance that stops (or a leftover being undone) whose sysctl another live instance
//     in the same namespace still needs does not put it back: it hands the value to put back
//     to that instance's record instead, so the last one to stop restores the host's own.
// All of this runs under one lock of the data directory's conntrack directory (.lock).

// hostRecord is the content of the record file.
type hostRecord struct {
	NetNS   string           `json:"netns"`    // as configured ("" is flowpipe's own)
	NSID    string           `json:"netns_id"` // the namespace itself (netns.NS.ID)
	Table   string           `json:"nft_table,omitempty"`
	Sysctls []recordedSysctl `json:"sysctls,omitempty"`
}

type recordedSysctl struct {
	Path string `json:"path"`
	// Prev is the host's value before flowpipe changed it, to put back when the last
	// instance that needs the sysctl stops; "" when the sysctl was 1 already (the host's
	// own setting, or another instance's, which then holds the value to put back).
	Prev string `json:"prev,omitempty"`
}

const (
	hostRecordFile   = "host-changes.json" // a record of a version before per-instance records
	hostRecordPrefix = "host-changes"
)

// conntrackDir is the conntrack sources' directory under the data directory, "" when the
// pipeline has none (a component built outside flowpipe): then nothing is recorded.
func (s *Source) conntrackDir() string {
	if s.env.DataDir == "" {
		return ""
	}
	return filepath.Join(s.env.DataDir, "conntrack")
}

// stateDir is the source's state directory, "" without a data directory.
func (s *Source) stateDir() string {
	d := s.conntrackDir()
	if d == "" {
		return ""
	}
	name := s.env.Name
	if name == "" {
		name = "conntrack"
	}
	return filepath.Join(d, name)
}

// recordPath is this instance's record, "" without a data directory.
func (s *Source) recordPath() string {
	if d := s.stateDir(); d != "" {
		return filepath.Join(d, hostRecordPrefix+"-"+s.id+".json")
	}
	return ""
}

func lockPathOf(record string) string {
	if filepath.Base(record) == hostRecordFile {
		return "" // an older version's: it held no lock
	}
	return strings.TrimSuffix(record, ".json") + ".lock"
}

// lockHost takes the conntrack directory's lock, under which records are read, written and
// undone; the returned function releases it.
func (s *Source) lockHost() (func(), error) {
	d := s.conntrackDir()
	if d == "" {
		return func() {}, nil
	}
	if err := os.MkdirAll(d, 0o750); err != nil {
		return nil, fmt.Errorf("record host changes: %w (check data_dir)", err)
	}
	f, err := lockfile.Lock(filepath.Join(d, ".lock"), true)
	if err != nil {
		return nil, fmt.Errorf("record host changes: %w (check data_dir)", err)
	}
	return func() { lockfile.Unlock(f) }, nil
}

// holdRecordLock takes this instance's own lock, held until Close (s.lock).
func (s *Source) holdRecordLock() error {
	path := lockPathOf(s.recordPath())
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return fmt.Errorf("record host changes: %w", err)
	}
	f, err := lockfile.Lock(path, false)
	if err != nil {
		return fmt.Errorf("record host changes: %w", err)
	}
	s.lock = f
	return nil
}

// live reports whether the instance that wrote record runs: its lock is held.
func live(record string) bool {
	lp := lockPathOf(record)
	if lp == "" {
		return false
	}
	return lockfile.Held(lp)
}

// writeRecord stores rec durably (written to a temporary file, synced, renamed).
func writeRecord(path string, rec *hostRecord) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return fmt.Errorf("record host changes: %w", err)
	}
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("record host changes: %w", err)
	}
	_, err = f.Write(append(data, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("record host changes in %s: %w", path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// recordFile is a record on disk.
type recordFile struct {
	path string
	rec  hostRecord
}

// records reads every record in the conntrack directory (of every source), except this
// instance's own. A damaged one (written atomically, so only damage gets here) is removed:
// nothing in it can be trusted.
func (s *Source) records() ([]recordFile, error) {
	d := s.conntrackDir()
	if d == "" {
		return nil, nil
	}
	paths, err := filepath.Glob(filepath.Join(d, "*", hostRecordPrefix+"*.json"))
	if err != nil {
		return nil, err
	}
	own := s.recordPath()
	var out []recordFile
	for _, p := range paths {
		if p == own {
			continue
		}
		data, err := os.ReadFile(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read the record of host changes %s: %w", p, err)
		}
		var rec hostRecord
		if err := json.Unmarshal(data, &rec); err != nil {
			s.log.Error("the record of host changes is damaged; not restoring from it", "file", p, "error", err)
			os.Remove(p)
			continue
		}
		out = append(out, recordFile{path: p, rec: rec})
	}
	return out, nil
}

// handOver gives the value to put back of a sysctl that the record's owner changed to a
// live instance in the same namespace that still needs it; false when there is none, and
// the caller puts it back itself.
func handOver(others []recordFile, nsid string, sc recordedSysctl) (bool, error) {
	for i := range others {
		o := &others[i]
		if o.rec.NSID != nsid || !live(o.path) {
			continue
		}
		for j := range o.rec.Sysctls {
			if o.rec.Sysctls[j].Path != sc.Path {
				continue
			}
			if o.rec.Sysctls[j].Prev == "" {
				o.rec.Sysctls[j].Prev = sc.Prev
				if err := writeRecord(o.path, &o.rec); err != nil {
					return false, err
				}
			}
			return true, nil
		}
	}
	return false, nil
}

// undo undoes what rec records, in namespace ns: the table, and each sysctl no live instance
// still needs (handed over to one that does). others are the other records.
func undo(ns *netns.NS, rec *hostRecord, others []recordFile) error {
	var errs []error
	if rec.Table != "" {
		a := &activation{ns: ns, table: &nftables.Table{Name: rec.Table, Family: nftables.TableFamilyINet}}
		if err := a.remove(); err != nil {
			errs = append(errs, err)
		}
	}
	for i := len(rec.Sysctls) - 1; i >= 0; i-- {
		sc := rec.Sysctls[i]
		if sc.Prev == "" {
			continue
		}
		handed, err := handOver(others, rec.NSID, sc)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if handed {
			continue
		}
		c := &sysctlChange{path: sc.Path, prev: []byte(sc.Prev)}
		if err := c.restore(ns); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// restoreLeftovers undoes what instances that are gone recorded and did not undo, in the
// namespace each was made in (if that still exists), then removes their records. Records
// of instances that run are left alone. Called under lockHost.
func (s *Source) restoreLeftovers() error {
	recs, err := s.records()
	if err != nil {
		return err
	}
	for i, r := range recs {
		if live(r.path) {
			continue
		}
		ns, owned, gone, err := s.recordNS(&r.rec)
		if err != nil {
			return err
		}
		if gone {
			s.log.Warn("the network namespace a previous run changed is gone; nothing to restore", "netns", r.rec.NetNS, "file", r.path)
			removeRecordFiles(r.path)
			continue
		}
		others := append(append([]recordFile(nil), recs[:i]...), recs[i+1:]...)
		err = undo(ns, &r.rec, others)
		if owned {
			ns.Close()
		}
		if err != nil {
			return fmt.Errorf("restore what a previous run changed on the host (%s): %w", r.path, err)
		}
		s.log.Warn("a previous run did not stop cleanly; restored what it had changed on the host",
			"netns", ns.String(), "nft_table", r.rec.Table, "sysctls", len(r.rec.Sysctls), "file", r.path)
		removeRecordFiles(r.path)
	}
	return nil
}

func removeRecordFiles(record string) {
	os.Remove(record)
	if lp := lockPathOf(record); lp != "" {
		os.Remove(lp)
	}
}

// recordNS finds the namespace a record was made in: the source's own when it is the same
// namespace, else the one the record names if it is still that namespace (owned: the caller
// closes it), else gone.
func (s *Source) recordNS(rec *hostRecord) (ns *netns.NS, owned, gone bool, err error) {
	id, err := s.ns.ID()
	if err != nil {
		return nil, false, false, err
	}
	if id == rec.NSID {
		return s.ns, false, false, nil
	}
	other, err := netns.Open(rec.NetNS)
	if err != nil {
		return nil, false, true, nil
	}
	if oid, err := other.ID(); err != nil || oid != rec.NSID {
		other.Close()
		return nil, false, true, nil
	}
	return other, true, false, nil
}

// undoRecorded undoes this instance's own changes at Close, as its record (which another
// instance may have handed a value to put back to) says, then removes the record and
// releases its lock. On an error the record stays, and the next start tries again.
func (s *Source) undoRecorded() error {
	defer func() {
		if s.lock != nil {
			s.lock.Close() // a leftover now, if the record is still there
			s.lock = nil
		}
	}()
	unlock, err := s.lockHost()
	if err != nil {
		return err
	}
	defer unlock()
	path := s.recordPath()
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read the record of host changes %s: %w", path, err)
	}
	var rec hostRecord
	if err := json.Unmarshal(data, &rec); err != nil {
		return fmt.Errorf("read the record of host changes %s: %w", path, err)
	}
	others, err := s.records()
	if err != nil {
		return err
	}
	if err := undo(s.ns, &rec, others); err != nil {
		return err
	}
	removeRecordFiles(path)
	return nil
}
