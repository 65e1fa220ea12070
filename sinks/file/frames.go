package file

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/gzip"
)

// A compressed file is a sequence of zstd frames or gzip members, one or more per batch. A
// process killed in the middle of writing one leaves it torn at the end of the file, and a
// later frame appended after it would be unreadable (zstdcat and the replay source stop at
// the torn one). At start the sink therefore finds where the last complete frame ends and
// cuts the file there: what it cuts is part of a batch that was never acknowledged.

var (
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
	gzipMagic = []byte{0x1f, 0x8b, 0x08}
)

// errNotStream is returned when a file does not even start like the stream it should be.
var errNotStream = errors.New("not a stream of this compression")

// completeEnd returns the length of the longest prefix of r (size bytes) made of complete
// frames of the compression; errNotStream when the first bytes are not the start of one.
func completeEnd(r io.ReaderAt, size int64, compression string) (int64, error) {
	var end int64
	for end < size {
		next, err := nextFrame(r, end, size, compression)
		if err != nil {
			return 0, err
		}
		if next == 0 {
			break
		}
		end = next
	}
	if end > 0 || size == 0 {
		return end, nil
	}
	// Nothing complete: a first frame torn by a crash starts with the magic (or a prefix of
	// it); anything else is some other file, which must not be cut to nothing.
	if ok, err := startsLike(r, size, compression); err != nil || !ok {
		return 0, cmp.Or(err, errNotStream)
	}
	return 0, nil
}

// startsLike tells whether r (size bytes) starts as a stream of the compression does: with
// its magic, or with a prefix of it when shorter.
func startsLike(r io.ReaderAt, size int64, compression string) (bool, error) {
	magic := zstdMagic
	if compression == "gzip" {
		magic = gzipMagic
	}
	head := make([]byte, min(int64(len(magic)), size))
	if _, err := r.ReadAt(head, 0); err != nil && !errors.Is(err, io.EOF) {
		return false, err
	}
	return bytes.HasPrefix(magic, head), nil
}

// nextFrame returns where the complete frame (or member) at off ends, 0 when there is none.
func nextFrame(r io.ReaderAt, off, size int64, compression string) (int64, error) {
	if compression == "zstd" {
		return zstdNext(r, off, size)
	}
	return gzipNext(r, off, size)
}

// zstdNext walks a zstd frame by its header and block headers (RFC 8878), reading a few bytes
// per block of up to 128 KiB; a skippable frame counts as complete.
func zstdNext(r io.ReaderAt, off, size int64) (int64, error) {
	var hdr [14]byte
	n, err := r.ReadAt(hdr[:], off)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, err
	}
	h := hdr[:n]
	if len(h) < 4 {
		return 0, nil
	}
	magic := binary.LittleEndian.Uint32(h)
	if magic&0xfffffff0 == 0x184d2a50 { // skippable frame
		if len(h) < 8 {
			return 0, nil
		}
		next := off + 8 + int64(binary.LittleEndian.Uint32(h[4:]))
		if next > size {
			return 0, nil
		}
		return next, nil
	}
	if magic != 0xfd2fb528 || len(h) < 5 {
		return 0, nil
	}
	fhd := h[4]
	if fhd&0x08 != 0 { // reserved bit
		return 0, nil
	}
	single := fhd&0x20 != 0
	hl := int64(5)
	if !single {
		hl++ // window descriptor
	}
	hl += [4]int64{0, 1, 2, 4}[fhd&3]
	switch fhd >> 6 {
	case 0:
		if single {
			hl++
		}
	case 1:
		hl += 2
	case 2:
		hl += 4
	case 3:
		hl += 8
	}
	p := off + hl
	for {
		var bh [3]byte
		if p+3 > size {
			return 0, nil
		}
		if _, err := r.ReadAt(bh[:], p); err != nil {
			return 0, err
		}
		v := uint32(bh[0]) | uint32(bh[1])<<8 | uint32(bh[2])<<16
		last, typ, bsize := v&1 != 0, (v>>1)&3, int64(v>>3)
		switch typ {
		case 1: // RLE: one byte repeated
			bsize = 1
		case 3: // reserved
			return 0, nil
		}
		p += 3 + bsize
		if p > size {
			return 0, nil
		}
		if last {
			break
		}
	}
	if fhd&0x04 != 0 { // content checksum
		p += 4
	}
	if p > size {
		return 0, nil
	}
	return p, nil
}

// gzipExtraID is the subfield of the gzip header's extra field (RFC 1952 2.3.1.1) in which the
// sink records the length of each member it writes, so that a file can be walked member by
// member without decompressing it (as BGZF does with its "BC" subfield); readers ignore it.
var gzipExtraID = [2]byte{'F', 'P'}

// gzipExtraField is the extra field of a member before setGzipLength fills in its length.
var gzipExtraField = []byte{gzipExtraID[0], gzipExtraID[1], 4, 0, 0, 0, 0, 0}

// gzipLengthAt is where the member length sits in a member written with gzipExtraField: the
// 10-byte header, XLEN, the subfield's ID and length.
const gzipLengthAt = 10 + 2 + 4

// setGzipLength writes the length of the member m (written with gzipExtraField) into its header.
func setGzipLength(m []byte) {
	binary.LittleEndian.PutUint32(m[gzipLengthAt:], uint32(len(m)))
}

// gzipNext walks a gzip member: by the length in the sink's extra subfield when it has one,
// else by decompressing it (a file written before the subfield, or by another program).
func gzipNext(r io.ReaderAt, off, size int64) (int64, error) {
	var h [gzipLengthAt + 4]byte
	n, err := r.ReadAt(h[:], off)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, err
	}
	if n < 10 || !bytes.Equal(h[:3], gzipMagic) {
		return 0, nil
	}
	if n == len(h) && h[3]&0x04 != 0 && binary.LittleEndian.Uint16(h[10:]) >= 8 &&
		h[12] == gzipExtraID[0] && h[13] == gzipExtraID[1] && binary.LittleEndian.Uint16(h[14:]) == 4 {
		m := int64(binary.LittleEndian.Uint32(h[gzipLengthAt:]))
		if m < int64(len(h))+8 || off+m > size {
			return 0, nil
		}
		return off + m, nil
	}
	m, err := gzipMemberLen(io.NewSectionReader(r, off, size-off))
	if err != nil {
		return 0, nil //nolint:nilerr // a torn or damaged member ends the complete prefix
	}
	return off + m, nil
}

// gzipMemberLen decompresses the gzip member at the start of r and returns its length.
func gzipMemberLen(r io.Reader) (int64, error) {
	cr := &countingReader{r: r}
	br := bufio.NewReader(cr) // an io.ByteReader: gzip and flate read no further than the member
	z, err := gzip.NewReader(br)
	if err != nil {
		return 0, err
	}
	z.Multistream(false)
	if _, err := io.Copy(io.Discard, z); err != nil {
		return 0, fmt.Errorf("gzip member: %w", err)
	}
	return cr.n - int64(br.Buffered()), nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
