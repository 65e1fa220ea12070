package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// watchDebounce is how long the pipeline file must stay unchanged before run --watch
// reloads it: an editor's save (write a new file, rename it over the old one) or a
// configuration tool's several writes make one reload.
const watchDebounce = 500 * time.Millisecond

// watchFile calls changed whenever the content of file changes, until ctx is done. It
// watches the file's directory, not the file: editors and tools that write a new file and
// rename it over the old one replace the inode, which a watch on the file would lose. A
// symbolic link is followed (a Kubernetes ConfigMap swaps the link's target directory), and
// its target's directory is watched too. Only a change of content counts: a touch, a chmod
// or the same bytes written again do not reload.
func watchFile(ctx context.Context, file string, log *slog.Logger, changed func()) error {
	abs, err := filepath.Abs(file)
	if err != nil {
		return fmt.Errorf("--watch %s: %w", file, err)
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("--watch %s: %w", file, err)
	}
	watched := map[string]bool{}
	watchDir := func(dir string) error {
		if watched[dir] {
			return nil
		}
		if err := w.Add(dir); err != nil {
			return err
		}
		watched[dir] = true
		return nil
	}
	if err := watchDir(filepath.Dir(abs)); err != nil {
		w.Close()
		return fmt.Errorf("--watch %s: watch its directory: %w", file, err)
	}
	real := realPath(abs)
	if err := watchDir(filepath.Dir(real)); err != nil {
		log.Warn("--watch: cannot watch the directory the pipeline file links to; changes there are seen only when the link changes", "file", file, "target", real, "error", err)
	}
	last := contentSum(abs)
	go func() {
		defer w.Close()
		var fire <-chan time.Time
		var timer *time.Timer
		for {
			select {
			case <-ctx.Done():
				if timer != nil {
					timer.Stop()
				}
				return
			case ev, ok := <-w.Events:
				if !ok {
					return
				}
				now := realPath(abs)
				if ev.Name != abs && ev.Name != real && now == real {
					continue // another file in the directory (a sink's output, an editor's swap file)
				}
				if now != real {
					real = now
					if err := watchDir(filepath.Dir(real)); err != nil {
						log.Warn("--watch: cannot watch the directory the pipeline file links to", "target", real, "error", err)
					}
				}
				if timer == nil {
					timer = time.NewTimer(watchDebounce)
				} else {
					timer.Reset(watchDebounce)
				}
				fire = timer.C
			case err, ok := <-w.Errors:
				if !ok {
					return
				}
				// An overflow of the kernel's event queue loses events: look at the file.
				log.Warn("--watch: watching the pipeline file", "file", file, "error", err)
				if timer == nil {
					timer = time.NewTimer(watchDebounce)
				} else {
					timer.Reset(watchDebounce)
				}
				fire = timer.C
			case <-fire:
				fire = nil
				if sum := contentSum(abs); sum != last {
					last = sum
					log.Info("the pipeline file changed", "file", file)
					changed()
				}
			}
		}
	}()
	return nil
}

// realPath is path with its symbolic links resolved, or path when that fails (the file is
// being replaced).
func realPath(path string) string {
	if r, err := filepath.EvalSymlinks(path); err == nil {
		return r
	}
	return path
}

// contentSum identifies what the file holds now; a missing or unreadable file is a content
// of its own (the reload reports it), so it reloads once, not on every event.
func contentSum(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "error: " + err.Error()
	}
	return fmt.Sprintf("%x", sha256.Sum256(data))
}
