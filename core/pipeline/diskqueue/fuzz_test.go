package diskqueue

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// validSegment is a segment of three records, as Append writes them.
func validSegment(t testing.TB) []byte {
	dir := t.TempDir()
	q, err := Open(Options{Dir: dir, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := q.Append(context.Background(), events(i*5, 5)); err != nil {
			t.Fatal(err)
		}
	}
	q.Close()
	b, err := os.ReadFile(filepath.Join(dir, segName(1)))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzSegment feeds arbitrary bytes to the record decoder as a segment file: Inspect and
// the queue's reader must never panic, and must agree on what can be delivered. Each input
// opens and closes a real queue (about 10 ms with its fsyncs), so minimising every new input
// dominates a short run; for coverage rather than small crashers:
//
//	go test -run XXX -fuzz FuzzSegment -fuzztime 60s -fuzzminimizetime 0 ./core/pipeline/diskqueue/
//
// The seed corpus is testdata/fuzz/FuzzSegment (rewritten by TestWriteFuzzSeeds).
func FuzzSegment(f *testing.F) {
	seg := validSegment(f)
	f.Add(seg)
	f.Add(seg[:len(seg)-7])
	flipped := append([]byte(nil), seg...)
	flipped[segHdrSize+40] ^= 1
	f.Add(flipped)
	f.Add(seg[:segHdrSize])
	f.Add([]byte("FPQS"))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, segName(1)), data, 0o640); err != nil {
			t.Fatal(err)
		}
		r, err := Inspect(dir)
		if err != nil {
			t.Fatal(err)
		}
		q, err := Open(Options{Dir: dir, Logger: quiet()})
		if err != nil {
			t.Fatal(err)
		}
		defer q.Close()
		q.CloseWrites()
		delivered := 0
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			b := q.Next(ctx)
			cancel()
			if b == nil {
				break
			}
			delivered += len(b.Events)
			b.Release(nil)
		}
		if int64(delivered) != r.Pending {
			t.Fatalf("delivered %d events, inspect reported %d pending", delivered, r.Pending)
		}
	})
}

// TestWriteFuzzSeeds rewrites the committed seed corpus (FLOWPIPE_WRITE_FUZZ_SEEDS=1).
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("FLOWPIPE_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set FLOWPIPE_WRITE_FUZZ_SEEDS=1 to rewrite testdata/fuzz/FuzzSegment")
	}
	seg := validSegment(t)
	flipped := append([]byte(nil), seg...)
	flipped[len(flipped)-3] ^= 0x10
	dir := filepath.Join("testdata", "fuzz", "FuzzSegment")
	os.MkdirAll(dir, 0o755)
	for i, b := range [][]byte{seg, seg[:len(seg)/2], flipped, append(append([]byte(nil), seg...), seg[segHdrSize:]...)} {
		content := fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(b)))
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%d", i)), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
