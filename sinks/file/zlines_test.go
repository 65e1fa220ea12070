package file

import (
	"bytes"
	"math/rand/v2"
	"os/exec"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/flowpipe/flowpipe/core/schema"
	"github.com/flowpipe/flowpipe/internal/testenv"
)

// linesInputs are inputs of every kind the encoder must give back exactly: the sink's
// lines in each format, blocks of more than 128 KiB, lines longer than a block, matches at
// the end of the input, binary noise, repetition without commas, nothing at all.
func linesInputs(t testing.TB) map[string][]byte {
	in := map[string][]byte{"empty": nil, "one byte": []byte("x"), "comma": []byte(","), "newline": []byte("\n")}
	evs := benchEvents(3000)
	for _, f := range []string{"flowpipe", "ecs", "ocsf"} {
		format, _ := schema.Parse(f)
		enc := schema.Encoder{Format: format}
		var b []byte
		for i := range evs {
			b = enc.Append(b, &evs[i])
			b = append(b, '\n')
		}
		in["lines "+f] = b                 // about 1.3 MB: ten blocks
		in["lines "+f+" short"] = b[:1000] // one block, the last line cut
	}
	r := rand.New(rand.NewPCG(3, 4))
	noise := make([]byte, 300_000)
	for i := range noise {
		noise[i] = byte(r.Uint32())
	}
	in["noise"] = noise
	commas := make([]byte, 200_000) // random bytes from a small alphabet with many commas
	for i := range commas {
		commas[i] = ",,\n\"ab:{}01"[r.IntN(11)]
	}
	in["commas"] = commas
	in["repeat without boundaries"] = bytes.Repeat([]byte("abcdefgh"), 50_000)
	in["repeat fields"] = bytes.Repeat([]byte(`"k":1,`), 40_000)
	long := strings.Repeat(`{"a":"`+strings.Repeat("z", 200_000)+`"},`, 3) // lines longer than a block
	in["long lines"] = []byte(long)
	in["match at the end"] = []byte(`,"abcdefgh",,"abcdefgh"`)
	return in
}

// TestLinesEncoderRoundTrip decodes every frame the lines encoder writes with klauspost's
// decoder and with the zstd program, and checks that it is smaller than its input where
// the input has the structure it is meant for.
func TestLinesEncoderRoundTrip(t *testing.T) {
	_, err := exec.LookPath("zstd")
	testenv.Require(t, err == nil, "zstd in PATH")
	dec, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	for name, src := range linesInputs(t) {
		t.Run(name, func(t *testing.T) {
			z := linesEncodeAll(src, []byte("prefix"))
			if !bytes.HasPrefix(z, []byte("prefix")) {
				t.Fatal("dst's bytes were not kept")
			}
			z = z[len("prefix"):]
			got, err := dec.DecodeAll(z, nil)
			if err != nil {
				t.Fatalf("klauspost: %v", err)
			}
			if !bytes.Equal(got, src) {
				t.Fatalf("klauspost decoded %d bytes, want the %d encoded", len(got), len(src))
			}
			cmd := exec.Command("zstd", "-d", "-c", "-q")
			cmd.Stdin = bytes.NewReader(z)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("zstd -d: %v: %s", err, stderr.String())
			}
			if !bytes.Equal(out, src) {
				t.Fatalf("zstd -d decoded %d bytes, want the %d encoded", len(out), len(src))
			}
			end, err := completeEnd(bytes.NewReader(z), int64(len(z)), "zstd")
			if err != nil || end != int64(len(z)) {
				t.Fatalf("the frame walker finds the frame ending at %d (%v), want %d", end, err, len(z))
			}
			if strings.HasPrefix(name, "lines") && len(src) > 100_000 {
				ratio := float64(len(src)) / float64(len(z))
				t.Logf("%d -> %d bytes (%.2fx)", len(src), len(z), ratio)
				if ratio < 3 {
					t.Errorf("compressed %d bytes of lines to %d, want at least 3x", len(src), len(z))
				}
			}
		})
	}
}

// FuzzLinesEncoder: whatever the input, klauspost's decoder gives it back (the corpus
// seeds are decoded by the zstd program too, in TestLinesEncoderRoundTrip).
func FuzzLinesEncoder(f *testing.F) {
	for _, src := range linesInputs(f) {
		if len(src) < 4096 {
			f.Add(src)
		}
	}
	evs := benchEvents(20)
	enc := schema.Encoder{Format: schema.Flowpipe}
	var lines []byte
	for i := range evs {
		lines = enc.Append(lines, &evs[i])
		lines = append(lines, '\n')
	}
	f.Add(lines)
	dec, err := zstd.NewReader(nil)
	if err != nil {
		f.Fatal(err)
	}
	defer dec.Close()
	f.Fuzz(func(t *testing.T, src []byte) {
		// Repeat the input with changes so that matches and several blocks occur.
		var in []byte
		for k := 0; len(in) < 3*len(src) && k < 3; k++ {
			in = append(in, src...)
			if len(src) > 0 {
				in[len(in)-1-k%len(src)] ^= byte(k)
			}
		}
		z := linesEncodeAll(in, nil)
		got, err := dec.DecodeAll(z, nil)
		if err != nil {
			t.Fatalf("decode: %v", err)
		}
		if !bytes.Equal(got, in) {
			t.Fatalf("decoded %d bytes, want the %d encoded", len(got), len(in))
		}
	})
}
