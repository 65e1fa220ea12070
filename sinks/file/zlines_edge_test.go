package file

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// The lines encoder at its limits: many short sequences in a block (the two- and
// three-byte sequence counts), lines ending exactly at a block's end, one line of exactly a
// block, identical lines, matches at the longest offset, each decoded by klauspost's decoder
// and the zstd program to the exact input.
func TestLinesEncoderEdges(t *testing.T) {
	_, err := exec.LookPath("zstd")
	testenv.Require(t, err == nil, "zstd in PATH")
	dec, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	r := rand.New(rand.NewPCG(5, 6))
	in := map[string][]byte{}
	var short []byte // an 8-byte match, then one differing byte: a sequence every 10 bytes
	for len(short) < 700_000 {
		short = append(short, "abcdefg,"...)
		short = append(short, byte('A'+r.IntN(26)), ',')
	}
	in["short sequences"] = short
	var tiny []byte // "x,": a boundary every 2 bytes, matches of 8 and more
	for len(tiny) < 400_000 {
		tiny = append(tiny, "abcdefgh,"[:1+r.IntN(9)]...)
		tiny = append(tiny, ',')
	}
	in["tiny fields"] = tiny
	line := []byte(`{"a":1,"b":"same","c":3}` + "\n")
	in["identical lines"] = bytes.Repeat(line, 20_000)
	blk := bytes.Repeat([]byte("k"), linesBlockMax-1)
	blk = append(blk, '\n')
	in["line of exactly a block"] = bytes.Repeat(blk, 3)
	in["block plus one"] = append(bytes.Repeat([]byte(`"x":12345,`), linesBlockMax/10+1), 'z')
	far := make([]byte, 0, 3*linesMaxOffset)
	rec := []byte(`,"record":"0123456789abcdef",`)
	for len(far) < 3*linesMaxOffset {
		far = append(far, rec...)
		pad := make([]byte, linesMaxOffset-len(rec))
		for i := range pad {
			pad[i] = byte(r.Uint32())
		}
		far = append(far, pad...)
	}
	in["matches at the longest offset"] = far
	var lines []byte
	for i := 0; len(lines) < 1<<20; i++ {
		lines = fmt.Appendf(lines, `{"id":%d,"src":"10.0.%d.%d","proto":"tcp","note":%q}`+"\n", i, i%256, i%7, strings.Repeat("n", i%300))
	}
	in["varied lines"] = lines
	for i := range 200 {
		n := linesBlockMax - 100 + i
		in[fmt.Sprintf("prefix %d of lines", n)] = lines[:n]
	}
	for name, src := range in {
		z := linesEncodeAll(src, nil)
		got, err := dec.DecodeAll(z, nil)
		if err != nil || !bytes.Equal(got, src) {
			t.Fatalf("%s: klauspost decoded %d bytes (%v), want the %d encoded", name, len(got), err, len(src))
		}
		if !strings.HasPrefix(name, "prefix") || name == "prefix 131072 of lines" {
			cmd := exec.Command("zstd", "-d", "-c", "-q")
			cmd.Stdin = bytes.NewReader(z)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil || !bytes.Equal(out, src) {
				t.Fatalf("%s: zstd -d decoded %d bytes (%v: %s), want the %d encoded", name, len(out), err, stderr.String(), len(src))
			}
		}
	}
}
