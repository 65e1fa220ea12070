package conntrack

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/nftables"

	"github.com/flowpipe/flowpipe/internal/netns"
)

// What the source changes on the host (the sysctls and the nftables table) is recorded in a
// file under its state directory before it is changed, and the file is removed once the
// change is undone. A source killed before it could undo (kill -9, a crash, a power cut)
// finds the record when it starts again and puts the host back first, so that it never takes
// its own leftovers for the host's settings.

// hostRecord is the content of the record file.
type hostRecord struct {
	NetNS   string           `json:"netns"`    // as configured ("" is flowpipe's own)
	NSID    string           `json:"netns_id"` // the namespace itself (netns.NS.ID)
	Table   string           `json:"nft_table,omitempty"`
	Sysctls []recordedSysctl `json:"sysctls,omitempty"`
}

type recordedSysctl struct {
	Path string `json:"path"`
	Prev string `json:"prev"` // the host's value before the source changed it
}

const hostRecordFile = "host-changes.json"

// stateDir is the source's state directory, "" when the pipeline has no data directory (a
// component built outside flowpipe): then nothing is recorded.
func (s *Source) stateDir() string {
	if s.env.DataDir == "" {
		return ""
	}
	name := s.env.Name
	if name == "" {
		name = "conntrack"
	}
	return filepath.Join(s.env.DataDir, "conntrack", name)
}

func (s *Source) recordPath() string {
	if d := s.stateDir(); d != "" {
		return filepath.Join(d, hostRecordFile)
	}
	return ""
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

// restoreLeftovers undoes what a previous run recorded and did not undo, in the namespace
// it was made in (if that still exists), then removes the record.
func (s *Source) restoreLeftovers() error {
	path := s.recordPath()
	if path == "" {
		return nil
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read the record of host changes %s: %w", path, err)
	}
	var rec hostRecord
	if err := json.Unmarshal(data, &rec); err != nil {
		// Written atomically, so only damage gets here; nothing in it can be trusted.
		s.log.Error("the record of host changes is damaged; not restoring from it", "file", path, "error", err)
		return os.Remove(path)
	}
	ns, owned, gone, err := s.recordNS(&rec)
	if err != nil {
		return err
	}
	if gone {
		s.log.Warn("the network namespace a previous run changed is gone; nothing to restore", "netns", rec.NetNS, "file", path)
		return os.Remove(path)
	}
	if owned {
		defer ns.Close()
	}
	var errs []error
	if rec.Table != "" {
		a := &activation{ns: ns, table: &nftables.Table{Name: rec.Table, Family: nftables.TableFamilyINet}}
		if err := a.remove(); err != nil {
			errs = append(errs, err)
		}
	}
	for i := len(rec.Sysctls) - 1; i >= 0; i-- {
		c := &sysctlChange{path: rec.Sysctls[i].Path, prev: []byte(rec.Sysctls[i].Prev)}
		if err := c.restore(ns); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("restore what a previous run changed on the host (%s): %w", path, errors.Join(errs...))
	}
	s.log.Warn("a previous run did not stop cleanly; restored what it had changed on the host",
		"netns", ns.String(), "nft_table", rec.Table, "sysctls", len(rec.Sysctls), "file", path)
	return os.Remove(path)
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

// removeRecord is called once everything recorded has been undone.
func (s *Source) removeRecord() error {
	path := s.recordPath()
	if path == "" {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove the record of host changes: %w", err)
	}
	return nil
}
