package diskqueue

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/internal/testenv"
)

// TestDiskFullBlocksAndRecovers fills a 1MiB tmpfs under a queue allowed 64MiB: the disk
// runs out first. Under block the writer waits, one log line says so with the path and the
// free space, and once the sink drains, writing resumes by itself with nothing lost.
func TestDiskFullBlocksAndRecovers(t *testing.T) {
	mnt := testenv.Tmpfs(t, "1m")
	var logs testenv.SyncBuffer
	q, err := Open(Options{
		Dir: filepath.Join(mnt, "q"), MaxSize: 64 << 20, SegmentSize: 64 << 10,
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	const batches, size = 300, 100 // about 2.6MB of records
	done := make(chan error, 1)
	go func() {
		for i := range batches {
			if err := q.Append(context.Background(), events(i*size, size)); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	waitFor(t, "the disk-full log line", func() bool { return strings.Contains(logs.String(), "the disk is full") })
	select {
	case err := <-done:
		t.Fatalf("the writer finished (%v) on a full disk; want it blocked", err)
	default:
	}
	line := logs.String()
	if !strings.Contains(line, "path="+filepath.Join(mnt, "q")) || !strings.Contains(line, "free_bytes=") {
		t.Fatalf("the log line lacks the path or the free space:\n%s", line)
	}
	var got []int
	for len(got) < batches*size {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		b := q.Next(ctx)
		cancel()
		if b == nil {
			t.Fatalf("no record after %d events", len(got))
		}
		for i := range b.Events {
			got = append(got, number(&b.Events[i]))
		}
		b.Release(nil)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for i, n := range got {
		if n != i {
			t.Fatalf("event %d is %d: lost or reordered", i, n)
		}
	}
	if !strings.Contains(logs.String(), "writable again") {
		t.Fatalf("no recovery logged:\n%s", logs.String())
	}
	// One line per episode of a full disk, not one per attempt.
	if full, again := strings.Count(logs.String(), "the disk is full"), strings.Count(logs.String(), "writable again"); full != again {
		t.Fatalf("%d disk-full lines for %d recoveries:\n%s", full, again, logs.String())
	}
}

// TestDiskFullDropNewestCountsAndRecovers: under drop_newest a full disk refuses batches
// (the pipeline counts them as queue_full) and, once space is back, accepts again.
func TestDiskFullDropNewestCountsAndRecovers(t *testing.T) {
	mnt := testenv.Tmpfs(t, "1m")
	q, err := Open(Options{Dir: filepath.Join(mnt, "q"), MaxSize: 64 << 20, SegmentSize: 64 << 10, WhenFull: DropNewest, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	accepted, refused := 0, 0
	for i := range 300 {
		err := q.Append(context.Background(), events(i*100, 100))
		switch {
		case err == nil:
			accepted++
		case errors.Is(err, ErrFull):
			refused++
		default:
			t.Fatal(err)
		}
	}
	if refused == 0 || accepted == 0 {
		t.Fatalf("accepted %d, refused %d: want both on a 1MiB disk", accepted, refused)
	}
	// Drain what was accepted; then the disk has room again.
	n := 0
	for n < accepted*100 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		b := q.Next(ctx)
		cancel()
		if b == nil {
			t.Fatalf("got %d of the %d accepted events", n, accepted*100)
		}
		n += len(b.Events)
		b.Release(nil)
	}
	for i := range 5 {
		if err := q.Append(context.Background(), events(1_000_000+i*100, 100)); err != nil {
			t.Fatalf("after draining, append %d: %v", i, err)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
