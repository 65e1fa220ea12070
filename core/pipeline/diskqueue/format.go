package diskqueue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// On-disk layout of a queue directory:
//
//	lock                       held (flock) by the process that has the queue open
//	cursor                     what the sink has confirmed, replaced atomically
//	00000000000000000001.seg   segments, named by their id, appended in id order
//
// A segment is a header followed by records:
//
//	segment header (24 bytes): magic "FPQS", format version u16, reserved u16,
//	                           segment id u64, reserved u32, crc32c of the 20 bytes before
//	record header (36 bytes):  magic u32, payload length u32, event count u32,
//	                           sequence u64 (of the record's first event, counted over the
//	                           queue's life), write time i64 (unix ns), payload crc32c u32,
//	                           crc32c of the 32 header bytes before
//	payload:                   the batch in the packed codec (internal/codec), whose first
//	                           byte is the codec's own version
//
// Integers are little endian. The record magic and the header checksum let a reader find the
// next record after damage; the sequence numbers let it count exactly how many events a
// damaged stretch held, when the records around it survive.
const (
	FormatVersion = 1

	segMagic    = "FPQS"
	segHdrSize  = 24
	recMagic    = 0xF10E_5EC0
	recHdrSize  = 36
	curMagic    = "FPQC"
	curSize     = 36
	segSuffix   = ".seg"
	cursorName  = "cursor"
	lockName    = "lock"
	tmpSuffix   = ".tmp"
	maxRecBytes = 1 << 30 // a payload length beyond this is damage, not data
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// recHeader is the fixed part of a record.
type recHeader struct {
	length uint32 // payload bytes
	events uint32
	seq    uint64
	time   int64
	sum    uint32 // payload crc32c
}

func (h *recHeader) size() int64 { return recHdrSize + int64(h.length) }

func putRecHeader(b []byte, h recHeader) {
	binary.LittleEndian.PutUint32(b[0:], recMagic)
	binary.LittleEndian.PutUint32(b[4:], h.length)
	binary.LittleEndian.PutUint32(b[8:], h.events)
	binary.LittleEndian.PutUint64(b[12:], h.seq)
	binary.LittleEndian.PutUint64(b[20:], uint64(h.time))
	binary.LittleEndian.PutUint32(b[28:], h.sum)
	binary.LittleEndian.PutUint32(b[32:], crc(b[:32]))
}

// parseRecHeader decodes a record header; ok is false when it is not one (wrong magic,
// checksum or an impossible length).
func parseRecHeader(b []byte) (h recHeader, ok bool) {
	if len(b) < recHdrSize || binary.LittleEndian.Uint32(b[0:]) != recMagic {
		return h, false
	}
	if crc(b[:32]) != binary.LittleEndian.Uint32(b[32:]) {
		return h, false
	}
	h = recHeader{
		length: binary.LittleEndian.Uint32(b[4:]),
		events: binary.LittleEndian.Uint32(b[8:]),
		seq:    binary.LittleEndian.Uint64(b[12:]),
		time:   int64(binary.LittleEndian.Uint64(b[20:])),
		sum:    binary.LittleEndian.Uint32(b[28:]),
	}
	if h.length == 0 || h.length > maxRecBytes || h.events == 0 {
		return h, false
	}
	return h, true
}

func segHeader(id uint64) []byte {
	b := make([]byte, segHdrSize)
	copy(b, segMagic)
	binary.LittleEndian.PutUint16(b[4:], FormatVersion)
	binary.LittleEndian.PutUint64(b[8:], id)
	binary.LittleEndian.PutUint32(b[20:], crc(b[:20]))
	return b
}

// parseSegHeader checks a segment header against the id in the file's name.
func parseSegHeader(b []byte, id uint64) error {
	if len(b) < segHdrSize {
		return errors.New("shorter than a segment header")
	}
	if string(b[:4]) != segMagic {
		return errors.New("not a queue segment (bad magic)")
	}
	if crc(b[:20]) != binary.LittleEndian.Uint32(b[20:]) {
		return errors.New("segment header checksum mismatch")
	}
	if v := binary.LittleEndian.Uint16(b[4:]); v > FormatVersion {
		return fmt.Errorf("%w: segment format version %d, this build knows %d; upgrade flowpipe to read it", errNewer, v, FormatVersion)
	}
	if got := binary.LittleEndian.Uint64(b[8:]); got != id {
		return fmt.Errorf("segment header names id %d, the file name %d", got, id)
	}
	return nil
}

// errNewer marks a segment written by a newer flowpipe: left alone, never misread.
var errNewer = errors.New("written by a newer flowpipe")

// position is a place in the queue: a segment, an offset in it, and the sequence number of
// the next event there.
type position struct {
	seg uint64
	off int64
	seq uint64
}

func encodeCursor(p position) []byte {
	b := make([]byte, curSize)
	copy(b, curMagic)
	binary.LittleEndian.PutUint16(b[4:], FormatVersion)
	binary.LittleEndian.PutUint64(b[8:], p.seg)
	binary.LittleEndian.PutUint64(b[16:], uint64(p.off))
	binary.LittleEndian.PutUint64(b[24:], p.seq)
	binary.LittleEndian.PutUint32(b[32:], crc(b[:32]))
	return b
}

func decodeCursor(b []byte) (position, error) {
	if len(b) != curSize || string(b[:4]) != curMagic {
		return position{}, errors.New("not a queue cursor")
	}
	if crc(b[:32]) != binary.LittleEndian.Uint32(b[32:]) {
		return position{}, errors.New("cursor checksum mismatch")
	}
	if v := binary.LittleEndian.Uint16(b[4:]); v > FormatVersion {
		return position{}, fmt.Errorf("cursor format version %d is newer than this build knows (%d)", v, FormatVersion)
	}
	return position{
		seg: binary.LittleEndian.Uint64(b[8:]),
		off: int64(binary.LittleEndian.Uint64(b[16:])),
		seq: binary.LittleEndian.Uint64(b[24:]),
	}, nil
}

func segName(id uint64) string { return fmt.Sprintf("%020d%s", id, segSuffix) }

// parseSegName returns the id of a segment file name.
func parseSegName(name string) (uint64, bool) {
	s, ok := strings.CutSuffix(name, segSuffix)
	if !ok || len(s) != 20 {
		return 0, false
	}
	id, err := strconv.ParseUint(s, 10, 64)
	return id, err == nil && id > 0
}

// writeFileAtomic replaces path with data: a temporary file, fsync, rename, fsync of the
// directory, so that a crash leaves either the old content or the new.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + tmpSuffix
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o640)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
