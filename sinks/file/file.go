// Package file is the JSON-lines file sink (`type: file`): one event per line in the schema
// of docs/schema.md (or ECS or OCSF, the format option), rotation by size and age, optional
// zstd or gzip compression, and an fsync before a batch is acknowledged.
package file

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/core/schema"
	"github.com/flowpipe/flowpipe/internal/privilege"
)

// Config is the file sink's options.
type Config struct {
	// Path of the file; "-" writes to standard output (no rotation). Relative paths are
	// relative to the directory of pipeline.yaml.
	Path string `yaml:"path" required:"true"`
	// MaxSize rotates the file when a write would take it past this size; 0 never rotates
	// by size.
	MaxSize config.ByteSize `yaml:"max_size"`
	// MaxAge rotates the file when it is older than this; 0 never rotates by age.
	MaxAge time.Duration `yaml:"max_age"`
	// MaxFiles is how many rotated files to keep besides the current one; 0 keeps all.
	MaxFiles int `yaml:"max_files"`
	// Sync is "batch" (fsync before acknowledging each batch), "interval" (acknowledge once
	// written, fsync every SyncInterval) or "none".
	Sync string `yaml:"sync"`
	// SyncInterval is the fsync period with sync: interval.
	SyncInterval time.Duration `yaml:"sync_interval"`
	// Format is the schema of each line: flowpipe (docs/schema.md; what the replay source
	// reads), ecs or ocsf (core/schema).
	Format string `yaml:"format"`
	// Compression is "none", "zstd" or "gzip". Each part of a batch is written as one
	// complete zstd frame or gzip member, so that the file (the current one, a rotated one,
	// one cut short by a crash) is always a valid stream: frames and members concatenate, and
	// a torn last one is cut off before the first write (frames.go).
	Compression string `yaml:"compression"`
	// CompressionLevel is fastest, default, better or best: the compressor's trade of CPU
	// for size (zstd's encoder levels; gzip levels 1, 6, 7, 9); or, with zstd only, lines:
	// the sink's own zstd encoder for JSON lines (zlines.go), which looks for matches only
	// at field boundaries. Empty (the default) is lines with zstd and fastest with gzip:
	// lines costs about half the CPU of fastest for files about 12% larger.
	CompressionLevel string `yaml:"compression_level"`
	// ResumeScan, when not 0, makes the sink read the last ResumeScan bytes of the file at
	// start and skip the events already there when they come again: a writer killed after
	// writing a batch and before acknowledging it is sent that batch again (by a log source's
	// redelivery) and does not write it twice. Format flowpipe only.
	ResumeScan config.ByteSize `yaml:"resume_scan"`
}

func defaults() *Config {
	return &Config{MaxSize: 100 << 20, MaxFiles: 10, Sync: "batch", SyncInterval: 100 * time.Millisecond, Format: "flowpipe", Compression: "none"}
}

// Validate checks the options.
func (c *Config) Validate() error {
	var errs config.FieldErrors
	if strings.TrimSpace(c.Path) == "" {
		errs.Add("path", "must not be empty (use - for standard output)")
	}
	if c.MaxSize < 0 {
		errs.Add("max_size", "must not be negative")
	}
	if c.MaxAge < 0 {
		errs.Add("max_age", "must not be negative")
	}
	if c.MaxFiles < 0 {
		errs.Add("max_files", "must not be negative")
	}
	if c.ResumeScan < 0 {
		errs.Add("resume_scan", "must not be negative")
	}
	if c.ResumeScan > 0 && c.Compression != "" && c.Compression != "none" {
		errs.Add("resume_scan", "reads lines back from the file; not with compression %s", c.Compression)
	}
	if c.ResumeScan > 0 && c.Format != "flowpipe" {
		errs.Add("resume_scan", "reads event IDs back from lines of format flowpipe; not with format %s", c.Format)
	}
	if c.Sync != "batch" && c.Sync != "interval" && c.Sync != "none" {
		errs.Add("sync", "unknown mode %q (want batch, interval or none)", c.Sync)
	}
	if c.Sync == "interval" && c.SyncInterval <= 0 {
		errs.Add("sync_interval", "must be positive with sync: interval")
	}
	switch c.Compression {
	case "", "none", "zstd", "gzip":
	default:
		errs.Add("compression", "unknown compression %q (want none, zstd or gzip)", c.Compression)
	}
	if c.CompressionLevel == "lines" {
		if c.Compression == "gzip" {
			errs.Add("compression_level", "lines is a zstd encoder; not with compression gzip")
		}
	} else if _, ok := compressionLevels[c.CompressionLevel]; !ok {
		errs.Add("compression_level", "unknown level %q (want fastest, default, better, best or, with zstd, lines)", c.CompressionLevel)
	}
	if _, ok := schema.Parse(c.Format); !ok {
		errs.Add("format", "unknown format %q (want %s)", c.Format, schema.Choices)
	}
	return errs.Err()
}

// compressionLevels maps compression_level to zstd's encoder level and gzip's level.
var compressionLevels = map[string]struct {
	zstd zstd.EncoderLevel
	gzip int
}{
	"":        {zstd.SpeedFastest, gzip.BestSpeed}, // gzip's default; zstd's is lines (New)
	"fastest": {zstd.SpeedFastest, gzip.BestSpeed},
	"default": {zstd.SpeedDefault, gzip.DefaultCompression},
	"better":  {zstd.SpeedBetterCompression, 7},
	"best":    {zstd.SpeedBestCompression, gzip.BestCompression},
}

// Factory returns the file sink's factory.
func Factory() component.Factory {
	return component.NewSinkFactory("file", "JSON lines in a file or on stdout, with rotation and fsync per batch",
		defaults, func(env component.Env, c *Config) (component.Sink, error) { return New(env, c), nil })
}

// Sink writes JSON lines. A Write cuts its batch into parts of at least minPart events, one
// per CPU at most, and encodes (and compresses: one zstd frame or gzip member per part) the
// parts in parallel; it then writes them in order under the file lock, so the lines of a
// batch keep their order, and waits for an fsync that covers them. Several Writes may run at
// once (the sink's in_flight setting): one fsync covers every batch written before it
// started (group commit), so a second batch in flight overlaps its encoding with the first
// one's fsync; batches in flight are written in the order they finish encoding.
type Sink struct {
	cfg     Config
	format  schema.Format
	path    string
	env     component.Env
	workers int       // parts a batch is cut into at most
	bufs    sync.Pool // *[]byte encode buffers
	zbufs   sync.Pool // *[]byte compressed buffers
	parts   sync.Pool // *partSet
	zstd    *zstd.Encoder
	lines   bool // zstd with the sink's own encoder (compression_level: lines)
	gzipLvl int
	gzips   sync.Pool // *gzip.Writer

	mu      sync.Mutex // the file, its size and rotation
	f       *os.File
	w       io.Writer
	size    int64
	opened  time.Time
	regular bool
	// checked is set once what a stopped process left at the file's end (a torn line or
	// frame) was cut off and resume_scan read; not at Start but at the first write: a
	// reload starts a replacing instance while the one it replaces may still be writing
	// (check).
	checked bool

	resumed map[uuid.UUID]struct{} // IDs found by resume_scan, not yet seen again (under mu)

	syncMu  sync.Mutex   // one fsync at a time; rotation holds it too
	written atomic.Int64 // bytes written since start, over every file
	synced  atomic.Int64 // of those, bytes known to be on disk
	cur     atomic.Pointer[os.File]

	stopSync chan struct{} // closes the sync: interval goroutine
	syncDone chan struct{}
}

// New makes a file sink; the file is opened by Start.
func New(env component.Env, c *Config) *Sink {
	if env.Metrics == nil {
		env.Metrics = component.NopMetrics{}
	}
	if env.Logger == nil {
		env.Logger = slog.New(slog.DiscardHandler)
	}
	f, _ := schema.Parse(c.Format)
	s := &Sink{cfg: *c, format: f, path: env.Path(c.Path), env: env, workers: runtime.GOMAXPROCS(0)}
	lvl := compressionLevels[c.CompressionLevel]
	s.gzipLvl = lvl.gzip
	if c.Compression == "zstd" && (c.CompressionLevel == "lines" || c.CompressionLevel == "") {
		s.lines = true
	} else if c.Compression == "zstd" {
		// EncodeAll runs on one of the encoder's `concurrency` states: one per CPU, so the
		// parts of a batch, and batches in flight, compress in parallel.
		s.zstd, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(lvl.zstd), zstd.WithEncoderConcurrency(s.workers))
	}
	return s
}

// Start creates missing directories and opens the file for appending, so that a path it
// cannot write is refused at once; with sync: interval it starts the periodic fsync. What a
// killed process left at the end of the file (a torn line or frame) is cut off at the first
// write, not here: a reload starts the instance that replaces a sink while the one it
// replaces is still writing to the same file (it is closed before the new one writes), and
// the end of a batch in the middle of its writes looks torn.
func (s *Sink) Start(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.open(); err != nil {
		return err
	}
	if s.f != nil && s.regular && s.size > 0 && s.compressed() {
		// Refused now, not at the first write: a file that is some other kind of file.
		r, err := os.Open(s.path)
		if err != nil {
			return fmt.Errorf("read %s: %w", s.path, err)
		}
		ok, err := startsLike(r, s.size, s.cfg.Compression)
		r.Close()
		if err != nil {
			return fmt.Errorf("read %s: %w", s.path, err)
		}
		if !ok {
			return s.notStream()
		}
	}
	if s.cfg.Sync == "interval" && s.stopSync == nil {
		s.stopSync, s.syncDone = make(chan struct{}), make(chan struct{})
		go s.syncEvery(s.cfg.SyncInterval)
	}
	return nil
}

func (s *Sink) notStream() error {
	return fmt.Errorf("%s exists and is not a %s file (compression: %s): move it away or choose another path", s.path, s.cfg.Compression, s.cfg.Compression)
}

// check cuts off what a stopped process left at the end of the file and reads the IDs of
// resume_scan, once, before the first write (under mu).
func (s *Sink) check() error {
	if s.checked {
		return nil
	}
	if s.f == nil || !s.regular {
		s.checked = true
		return nil
	}
	st, err := s.f.Stat() // the size now: a replaced instance may have written since Start
	if err != nil {
		return fmt.Errorf("stat %s: %w", s.path, err)
	}
	s.size = st.Size()
	if s.size > 0 {
		if s.compressed() {
			err = s.cutTornFrame()
		} else if err = s.cutTorn(); err == nil && s.cfg.ResumeScan > 0 {
			err = s.resume()
		}
		if err != nil {
			return err
		}
	}
	s.checked = true
	return nil
}

// syncEvery fsyncs what was written, every d, until Close.
func (s *Sink) syncEvery(d time.Duration) {
	defer close(s.syncDone)
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-s.stopSync:
			return
		case <-t.C:
			if err := s.syncTo(s.written.Load()); err != nil {
				s.env.Logger.Warn("periodic fsync failed", "file", s.path, "error", err)
				s.env.Metrics.Errors("fsync", 1)
			}
		}
	}
}

// cutTorn cuts off a torn last line: a process killed in the middle of a write leaves part
// of a batch that was not acknowledged (it comes again), and the next line must not be
// glued to it.
func (s *Sink) cutTorn() error {
	const look = 1 << 20 // far longer than a line
	from := max(0, s.size-look)
	buf := make([]byte, s.size-from)
	if _, err := s.readAt(buf, from); err != nil {
		return err
	}
	last := bytes.LastIndexByte(buf, '\n')
	if last == len(buf)-1 || (last < 0 && from > 0) {
		return nil
	}
	cut := from + int64(last+1)
	if err := s.f.Truncate(cut); err != nil {
		return fmt.Errorf("%s: cut torn last line: %w", s.path, err)
	}
	s.env.Logger.Warn("cut a torn last line off the file (the process was stopped mid-write; that batch was not acknowledged)", "file", s.path, "bytes", s.size-cut)
	s.size = cut
	return nil
}

// cutTornFrame cuts a torn last zstd frame or gzip member off a compressed file (frames.go).
func (s *Sink) cutTornFrame() error {
	r, err := os.Open(s.path)
	if err != nil {
		return fmt.Errorf("read %s: %w", s.path, err)
	}
	defer r.Close()
	end, err := completeEnd(r, s.size, s.cfg.Compression)
	if errors.Is(err, errNotStream) {
		return s.notStream()
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", s.path, err)
	}
	if end == s.size {
		return nil
	}
	if err := s.f.Truncate(end); err != nil {
		return fmt.Errorf("%s: cut a torn last %s frame: %w", s.path, s.cfg.Compression, err)
	}
	s.env.Logger.Warn("cut a torn last compressed frame off the file (the process was stopped mid-write; that batch was not acknowledged)", "file", s.path, "bytes", s.size-end)
	s.size = end
	return nil
}

func (s *Sink) readAt(buf []byte, off int64) (int, error) {
	r, err := os.Open(s.path)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", s.path, err)
	}
	defer r.Close()
	n, err := r.ReadAt(buf, off)
	if err != nil {
		return n, fmt.Errorf("read %s: %w", s.path, err)
	}
	return n, nil
}

// resume reads the event IDs of the file's last resume_scan bytes.
func (s *Sink) resume() error {
	from := max(0, s.size-int64(s.cfg.ResumeScan))
	buf := make([]byte, s.size-from)
	if _, err := s.readAt(buf, from); err != nil {
		return fmt.Errorf("resume_scan: %w", err)
	}
	if from > 0 {
		// The first line read may be partial.
		i := bytes.IndexByte(buf, '\n')
		buf = buf[i+1:]
	}
	s.resumed = map[uuid.UUID]struct{}{}
	const prefix = `{"event_id":"`
	for len(buf) > 0 {
		line, rest, _ := bytes.Cut(buf, []byte{'\n'})
		buf = rest
		if len(line) >= len(prefix)+36 && bytes.HasPrefix(line, []byte(prefix)) {
			if id, err := uuid.ParseBytes(line[len(prefix) : len(prefix)+36]); err == nil {
				s.resumed[id] = struct{}{}
			}
		}
	}
	s.env.Logger.Info("resuming the file: events already in it will not be written again", "file", s.path, "events", len(s.resumed))
	return nil
}

func (s *Sink) open() error {
	if s.path == "-" {
		s.f, s.w = nil, s.env.Output()
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(s.path), 0o750); err != nil {
		return fmt.Errorf("create directory for %s: %w", s.path, privilege.ExplainWrite(err, filepath.Dir(s.path)))
	}
	f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("open %s: %w", s.path, privilege.ExplainWrite(err, filepath.Dir(s.path)))
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("stat %s: %w", s.path, err)
	}
	s.f, s.w, s.size, s.opened = f, f, st.Size(), time.Now()
	s.regular = st.Mode().IsRegular()
	s.cur.Store(f)
	return nil
}

// minPart is the fewest events a part of a batch is encoded from on its own goroutine (and,
// compressed, is one frame or member): below it the hand-off costs more than it saves and
// small frames compress worse.
const minPart = 256

// partSet holds the encoded parts of one batch.
type partSet struct {
	bufs [][]byte  // the bytes to write, part by part
	owns []*[]byte // the pooled buffers they are in
	errs []error
	wg   sync.WaitGroup
}

// Write appends the batch and, with sync: batch, returns only after an fsync that covers
// it. A failed write is cut back off the file, so that a retry does not leave a partial line.
func (s *Sink) Write(_ context.Context, b *flow.Batch) error {
	skip, err := s.alreadyWritten(b.Events)
	if err != nil {
		return err
	}
	ps := s.encode(b.Events, skip)
	defer s.release(ps)
	for _, err := range ps.errs {
		if err != nil {
			return fmt.Errorf("compress a batch for %s: %w", s.path, err)
		}
	}
	end, err := s.append(ps.bufs)
	if err != nil {
		return err
	}
	if s.cfg.Sync == "batch" {
		return s.syncTo(end)
	}
	return nil
}

// encode cuts events into parts and encodes them in parallel, the first on the calling
// goroutine.
func (s *Sink) encode(events []flow.Event, skip []bool) *partSet {
	n := min(s.workers, max(1, len(events)/minPart))
	ps, _ := s.parts.Get().(*partSet)
	if ps == nil {
		ps = &partSet{}
	}
	ps.bufs, ps.owns, ps.errs = ps.bufs[:0], ps.owns[:0], ps.errs[:0]
	for range n {
		ps.bufs, ps.owns, ps.errs = append(ps.bufs, nil), append(ps.owns, nil), append(ps.errs, nil)
	}
	per := (len(events) + n - 1) / max(n, 1)
	part := func(i int) {
		lo, hi := min(i*per, len(events)), min((i+1)*per, len(events))
		var sk []bool
		if skip != nil {
			sk = skip[lo:hi]
		}
		ps.owns[i], ps.errs[i] = s.encodePart(events[lo:hi], sk)
		ps.bufs[i] = *ps.owns[i]
	}
	ps.wg.Add(n - 1)
	for i := 1; i < n; i++ {
		go func() {
			defer ps.wg.Done()
			part(i)
		}()
	}
	part(0)
	ps.wg.Wait()
	return ps
}

// encodePart encodes events (but the skipped) as lines, compressed if configured, into a
// buffer of s.bufs (uncompressed) or s.zbufs (compressed), which release returns.
func (s *Sink) encodePart(events []flow.Event, skip []bool) (*[]byte, error) {
	bp, _ := s.bufs.Get().(*[]byte)
	if bp == nil {
		bp = new([]byte)
	}
	enc := schema.Encoder{Format: s.format}
	buf := (*bp)[:0]
	for i := range events {
		if skip != nil && skip[i] {
			continue
		}
		buf = enc.Append(buf, &events[i])
		buf = append(buf, '\n')
	}
	*bp = buf
	if !s.compressed() {
		return bp, nil
	}
	defer s.bufs.Put(bp)
	zp, _ := s.zbufs.Get().(*[]byte)
	if zp == nil {
		zp = new([]byte)
	}
	*zp = (*zp)[:0]
	if len(buf) == 0 {
		return zp, nil
	}
	var err error
	*zp, err = s.compress(buf, *zp)
	return zp, err
}

// release returns a batch's buffers to their pools.
func (s *Sink) release(ps *partSet) {
	pool := &s.bufs
	if s.compressed() {
		pool = &s.zbufs
	}
	for i, p := range ps.owns {
		if p != nil {
			pool.Put(p)
		}
		ps.bufs[i], ps.owns[i] = nil, nil
	}
	s.parts.Put(ps)
}

// compress appends src to dst as one zstd frame or gzip member (whose header records its
// length, frames.go).
func (s *Sink) compress(src, dst []byte) ([]byte, error) {
	if s.lines {
		return linesEncodeAll(src, dst), nil
	}
	if s.zstd != nil {
		return s.zstd.EncodeAll(src, dst), nil
	}
	start := len(dst)
	w := bytesWriter{b: dst}
	gz, _ := s.gzips.Get().(*gzip.Writer)
	if gz == nil {
		gz, _ = gzip.NewWriterLevel(&w, s.gzipLvl)
	} else {
		gz.Reset(&w)
	}
	defer s.gzips.Put(gz)
	gz.Header.Extra = gzipExtraField
	if _, err := gz.Write(src); err != nil {
		return dst, err
	}
	if err := gz.Close(); err != nil {
		return dst, err
	}
	setGzipLength(w.b[start:])
	return w.b, nil
}

// compressed reports whether the file holds zstd frames or gzip members rather than lines.
func (s *Sink) compressed() bool { return s.cfg.Compression == "zstd" || s.cfg.Compression == "gzip" }

// bytesWriter appends to a reused slice.
type bytesWriter struct{ b []byte }

func (w *bytesWriter) Write(p []byte) (int, error) {
	w.b = append(w.b, p...)
	return len(p), nil
}

// alreadyWritten marks the events that resume_scan found in the file; nil when none.
func (s *Sink) alreadyWritten(events []flow.Event) ([]bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.w == nil {
		// Closed by a failed rotation, or never started: open it as append does.
		if err := s.open(); err != nil {
			return nil, err
		}
	}
	if err := s.check(); err != nil {
		return nil, err
	}
	if len(s.resumed) == 0 {
		return nil, nil
	}
	var skip []bool
	n := 0
	for i := range events {
		if _, ok := s.resumed[events[i].EventID]; ok {
			if skip == nil {
				skip = make([]bool, len(events))
			}
			skip[i] = true
			delete(s.resumed, events[i].EventID)
			n++
		}
	}
	if n > 0 {
		s.env.Metrics.Filtered("already_written", n)
		s.env.Logger.Info("events already in the file before the restart, not written again", "file", s.path, "events", n)
	}
	return skip, nil
}

// append writes the parts of a batch under the file lock, rotating first if needed, and
// returns the logical offset where they end.
func (s *Sink) append(parts [][]byte) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.w == nil {
		if err := s.open(); err != nil {
			return 0, err
		}
	}
	total := 0
	for _, p := range parts {
		total += len(p)
	}
	if s.f != nil && s.regular && s.needRotate(int64(total)) {
		if err := s.rotate(); err != nil {
			return 0, err
		}
	}
	written := 0
	for _, p := range parts {
		if len(p) == 0 {
			continue
		}
		n, err := s.w.Write(p)
		written += n
		if err != nil {
			if s.f != nil && s.regular && written > 0 {
				_ = s.f.Truncate(s.size)
			}
			if s.path == "-" && errors.Is(err, syscall.EPIPE) {
				// The reader of standard output went away (`flowpipe run | head -1`): no retry
				// will bring it back, so stop, as a Unix tool stops on a closed pipe.
				return 0, flow.Fatal(errors.New("standard output was closed by its reader (broken pipe)"))
			}
			return 0, fmt.Errorf("write %s: %w", s.path, err)
		}
	}
	s.size += int64(written)
	return s.written.Add(int64(written)), nil
}

// syncTo returns once every byte up to end is on disk, running an fsync unless one that
// started after those bytes were written already covered them.
func (s *Sink) syncTo(end int64) error {
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	if s.synced.Load() >= end {
		return nil
	}
	target := s.written.Load()
	f := s.cur.Load()
	if f == nil || !s.regular {
		s.synced.Store(target)
		return nil
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", s.path, err)
	}
	s.synced.Store(target)
	return nil
}

func (s *Sink) needRotate(next int64) bool {
	if s.size == 0 {
		return false
	}
	if s.cfg.MaxSize > 0 && s.size+next > int64(s.cfg.MaxSize) {
		return true
	}
	return s.cfg.MaxAge > 0 && time.Since(s.opened) >= s.cfg.MaxAge
}

// rotate renames the current file to PATH.<UTC time> and opens a fresh one, then removes
// the oldest rotated files beyond max_files.
func (s *Sink) rotate() error {
	// Make what was written durable first: writers waiting in syncTo count on it.
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	if err := s.f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", s.path, err)
	}
	s.synced.Store(s.written.Load())
	s.cur.Store(nil)
	if err := s.f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", s.path, err)
	}
	s.f, s.w = nil, nil
	rotated := s.path + "." + time.Now().UTC().Format("20060102T150405.000000000Z")
	if err := os.Rename(s.path, rotated); err != nil {
		return fmt.Errorf("rotate %s: %w", s.path, err)
	}
	if err := s.open(); err != nil {
		return err
	}
	if s.cfg.MaxFiles > 0 {
		old, err := filepath.Glob(s.path + ".*")
		if err == nil && len(old) > s.cfg.MaxFiles {
			sort.Strings(old) // the UTC timestamp suffix sorts by age
			for _, f := range old[:len(old)-s.cfg.MaxFiles] {
				if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
					s.env.Logger.Warn("cannot remove old rotated file", "file", f, "error", err)
				} else if err == nil {
					s.env.Logger.Info("removed the oldest rotated file (max_files)", "file", f, "max_files", s.cfg.MaxFiles)
				}
			}
		}
	}
	return nil
}

// Close syncs and closes the file.
func (s *Sink) Close(context.Context) error {
	if s.stopSync != nil {
		close(s.stopSync)
		<-s.syncDone
		s.stopSync = nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	if s.f == nil {
		return nil
	}
	err := s.f.Sync()
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	s.f, s.w = nil, nil
	s.cur.Store(nil)
	if err != nil && s.regular {
		return fmt.Errorf("close %s: %w", s.path, err)
	}
	return nil
}
