package ipfix

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// A test-only IPFIX decoder: enough of RFC 7011 to read back what the sink sends, so that
// the tests can check every element, including the enterprise-specific ones no Debian
// collector decodes.

type fieldKey struct {
	pen uint32
	id  uint16
}

type decoded struct {
	header struct {
		length       uint16
		exportTime   uint32
		seq          uint32
		domain       uint32
		dataRecords  int
		templateSets int
	}
	records []record
}

type record struct {
	template uint16
	values   map[fieldKey][]byte
}

func (r record) uint(pen uint32, id uint16) uint64 {
	v := r.values[fieldKey{pen, id}]
	var n uint64
	for _, b := range v {
		n = n<<8 | uint64(b)
	}
	return n
}

func (r record) addr(id uint16) netip.Addr {
	a, _ := netip.AddrFromSlice(r.values[fieldKey{0, id}])
	return a
}

type tfield struct {
	key  fieldKey
	size uint16
}

// decoder keeps the templates of one transport session.
type decoder struct {
	templates map[uint16][]tfield
}

func newDecoder() *decoder { return &decoder{templates: map[uint16][]tfield{}} }

// message decodes one message from b and returns it and the rest of b.
func (d *decoder) message(b []byte) (*decoded, []byte, error) {
	if len(b) < headerLen {
		return nil, nil, fmt.Errorf("short header: %d bytes", len(b))
	}
	if v := binary.BigEndian.Uint16(b); v != version {
		return nil, nil, fmt.Errorf("version %d", v)
	}
	b = append([]byte(nil), b...) // records point into it; the caller reuses its buffer
	m := &decoded{}
	m.header.length = binary.BigEndian.Uint16(b[2:])
	m.header.exportTime = binary.BigEndian.Uint32(b[4:])
	m.header.seq = binary.BigEndian.Uint32(b[8:])
	m.header.domain = binary.BigEndian.Uint32(b[12:])
	if int(m.header.length) > len(b) || m.header.length < headerLen {
		return nil, nil, fmt.Errorf("length %d of %d bytes", m.header.length, len(b))
	}
	body, rest := b[headerLen:m.header.length], b[m.header.length:]
	for len(body) > 0 {
		if len(body) < setHeaderLen {
			return nil, nil, fmt.Errorf("short set header")
		}
		id, n := binary.BigEndian.Uint16(body), int(binary.BigEndian.Uint16(body[2:]))
		if n < setHeaderLen || n > len(body) {
			return nil, nil, fmt.Errorf("set length %d", n)
		}
		set := body[setHeaderLen:n]
		body = body[n:]
		switch {
		case id == templateSetID:
			m.header.templateSets++
			for len(set) >= 4 {
				tid, count := binary.BigEndian.Uint16(set), int(binary.BigEndian.Uint16(set[2:]))
				set = set[4:]
				var fs []tfield
				for range count {
					fid, size := binary.BigEndian.Uint16(set), binary.BigEndian.Uint16(set[2:])
					set = set[4:]
					k := fieldKey{id: fid &^ 0x8000}
					if fid&0x8000 != 0 {
						k.pen = binary.BigEndian.Uint32(set)
						set = set[4:]
					}
					fs = append(fs, tfield{k, size})
				}
				d.templates[tid] = fs
			}
		case id >= 256:
			fs, ok := d.templates[id]
			if !ok {
				return nil, nil, fmt.Errorf("data set %d before its template", id)
			}
			for len(set) > 0 {
				r := record{template: id, values: make(map[fieldKey][]byte, len(fs))}
				for _, f := range fs {
					size := int(f.size)
					if f.size == varLen {
						size = int(set[0])
						set = set[1:]
						if size == 255 {
							size = int(binary.BigEndian.Uint16(set))
							set = set[2:]
						}
					}
					if size > len(set) {
						return nil, nil, fmt.Errorf("record cut short")
					}
					r.values[f.key] = set[:size]
					set = set[size:]
				}
				m.records = append(m.records, r)
				m.header.dataRecords++
			}
		default:
			return nil, nil, fmt.Errorf("set ID %d", id)
		}
	}
	return m, rest, nil
}
