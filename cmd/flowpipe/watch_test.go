package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// watchFile on a real directory (inotify): each way a file is commonly changed is one
// reload, and what does not change the content is none.
func TestWatchFileSeesEveryWayOfChangingIt(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "pipeline.yaml")
	writeFile(t, file, "v: 1\n")
	var calls atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := watchFile(ctx, file, slog.New(slog.NewTextHandler(io.Discard, nil)), func() { calls.Add(1) }); err != nil {
		t.Fatal(err)
	}
	want := int32(0)
	expect := func(what string) {
		t.Helper()
		want++
		eventually(t, what, func() bool { return calls.Load() >= want })
		if n := calls.Load(); n != want {
			t.Fatalf("%s: %d reloads, want %d", what, n, want)
		}
	}
	// What must not reload: it has its time to be seen (twice the debounce), and the next
	// change counts exactly one more.
	quiet := func(what string) {
		t.Helper()
		time.Sleep(2 * watchDebounce)
		if n := calls.Load(); n != want {
			t.Fatalf("%s: %d reloads, want %d", what, n, want)
		}
	}

	writeFile(t, file, "v: 2\n")
	expect("written in place")

	tmp := filepath.Join(dir, ".pipeline.yaml.tmp")
	writeFile(t, tmp, "v: 3\n")
	if err := os.Rename(tmp, file); err != nil {
		t.Fatal(err)
	}
	expect("a new file renamed over it")

	// An editor that moves the old file aside and writes a new one, in several writes.
	if err := os.Rename(file, file+"~"); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	for _, part := range []string{"v:", " ", "4\n"} {
		if _, err := f.WriteString(part); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	expect("moved aside and written anew")

	writeFile(t, filepath.Join(dir, "flows.jsonl"), "{}\n")
	now := time.Now()
	if err := os.Chtimes(file, now, now); err != nil {
		t.Fatal(err)
	}
	writeFile(t, file, "v: 4\n")
	quiet("another file in the directory, a touch, the same content written again")

	// A Kubernetes ConfigMap: pipeline.yaml -> ..data/pipeline.yaml, ..data -> a directory
	// that is swapped by renaming a new link over ..data.
	kdir := filepath.Join(dir, "k8s")
	for _, d := range []string{"..v1", "..v2"} {
		if err := os.MkdirAll(filepath.Join(kdir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(kdir, "..v1", "pipeline.yaml"), "k: 1\n")
	writeFile(t, filepath.Join(kdir, "..v2", "pipeline.yaml"), "k: 2\n")
	if err := os.Symlink("..v1", filepath.Join(kdir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join("..data", "pipeline.yaml"), filepath.Join(kdir, "pipeline.yaml")); err != nil {
		t.Fatal(err)
	}
	calls.Store(0)
	want = 0
	if err := watchFile(ctx, filepath.Join(kdir, "pipeline.yaml"), slog.New(slog.NewTextHandler(io.Discard, nil)), func() { calls.Add(1) }); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..v2", filepath.Join(kdir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(kdir, "..data_tmp"), filepath.Join(kdir, "..data")); err != nil {
		t.Fatal(err)
	}
	expect("the ConfigMap's link swapped")
	// The link's target is watched too: a change there is seen.
	writeFile(t, filepath.Join(kdir, "..v2", "pipeline.yaml"), "k: 3\n")
	expect("the linked file written")
}
