package diskqueue

import (
	"bytes"
	"encoding/binary"
	"io"
	"os"
)

// What scanAt found at an offset.
type scanKind int

const (
	recOK         scanKind = iota // a whole record whose checksums match
	recBadPayload                 // a valid header, but the payload's checksum is wrong
	recTorn                       // a valid header whose record runs past the end
	recGarbage                    // no record header here; next is where one starts, or the end
	recEnd                        // off is the end
)

// scanAt reads the record at off in f, which holds valid data up to limit. With payload
// non-nil it reads and checks the payload into *payload (grown as needed); otherwise only
// the header is read. next is where the following record (or damaged stretch) starts.
func scanAt(f *os.File, off, limit int64, payload *[]byte) (kind scanKind, h recHeader, next int64, err error) {
	if off >= limit {
		return recEnd, h, off, nil
	}
	var hb [recHdrSize]byte
	if limit-off < recHdrSize {
		next, err := resync(f, off+1, limit)
		return recGarbage, h, next, err
	}
	if _, err := f.ReadAt(hb[:], off); err != nil {
		return recGarbage, h, limit, err
	}
	h, ok := parseRecHeader(hb[:])
	if !ok {
		next, err := resync(f, off+1, limit)
		return recGarbage, h, next, err
	}
	end := off + h.size()
	if end > limit {
		return recTorn, h, limit, nil
	}
	if payload == nil {
		return recOK, h, end, nil
	}
	if cap(*payload) < int(h.length) {
		*payload = make([]byte, h.length)
	}
	*payload = (*payload)[:h.length]
	if _, err := f.ReadAt(*payload, off+recHdrSize); err != nil {
		return recBadPayload, h, end, err
	}
	if crc(*payload) != h.sum {
		return recBadPayload, h, end, nil
	}
	return recOK, h, end, nil
}

// resync finds the next offset at or after from where a valid record header starts, or
// limit when there is none.
func resync(f *os.File, from, limit int64) (int64, error) {
	var magic [4]byte
	binary.LittleEndian.PutUint32(magic[:], recMagic)
	buf := make([]byte, 64<<10)
	for from < limit {
		n := min(int64(len(buf)), limit-from)
		m, err := f.ReadAt(buf[:n], from)
		if err != nil && err != io.EOF {
			return limit, err
		}
		if m == 0 {
			return limit, nil
		}
		chunk := buf[:m]
		for i := 0; ; {
			j := bytes.Index(chunk[i:], magic[:])
			if j < 0 {
				break
			}
			at := from + int64(i+j)
			var hb [recHdrSize]byte
			if limit-at >= recHdrSize {
				if _, err := f.ReadAt(hb[:], at); err == nil {
					if _, ok := parseRecHeader(hb[:]); ok {
						return at, nil
					}
				}
			}
			i += j + 1
		}
		// Keep the last few bytes: a magic may straddle the chunk boundary.
		if int64(m) < n || from+int64(m) >= limit {
			from += int64(m)
			continue
		}
		from += int64(m) - 3
	}
	return limit, nil
}
