package file

import (
	"encoding/binary"
	"math/bits"
	"sync"

	"github.com/cespare/xxhash/v2"
	"github.com/klauspost/compress/huff0"
)

// linesEncoder is a zstd encoder of the sink's own (compression_level: lines) for what the
// sink writes: JSON lines whose keys come in the same order line after line. A general
// encoder looks for matches at every position; this one looks only at field boundaries (the
// position after a ',' and the start of a line), where it finds the same key in an earlier
// line through a small table of the last position each 8-byte prefix was seen at, and
// extends the match as far as the bytes agree (usually through the key and any value equal
// to the earlier line's, often across several fields and into the next line). What does not
// match is literals up to the next boundary. The literals are Huffman-coded (huff0, as
// zstd's own encoder does) and the sequences written with zstd's predefined FSE tables, so
// no table is built or described per block.
//
// The output is a standard zstd frame (RFC 8878): a window of 128 KiB, blocks of at most
// 128 KiB, a content checksum; any zstd decoder reads it. Every match is checked byte for
// byte before it is used, so any input (not only JSON lines) comes back exactly; input
// without that structure just compresses worse. TestLinesEncoderRoundTrip and
// FuzzLinesEncoder decode what it writes with klauspost's decoder and the zstd program.
type linesEncoder struct {
	// Per hash of 8 bytes at a boundary: the last two positions + 1 (0: none). 32 bits: in a
	// part of more than 4 GiB a position wraps, and a candidate not before i is refused.
	table [1 << linesTableBits][2]uint32
	lits  []byte
	seqs  []lineSeq
	block []byte
	huf   huff0.Scratch
	rep   [3]uint32 // the repeated offsets, as the decoder will have them
}

// lineSeq is a zstd sequence: litLen literals, then matchLen bytes from offBase-3 bytes back
// (offBase 1-3: a repeated offset, RFC 8878 3.1.2.5).
type lineSeq struct{ litLen, matchLen, offBase uint32 }

const (
	linesTableBits = 12
	linesBlockMax  = 128 << 10 // zstd's largest block, and the window this encoder declares
	linesMaxOffset = 64 << 10  // how far back a match may reach (well inside the window)
	linesMinMatch  = 8         // the bytes hashed and compared at a boundary
)

var linesEncoders = sync.Pool{New: func() any {
	e := &linesEncoder{}
	e.huf.Reuse = huff0.ReusePolicyNone
	return e
}}

// linesEncodeAll appends src to dst as one zstd frame.
func linesEncodeAll(src, dst []byte) []byte {
	e := linesEncoders.Get().(*linesEncoder)
	defer linesEncoders.Put(e)
	return e.encodeAll(src, dst)
}

func (e *linesEncoder) encodeAll(src, dst []byte) []byte {
	clear(e.table[:])
	e.rep = [3]uint32{1, 4, 8}
	// Magic; frame header descriptor: content checksum, no content size, not single
	// segment; window descriptor: 2^(10+7) = 128 KiB.
	dst = append(dst, 0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x38)
	if len(src) == 0 {
		dst = appendBlockHeader(dst, true, blockRaw, 0)
	}
	for start := 0; start < len(src); start += linesBlockMax {
		end := min(start+linesBlockMax, len(src))
		dst = e.encodeBlock(dst, src, start, end, end == len(src))
	}
	return binary.LittleEndian.AppendUint32(dst, uint32(xxhash.Sum64(src)))
}

const (
	blockRaw        = 0
	blockCompressed = 2
)

func appendBlockHeader(dst []byte, last bool, typ, size int) []byte {
	v := uint32(size)<<3 | uint32(typ)<<1
	if last {
		v |= 1
	}
	return append(dst, byte(v), byte(v>>8), byte(v>>16))
}

// encodeBlock appends src[start:end] as one block; matches may reach back before start.
func (e *linesEncoder) encodeBlock(dst, src []byte, start, end int, last bool) []byte {
	rep := e.rep
	e.findSequences(src, start, end)
	if len(e.seqs) == 0 {
		dst = appendBlockHeader(dst, last, blockRaw, end-start)
		return append(dst, src[start:end]...)
	}
	b := e.appendLiterals(e.block[:0])
	b = e.appendSequences(b)
	e.block = b
	if len(b) >= end-start {
		e.rep = rep // a raw block leaves the decoder's repeated offsets as they were
		dst = appendBlockHeader(dst, last, blockRaw, end-start)
		return append(dst, src[start:end]...)
	}
	dst = appendBlockHeader(dst, last, blockCompressed, len(b))
	return append(dst, b...)
}

// findSequences fills e.seqs and e.lits for src[start:end]. At each boundary it tries the
// last two positions seen with the same 8 bytes (two, because lines of two kinds often
// alternate: starts and ends) and takes the longer match, extended backwards over the
// literals before it as far as the bytes agree.
func (e *linesEncoder) findSequences(src []byte, start, end int) {
	e.seqs, e.lits = e.seqs[:0], e.lits[:0]
	i, litStart := start, start
	for i+linesMinMatch <= end {
		if i == 0 || src[i-1] == ',' || src[i-1] == '\n' {
			v := binary.LittleEndian.Uint64(src[i:])
			h := (v * 0x9E3779B185EBCA87) >> (64 - linesTableBits)
			b := &e.table[h]
			c0, c1 := int(b[0])-1, int(b[1])-1
			b[0], b[1] = uint32(i+1), b[0]
			c, m := -1, 0
			if c0 >= 0 && c0 < i && i-c0 <= linesMaxOffset && binary.LittleEndian.Uint64(src[c0:]) == v {
				c, m = c0, linesMinMatch+matchLen(src[c0+linesMinMatch:], src[i+linesMinMatch:end])
			}
			// The older one can only be longer if it agrees where the newer one stopped.
			if c1 >= 0 && c1 < i && i-c1 <= linesMaxOffset && (m == 0 || i+m < end && src[c1+m] == src[i+m]) &&
				binary.LittleEndian.Uint64(src[c1:]) == v {
				if m1 := linesMinMatch + matchLen(src[c1+linesMinMatch:], src[i+linesMinMatch:end]); m1 > m {
					c, m = c1, m1
				}
			}
			if c >= 0 {
				// Back over the literals (a value's end, the comma) while they agree.
				j := i - matchLenBack(src, i, c, min(i-litStart, c))
				c -= i - j
				m += i - j
				e.lits = append(e.lits, src[litStart:j]...)
				e.seqs = append(e.seqs, lineSeq{litLen: uint32(j - litStart), matchLen: uint32(m), offBase: e.offBase(uint32(j-litStart), uint32(j-c))})
				i = j + m
				litStart = i
				continue
			}
		}
		i = nextBoundary(src, i, end)
	}
	e.lits = append(e.lits, src[litStart:end]...)
}

// offBase returns the offset code of a match off bytes back after litLen literals, a
// repeated offset when it is one, and updates the repeated offsets as the decoder will.
func (e *linesEncoder) offBase(litLen, off uint32) uint32 {
	r := &e.rep
	switch {
	case litLen > 0 && off == r[0]:
		return 1
	case litLen > 0 && off == r[1]:
		r[0], r[1] = r[1], r[0]
		return 2
	case litLen == 0 && off == r[1]:
		r[0], r[1] = r[1], r[0]
		return 1
	}
	r[0], r[1], r[2] = off, r[0], r[1]
	return off + 3
}

// nextBoundary returns the position after the first ',' or '\n' at or after i (end if none),
// eight bytes at a time: a byte of x is zero where it was the one looked for.
func nextBoundary(src []byte, i, end int) int {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	for ; i+8 <= end; i += 8 {
		x := binary.LittleEndian.Uint64(src[i:])
		c, n := x^(','*ones), x^('\n'*ones)
		// The lowest flagged byte is exact (the borrow only flags bytes above a zero one).
		if t := ((c - ones) &^ c & highs) | ((n - ones) &^ n & highs); t != 0 {
			return i + bits.TrailingZeros64(t)>>3 + 1
		}
	}
	for ; i < end; i++ {
		if src[i] == ',' || src[i] == '\n' {
			return i + 1
		}
	}
	return end
}

// matchLen is the length of the common prefix of a and b.
func matchLen(a, b []byte) int {
	n := min(len(a), len(b))
	a, b = a[:n], b[:n]
	i := 0
	for ; i+8 <= n; i += 8 {
		if x := binary.LittleEndian.Uint64(a[i:]) ^ binary.LittleEndian.Uint64(b[i:]); x != 0 {
			return i + bits.TrailingZeros64(x)>>3
		}
	}
	for ; i < n && a[i] == b[i]; i++ {
	}
	return i
}

// matchLenBack is how many bytes before src[i] and before src[c] agree, at most limit.
func matchLenBack(src []byte, i, c, limit int) int {
	n := 0
	for n < limit {
		if c-n < 8 {
			for n < limit && src[i-n-1] == src[c-n-1] {
				n++
			}
			return n
		}
		if x := binary.LittleEndian.Uint64(src[i-n-8:]) ^ binary.LittleEndian.Uint64(src[c-n-8:]); x != 0 {
			return min(limit, n+bits.LeadingZeros64(x)>>3)
		}
		n += 8
	}
	return min(n, limit)
}

// appendLiterals appends the literals section: Huffman-coded when that is smaller, else raw.
func (e *linesEncoder) appendLiterals(b []byte) []byte {
	lits := e.lits
	var out []byte
	var err error
	single := len(lits) < 1024
	switch {
	case len(lits) <= 16:
		err = huff0.ErrIncompressible
	case single:
		out, _, err = huff0.Compress1X(lits, &e.huf)
	default:
		out, _, err = huff0.Compress4X(lits, &e.huf)
	}
	if err == nil {
		hdr := literalsHeaderSize(len(out), len(lits))
		if hdr+len(out) < len(lits) {
			return append(appendCompressedLiteralsHeader(b, len(out), len(lits), single), out...)
		}
	}
	if err == huff0.ErrUseRLE {
		return append(appendRawLiteralsHeader(b, 1, len(lits)), lits[0])
	}
	return append(appendRawLiteralsHeader(b, 0, len(lits)), lits...)
}

func literalsHeaderSize(comp, regen int) int {
	switch n := max(bits.Len(uint(comp)), bits.Len(uint(regen))); {
	case n <= 10:
		return 3
	case n <= 14:
		return 4
	}
	return 5
}

// appendRawLiteralsHeader writes the header of raw (typ 0) or RLE (typ 1) literals.
func appendRawLiteralsHeader(b []byte, typ, size int) []byte {
	switch {
	case size < 32:
		return append(b, byte(typ|size<<3))
	case size < 4096:
		return append(b, byte(typ|1<<2|size<<4), byte(size>>4))
	}
	return append(b, byte(typ|3<<2|size<<4), byte(size>>4), byte(size>>12))
}

// appendCompressedLiteralsHeader writes the header of Huffman-coded literals with their table.
func appendCompressedLiteralsHeader(b []byte, comp, regen int, single bool) []byte {
	const typ = 2
	switch literalsHeaderSize(comp, regen) {
	case 3:
		sf := 1
		if single {
			sf = 0
		}
		v := uint32(typ) | uint32(sf)<<2 | uint32(regen)<<4 | uint32(comp)<<14
		return append(b, byte(v), byte(v>>8), byte(v>>16))
	case 4:
		v := uint32(typ) | 2<<2 | uint32(regen)<<4 | uint32(comp)<<18
		return append(b, byte(v), byte(v>>8), byte(v>>16), byte(v>>24))
	}
	v := uint64(typ) | 3<<2 | uint64(regen)<<4 | uint64(comp)<<22
	return append(b, byte(v), byte(v>>8), byte(v>>16), byte(v>>24), byte(v>>32))
}

// appendSequences appends the sequences section, every code with its predefined table.
func (e *linesEncoder) appendSequences(b []byte) []byte {
	n := len(e.seqs)
	switch {
	case n < 128:
		b = append(b, byte(n))
	case n < 0x7f00:
		b = append(b, byte(n>>8)+0x80, byte(n))
	default:
		b = append(b, 0xff, byte(n-0x7f00), byte((n-0x7f00)>>8))
	}
	b = append(b, 0) // literal lengths, offsets and match lengths: predefined mode
	// At most 17 bits of states and 16 extra bits of each code per sequence: 9 bytes.
	buf := append(b, make([]byte, 10*n+16)...)
	pos := len(b)
	var acc uint64 // bits not yet written, nb of them
	var nb uint
	put := func(v uint64, n uint) {
		acc |= (v & (1<<(n&63) - 1)) << (nb & 63)
		nb += n
	}
	flush := func() {
		binary.LittleEndian.PutUint64(buf[pos:], acc)
		k := nb >> 3
		pos += int(k)
		acc >>= (k << 3) & 63
		if k == 8 {
			acc = 0
		}
		nb &= 7
	}
	var llState, ofState, mlState uint32
	enc := func(t *fseTable, state, s uint32) uint32 {
		n := (state + t.deltaN[s&63]) >> 16
		put(uint64(state), uint(n))
		return uint32(t.states[(int32(state>>(n&31))+t.deltaF[s&63])&63])
	}
	for k := n - 1; k >= 0; k-- {
		s := e.seqs[k]
		llCode, llExtra, llBits := litLenCode(s.litLen)
		mlCode, mlExtra, mlBits := matchLenCode(s.matchLen - 3)
		ofCode := uint32(bits.Len32(s.offBase) - 1)
		if k == n-1 {
			mlState = fseML.initState(mlCode)
			ofState = fseOF.initState(ofCode)
			llState = fseLL.initState(llCode)
		} else {
			ofState = enc(fseOF, ofState, ofCode)
			mlState = enc(fseML, mlState, mlCode)
			llState = enc(fseLL, llState, llCode)
		}
		put(uint64(llExtra), llBits)
		put(uint64(mlExtra), mlBits)
		if llBits+mlBits+uint(ofCode) > 64-7-17 {
			flush()
		}
		put(uint64(s.offBase), uint(ofCode))
		flush()
	}
	put(uint64(mlState), fseML.log)
	put(uint64(ofState), fseOF.log)
	put(uint64(llState), fseLL.log)
	put(1, 1) // the end mark
	flush()
	if nb > 0 {
		buf[pos] = byte(acc)
		pos++
	}
	return buf[:pos]
}

// The codes of literal lengths and match lengths (RFC 8878 3.1.1.3.2.1.1): a baseline and
// extra bits per code.
var (
	llBase = [36]uint32{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
		16, 18, 20, 22, 24, 28, 32, 40, 48, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536}
	llExtraBits = [36]uint8{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		1, 1, 1, 1, 2, 2, 3, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
	// Match lengths minus 3.
	mlBase = [53]uint32{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
		32, 34, 36, 38, 40, 44, 48, 56, 64, 80, 96, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536}
	mlExtraBits = [53]uint8{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
	llSmall, mlSmall [128]uint8 // the code of each value below 128
)

func init() {
	for v := range llSmall {
		for c := len(llBase) - 1; c >= 0; c-- {
			if llBase[c] <= uint32(v) {
				llSmall[v] = uint8(c)
				break
			}
		}
		for c := len(mlBase) - 1; c >= 0; c-- {
			if mlBase[c] <= uint32(v) {
				mlSmall[v] = uint8(c)
				break
			}
		}
	}
}

func litLenCode(v uint32) (code, extra uint32, nb uint) {
	if v < 128 {
		code = uint32(llSmall[v])
	} else {
		code = uint32(bits.Len32(v)-1) + 19
	}
	return code, v - llBase[code], uint(llExtraBits[code])
}

func matchLenCode(v uint32) (code, extra uint32, nb uint) {
	if v < 128 {
		code = uint32(mlSmall[v])
	} else {
		code = uint32(bits.Len32(v)-1) + 36
	}
	return code, v - mlBase[code], uint(mlExtraBits[code])
}

// fseTable is an FSE encoding table built from a normalized distribution, as zstd's
// reference encoder builds it (FSE_buildCTable), for the predefined distributions.
type fseTable struct {
	log    uint
	states [64]uint16 // the table (2^log <= 64 entries)
	deltaN [64]uint32 // per symbol: deltaNbBits
	deltaF [64]int32  // per symbol: deltaFindState
}

// The predefined distributions (RFC 8878 3.1.1.3.2.2).
var (
	fseLL = newFSETable(6, []int16{4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1,
		2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 1, 1, 1, 1, 1, -1, -1, -1, -1})
	fseML = newFSETable(6, []int16{1, 4, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1,
		1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
		-1, -1, -1, -1, -1, -1, -1})
	fseOF = newFSETable(5, []int16{1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1,
		1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1})
)

func newFSETable(log uint, norm []int16) *fseTable {
	size := 1 << log
	mask := size - 1
	high := size - 1
	symbols := make([]uint8, size)
	cumul := make([]int, len(norm)+1)
	for s, c := range norm {
		if c == -1 {
			cumul[s+1] = cumul[s] + 1
			symbols[high] = uint8(s)
			high--
		} else {
			cumul[s+1] = cumul[s] + int(c)
		}
	}
	step := size>>1 + size>>3 + 3
	pos := 0
	for s, c := range norm {
		for range max(int(c), 0) {
			symbols[pos] = uint8(s)
			pos = (pos + step) & mask
			for pos > high {
				pos = (pos + step) & mask
			}
		}
	}
	if pos != 0 {
		panic("file: bad FSE distribution")
	}
	t := &fseTable{log: log}
	for u := range size {
		s := symbols[u]
		t.states[cumul[s]] = uint16(size + u)
		cumul[s]++
	}
	total := 0
	for s, c := range norm {
		switch c {
		case 0:
			t.deltaN[s] = uint32((log+1)<<16) - uint32(size)
		case -1, 1:
			t.deltaN[s] = uint32(log<<16) - uint32(size)
			t.deltaF[s] = int32(total - 1)
			total++
		default:
			maxBitsOut := log - uint(bits.Len32(uint32(c)-1)-1)
			minStatePlus := uint32(c) << maxBitsOut
			t.deltaN[s] = uint32(maxBitsOut<<16) - minStatePlus
			t.deltaF[s] = int32(total - int(c))
			total += int(c)
		}
	}
	return t
}

// initState is the state that starts the stream with symbol s (the last one decoded).
func (t *fseTable) initState(s uint32) uint32 {
	nb := (t.deltaN[s] + 1<<15) >> 16
	v := nb<<16 - t.deltaN[s]
	return uint32(t.states[(int32(v>>nb)+t.deltaF[s])&63])
}
