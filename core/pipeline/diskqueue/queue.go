// Package diskqueue is a sink's queue on disk: a segmented log of batches in one directory,
// so that what a sink had accepted survives a crash, a kill or a restart of flowpipe.
//
// A batch appended to the queue is written as one record (length, checksums, the packed
// codec payload, its event count) and, with Sync "batch", fsynced before Append returns; the
// pipeline then counts the batch as accepted by the sink. The sink's writers take records
// back with Next, streaming from disk (memory holds only the batches being written), and a
// record is confirmed in a small cursor file once the sink has written it; segments whose
// records are all confirmed are deleted.
//
// Damage never stops Open: a torn tail is cut off, a damaged record or segment is skipped,
// and what was skipped is counted (in events when the sequence numbers around it tell, in
// bytes otherwise) and logged with the file and offset. Inspect, Verify and Repair are the
// offline tools behind `flowpipe queue`.
package diskqueue

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/codec"
	"github.com/flowpipe/flowpipe/internal/lockfile"
)

// Policies for a full queue.
const (
	Block      = "block"
	DropOldest = "drop_oldest"
	DropNewest = "drop_newest"
)

// Sync modes.
const (
	SyncBatch    = "batch"    // fsync before Append returns
	SyncInterval = "interval" // fsync every SyncInterval; Append returns after the write
)

// Options configure a queue.
type Options struct {
	Dir string
	// MaxSize bounds the bytes of segment files on disk. A record larger than MaxSize is
	// still admitted into an empty queue, so that it cannot block forever.
	MaxSize int64
	// SegmentSize is the size at which a segment is closed and the next one started;
	// 0 picks MaxSize/8 within [64KiB, 64MiB].
	SegmentSize  int64
	WhenFull     string // Block (default), DropOldest or DropNewest
	Sync         string // SyncBatch (default) or SyncInterval
	SyncInterval time.Duration
	Logger       *slog.Logger
	// Dropped counts events the queue itself lost: "queue_full" (evicted by DropOldest) and
	// "queue_corrupt" (damaged on disk). May be nil.
	Dropped func(reason string, events int)
	// Fsync observes the duration of every fsync of a segment. May be nil.
	Fsync func(time.Duration)
}

// ErrFull is returned by Append under DropNewest when the batch does not fit.
var ErrFull = errors.New("disk queue is full")

// ErrClosed is returned by Append after CloseWrites or Close.
var ErrClosed = errors.New("disk queue is closed")

// Queue is an open disk queue. Its methods are safe for concurrent use.
type Queue struct {
	opts Options
	log  *slog.Logger
	lock *os.File

	mu       sync.Mutex
	segs     []*segment // in id order; the last is the one written when w is set
	w        *segment   // the segment appends go to; nil until the first append after Open
	nextID   uint64
	nextSeq  uint64
	bytes    int64
	r        *segment // the segment the reader is in
	roff     int64
	rfile    *os.File
	expect   uint64 // sequence of the next event the reader should see; 0: unknown
	inflight []*flight
	closed   bool // no more appends
	stopped  bool // no more reads
	shut     bool // Close has run: the directory is released, nothing more changes
	dirty    bool // the cursor has moved since it was written
	full     bool // the last write hit ENOSPC or a failed fsync; logged once
	notEmpty chan struct{}
	notFull  chan struct{}

	syncMu sync.Mutex // serialises fsyncs of segments (group commit)

	smu      sync.Mutex // guards the records waiting for the syncer
	scond    *sync.Cond
	spend    []pendingSync
	sstop    bool // Close asked the syncer to finish
	sdone    bool // the syncer has finished: appends sync themselves
	syncDone chan struct{}

	corrupt atomic.Int64
	bufs    sync.Pool // *[]byte payload buffers
	evs     sync.Pool // *[]flow.Event slices of delivered batches

	flushStop chan struct{}
	flushDone chan struct{}
}

type segment struct {
	id      uint64
	path    string
	size    int64 // end of valid data (written data for the active segment)
	unread  int64 // events in records the reader has not reached
	records int64 // and those records
	f       *os.File
	written atomic.Int64 // size, for the syncer
	synced  int64        // under syncMu
	syncErr error        // under syncMu
	sealed  bool
	gone    bool // deleted
}

// flight is a record handed to the sink and not yet confirmed.
type flight struct {
	seg      *segment
	off, end int64
	seq      uint64
	events   int
	time     int64
	done     bool
}

// Open opens (or creates) the queue in opts.Dir, taking its lock: one process at a time.
// Damage found on the way is logged and counted, never an error; errors are for what makes
// the directory unusable (permissions, the lock held by another process).
func Open(opts Options) (*Queue, error) {
	if opts.WhenFull == "" {
		opts.WhenFull = Block
	}
	if opts.Sync == "" {
		opts.Sync = SyncBatch
	}
	if opts.SyncInterval <= 0 {
		opts.SyncInterval = 100 * time.Millisecond
	}
	if opts.MaxSize <= 0 {
		opts.MaxSize = 1 << 30
	}
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = min(max(opts.MaxSize/8, 64<<10), 64<<20)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	q := &Queue{
		opts: opts, log: opts.Logger.With("queue", opts.Dir),
		notEmpty: make(chan struct{}, 1), notFull: make(chan struct{}, 1),
		flushStop: make(chan struct{}), flushDone: make(chan struct{}), syncDone: make(chan struct{}),
	}
	q.scond = sync.NewCond(&q.smu)
	if err := os.MkdirAll(opts.Dir, 0o750); err != nil {
		return nil, fmt.Errorf("disk queue: %w", err)
	}
	lock, err := lockDir(opts.Dir)
	if err != nil {
		return nil, err
	}
	q.lock = lock
	if err := q.load(); err != nil {
		unlockDir(lock)
		return nil, err
	}
	go q.flusher()
	go q.syncer()
	return q, nil
}

// lockDir takes the queue's lock file, so that two processes (or two sinks) never share a
// queue.
func lockDir(dir string) (*os.File, error) {
	f, err := lockfile.Lock(filepath.Join(dir, lockName), false)
	if errors.Is(err, lockfile.ErrLocked) {
		return nil, fmt.Errorf("disk queue %s is in use by another flowpipe process (or another sink); stop it or give each sink its own queue.path", dir)
	}
	if err != nil {
		return nil, fmt.Errorf("disk queue: %w", err)
	}
	return f, nil
}

func unlockDir(f *os.File) { lockfile.Unlock(f) }

// load reads the directory: the cursor, the segments (headers only, never the payloads),
// cutting a torn tail off the newest segment.
func (q *Queue) load() error {
	dir := q.opts.Dir
	cur, curOK := position{}, false
	if b, err := os.ReadFile(filepath.Join(dir, cursorName)); err == nil {
		if c, err := decodeCursor(b); err == nil {
			cur, curOK = c, true
		} else {
			q.log.Warn("disk queue cursor is damaged; delivering everything the queue holds again (duplicates possible)", "file", filepath.Join(dir, cursorName), "error", err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("disk queue: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("disk queue: %w", err)
	}
	var ids []uint64
	for _, e := range entries {
		name := e.Name()
		if id, ok := parseSegName(name); ok && e.Type().IsRegular() {
			ids = append(ids, id)
			continue
		}
		switch {
		case name == lockName || name == cursorName:
		case filepath.Ext(name) == tmpSuffix:
			os.Remove(filepath.Join(dir, name)) // a write interrupted by a crash
		default:
			q.log.Warn("ignoring a file that is not part of the disk queue", "file", filepath.Join(dir, name))
		}
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	q.nextSeq = 1
	if curOK {
		q.expect = cur.seq
		q.nextSeq = max(q.nextSeq, cur.seq)
		q.nextID = cur.seg + 1
	}
	for i, id := range ids {
		path := filepath.Join(dir, segName(id))
		if curOK && id < cur.seg {
			os.Remove(path) // confirmed; its deletion was interrupted
			continue
		}
		q.nextID = max(q.nextID, id+1)
		s, lastSeq := q.loadSegment(path, id, curOK && id == cur.seg, cur.off, i == len(ids)-1)
		if s == nil {
			continue
		}
		q.nextSeq = max(q.nextSeq, lastSeq)
		q.segs = append(q.segs, s)
		q.bytes += s.size
	}
	if q.nextID == 0 {
		q.nextID = 1
	}
	if !curOK && len(ids) == 0 {
		q.expect = 1 // a new queue: the first record is sequence 1
	}
	if len(q.segs) > 0 {
		q.r = q.segs[0]
		q.roff = segHdrSize
		if curOK && q.r.id == cur.seg {
			q.roff = max(cur.off, segHdrSize)
		} else if curOK && q.r.id > cur.seg {
			q.roff = segHdrSize
		}
	}
	if n := q.pendingLocked(); n > 0 {
		q.log.Info("disk queue holds undelivered events; delivering them first", "events", n, "segments", len(q.segs), "bytes", q.bytes)
	}
	return nil
}

// loadSegment scans one segment's record headers. The newest segment's torn tail (a record
// cut short by a crash) is cut off and counted. lastSeq is the sequence after its last
// record.
func (q *Queue) loadSegment(path string, id uint64, isCursorSeg bool, curOff int64, newest bool) (*segment, uint64) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		q.log.Error("cannot open disk queue segment; skipping it", "file", path, "error", err)
		return nil, 0
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, 0
	}
	size := st.Size()
	var hb [segHdrSize]byte
	n, _ := f.ReadAt(hb[:], 0)
	s := &segment{id: id, path: path, size: size, sealed: true}
	if err := parseSegHeader(hb[:n], id); errors.Is(err, errNewer) {
		q.log.Error("disk queue segment left unread", "file", path, "error", err)
		return nil, 0
	} else if err != nil {
		// Records may still be intact: the reader finds them by their own headers.
		q.log.Warn("disk queue segment header is damaged; reading its records by their own checksums", "file", path, "error", err)
	}
	var lastSeq uint64
	off := int64(segHdrSize)
	var lastGood int64 = segHdrSize
	tail := scanKind(-1)
	var tailHdr recHeader
	for off < size {
		kind, h, next, err := scanAt(f, off, size, nil)
		if err != nil {
			q.log.Error("reading disk queue segment", "file", path, "offset", off, "error", err)
			break
		}
		switch kind {
		case recOK:
			if !isCursorSeg || off >= curOff {
				s.unread += int64(h.events)
				s.records++
			}
			lastSeq = h.seq + uint64(h.events)
			lastGood, tail = next, -1
		case recTorn:
			tail, tailHdr = recTorn, h
		case recGarbage:
			tail = recGarbage
		}
		off = next
	}
	if newest && tail >= 0 && lastGood < size {
		cut := size - lastGood
		if err := f.Truncate(lastGood); err != nil {
			q.log.Error("cannot cut the torn tail of a disk queue segment", "file", path, "offset", lastGood, "error", err)
		} else {
			s.size = lastGood
			q.corrupt.Add(cut)
			if tail == recTorn {
				q.dropped("queue_corrupt", int(tailHdr.events))
				q.log.Warn("cut the torn tail of a disk queue segment (a write interrupted by a crash)", "file", path, "offset", lastGood, "bytes", cut, "events", tailHdr.events)
			} else {
				q.log.Warn("cut the torn tail of a disk queue segment (a write interrupted by a crash)", "file", path, "offset", lastGood, "bytes", cut)
			}
		}
	}
	s.written.Store(s.size)
	s.synced = s.size
	return s, lastSeq
}

func (q *Queue) dropped(reason string, n int) {
	if n > 0 && q.opts.Dropped != nil {
		q.opts.Dropped(reason, n)
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// Append writes events as one record. It returns nil once the record is written (and, with
// SyncBatch, fsynced): from then on the queue owns it. Under Block it waits for room until
// ctx is done; under DropNewest it returns ErrFull when there is none; under DropOldest it
// deletes the oldest segments (counting their events as dropped, reason queue_full). A
// failed fsync writes the record again in a new segment (the sink may see it twice, which
// delivery at least once allows).
func (q *Queue) Append(ctx context.Context, events []flow.Event) error {
	for {
		errc := make(chan error, 1)
		if err := q.AppendAsync(ctx, events, func(err error) { errc <- err }); err != nil {
			return err
		}
		if err := <-errc; err == nil {
			return nil
		}
		if err := q.waitRoom(ctx); err != nil {
			return err
		}
	}
}

// AppendAsync is Append that returns once the record is written, before its fsync: durable
// runs when the record is durable (nil) or its fsync failed (the record may be lost then).
// Writes that arrive while an fsync runs share the next one (group commit), so a source
// emitting one batch after another is not held to one fsync per batch. With SyncInterval
// durable runs at once. An error return means the record was not written, and durable
// does not run.
func (q *Queue) AppendAsync(ctx context.Context, events []flow.Event, durable func(error)) error {
	if len(events) == 0 {
		durable(nil)
		return nil
	}
	bp := q.getBuf()
	*bp = codec.Append(append((*bp)[:0], make([]byte, recHdrSize)...), events)
	defer q.bufs.Put(bp)
	return q.appendRecord(ctx, *bp, len(events), durable)
}

// appendRecord writes the record in buf (header space first, then the payload) and has
// durable run as AppendAsync says.
func (q *Queue) appendRecord(ctx context.Context, buf []byte, events int, durable func(error)) error {
	seg, end, err := q.write(ctx, buf, events)
	if err != nil {
		return err
	}
	if q.opts.Sync != SyncBatch {
		durable(nil)
		return nil
	}
	q.queueSync(pendingSync{seg: seg, end: end, done: durable})
	return nil
}

// AppendEncodedAsync is AppendAsync of n events already encoded in the queue's codec
// (internal/codec, as a source plugin sends them and Next decodes them): data is written as
// it is, with neither decoding nor encoding again. data must be exactly n valid events (the
// plugin host validated or decoded it); it is copied before AppendEncodedAsync returns.
func (q *Queue) AppendEncodedAsync(ctx context.Context, data []byte, n int, durable func(error)) error {
	if n == 0 {
		durable(nil)
		return nil
	}
	bp := q.getBuf()
	*bp = append(append((*bp)[:0], make([]byte, recHdrSize)...), data...)
	defer q.bufs.Put(bp)
	return q.appendRecord(ctx, *bp, n, durable)
}

// pendingSync is a written record waiting for its fsync.
type pendingSync struct {
	seg  *segment
	end  int64
	done func(error)
}

// maxUnsynced bounds the records written and not yet fsynced; past it appends wait.
const maxUnsynced = 256

func (q *Queue) queueSync(p pendingSync) {
	q.smu.Lock()
	for len(q.spend) >= maxUnsynced && !q.sdone {
		q.scond.Wait()
	}
	if q.sdone {
		q.smu.Unlock()
		p.done(q.syncSeg(p.seg, p.end))
		return
	}
	q.spend = append(q.spend, p)
	q.scond.Broadcast()
	q.smu.Unlock()
}

// syncer fsyncs what was written since its last fsync, in one go, and reports each record.
func (q *Queue) syncer() {
	defer close(q.syncDone)
	q.smu.Lock()
	for {
		for len(q.spend) == 0 && !q.sstop {
			q.scond.Wait()
		}
		if len(q.spend) == 0 {
			q.sdone = true
			q.scond.Broadcast()
			q.smu.Unlock()
			return
		}
		batch := q.spend
		q.spend = nil
		q.scond.Broadcast()
		q.smu.Unlock()
		// One fsync per segment covers every record written to it so far.
		errs := map[*segment]error{}
		for _, p := range batch {
			if _, done := errs[p.seg]; !done {
				errs[p.seg] = q.syncSeg(p.seg, p.end)
			}
		}
		for s, err := range errs {
			if err != nil {
				q.log.Error("disk queue fsync failed; the records since the last fsync may be lost, continuing in a new segment", "file", s.path, "error", err)
				q.mu.Lock()
				q.noteFullLocked(err, 0)
				if q.w == s {
					q.sealLocked()
				}
				q.mu.Unlock()
			}
		}
		for _, p := range batch {
			p.done(errs[p.seg])
		}
		q.smu.Lock()
	}
}

func (q *Queue) getBuf() *[]byte {
	if p, ok := q.bufs.Get().(*[]byte); ok {
		return p
	}
	b := make([]byte, 0, 64<<10)
	return &b
}

// write appends the record in buf (header space first) under the full-queue policy.
func (q *Queue) write(ctx context.Context, buf []byte, events int) (*segment, int64, error) {
	n := int64(len(buf))
	q.mu.Lock()
	for {
		if q.closed {
			q.mu.Unlock()
			return nil, 0, ErrClosed
		}
		room := q.roomLocked(n)
		if room {
			seg, end, err := q.appendLocked(buf, events)
			if err == nil {
				if q.full {
					q.full = false
					q.log.Info("disk queue is writable again")
				}
				q.mu.Unlock()
				signal(q.notEmpty)
				return seg, end, nil
			}
			if !isFull(err) {
				q.mu.Unlock()
				return nil, 0, fmt.Errorf("disk queue: %w", err)
			}
			q.noteFullLocked(err, n)
		}
		switch q.opts.WhenFull {
		case DropNewest:
			q.mu.Unlock()
			return nil, 0, ErrFull
		case DropOldest:
			if q.evictLocked() {
				continue
			}
			if !room || q.full {
				q.mu.Unlock()
				return nil, 0, ErrFull // nothing left to evict: the disk itself is full
			}
		default:
			if q.rollToFreeLocked() {
				continue
			}
		}
		q.mu.Unlock()
		if err := q.waitRoom(ctx); err != nil {
			return nil, 0, err
		}
		q.mu.Lock()
	}
}

// waitRoom waits until space may have been freed (a segment deleted), or a second passes
// (the disk may have been freed by someone else).
func (q *Queue) waitRoom(ctx context.Context) error {
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-q.notFull:
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

func isFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

func (q *Queue) noteFullLocked(err error, need int64) {
	if q.full {
		return
	}
	q.full = true
	var st syscall.Statfs_t
	free := int64(-1)
	if syscall.Statfs(q.opts.Dir, &st) == nil {
		free = int64(st.Bavail) * int64(st.Bsize)
	}
	q.log.Error("disk queue cannot write: the disk is full; applying when_full until space returns", "path", q.opts.Dir, "free_bytes", free, "record_bytes", need, "policy", q.opts.WhenFull, "error", err)
}

// roomLocked reports whether a record of n bytes fits under MaxSize. An empty queue takes
// any record.
func (q *Queue) roomLocked(n int64) bool {
	if q.bytes+n <= q.opts.MaxSize {
		return true
	}
	if q.pendingLocked() == 0 {
		q.rollToFreeLocked() // everything is confirmed: let it go
		return true
	}
	return false
}

// appendLocked writes one record at the end of the active segment, starting a new segment
// first when the record would make the active one larger than SegmentSize.
func (q *Queue) appendLocked(buf []byte, events int) (*segment, int64, error) {
	n := int64(len(buf))
	if q.w != nil && q.w.size > segHdrSize && q.w.size+n > q.opts.SegmentSize {
		q.sealLocked()
	}
	if q.w == nil {
		if err := q.newSegmentLocked(); err != nil {
			return nil, 0, err
		}
	}
	w := q.w
	putRecHeader(buf, recHeader{
		length: uint32(n - recHdrSize), events: uint32(events),
		seq: q.nextSeq, time: time.Now().UnixNano(), sum: crc(buf[recHdrSize:]),
	})
	if _, err := w.f.WriteAt(buf, w.size); err != nil {
		if terr := w.f.Truncate(w.size); terr != nil {
			// The partial record stays; readers skip it by its checksum. Write no more here.
			q.sealLocked()
		}
		return nil, 0, err
	}
	w.size += n
	w.written.Store(w.size)
	w.unread += int64(events)
	w.records++
	q.bytes += n
	q.nextSeq += uint64(events)
	return w, w.size, nil
}

func (q *Queue) newSegmentLocked() error {
	id := q.nextID
	path := filepath.Join(q.opts.Dir, segName(id))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o640)
	if err != nil {
		return err
	}
	if _, err := f.Write(segHeader(id)); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := syncDir(q.opts.Dir); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	q.nextID++
	s := &segment{id: id, path: path, size: segHdrSize, f: f}
	s.written.Store(segHdrSize)
	s.synced = segHdrSize
	q.segs = append(q.segs, s)
	q.w = s
	q.bytes += segHdrSize
	if q.r == nil {
		q.r, q.roff = s, segHdrSize
	}
	return nil
}

// sealLocked closes the active segment for writing (fsynced): the next append starts a new
// one.
func (q *Queue) sealLocked() {
	w := q.w
	if w == nil {
		return
	}
	q.w = nil
	q.syncMu.Lock()
	if w.synced < w.written.Load() && w.syncErr == nil {
		if err := w.f.Sync(); err != nil {
			w.syncErr = err
		} else {
			w.synced = w.written.Load()
		}
	}
	w.f.Close()
	w.f = nil
	w.sealed = true
	q.syncMu.Unlock()
	q.collectLocked()
}

// syncSeg makes the segment durable up to end; concurrent callers share one fsync.
func (q *Queue) syncSeg(s *segment, end int64) error {
	q.syncMu.Lock()
	defer q.syncMu.Unlock()
	if s.synced >= end {
		return nil
	}
	if s.syncErr != nil {
		return s.syncErr
	}
	if s.f == nil {
		return nil // sealed, and sealing synced it
	}
	target := s.written.Load()
	t0 := time.Now()
	err := s.f.Sync()
	if q.opts.Fsync != nil {
		q.opts.Fsync(time.Since(t0))
	}
	if err != nil {
		s.syncErr = err
		return err
	}
	s.synced = target
	return nil
}

// rollToFreeLocked seals the active segment when some of it is confirmed, so that it can be
// deleted once the rest is: without it a queue whose data all sits in one segment could not
// free space. It reports whether anything changed.
func (q *Queue) rollToFreeLocked() bool {
	if q.w == nil || q.w.size <= segHdrSize {
		return false
	}
	c := q.confirmedLocked()
	if c.seg != q.w.id || c.off <= segHdrSize {
		return false
	}
	before := q.bytes
	q.sealLocked()
	return q.bytes < before || q.pendingLocked() == 0
}

// evictLocked deletes the oldest segment for DropOldest, counting the events in it that the
// reader had not reached. It reports whether it freed anything.
func (q *Queue) evictLocked() bool {
	if len(q.segs) == 0 {
		return false
	}
	s := q.segs[0]
	if s == q.w {
		if s.size <= segHdrSize {
			return false
		}
		q.sealLocked()
		if len(q.segs) == 0 || q.segs[0] != s {
			return true // sealing let it be collected
		}
	}
	q.dropped("queue_full", int(s.unread))
	if q.r == s {
		q.closeReaderLocked()
		q.r = nil
		if len(q.segs) > 1 {
			q.r, q.roff = q.segs[1], segHdrSize
		}
		q.expect = 0 // the next record's sequence is not a gap to count
	}
	q.removeLocked(s)
	q.dirty = true
	return true
}

func (q *Queue) removeLocked(s *segment) {
	s.gone = true
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		q.log.Error("cannot delete a disk queue segment", "file", s.path, "error", err)
	}
	q.bytes -= s.size
	q.segs = slices.DeleteFunc(q.segs, func(x *segment) bool { return x == s })
	if q.r == s {
		q.closeReaderLocked()
		q.r = nil
	}
	signal(q.notFull)
}

func (q *Queue) closeReaderLocked() {
	if q.rfile != nil {
		q.rfile.Close()
		q.rfile = nil
	}
}

// confirmedLocked is the position before which the sink has confirmed everything.
func (q *Queue) confirmedLocked() position {
	if len(q.inflight) > 0 {
		f := q.inflight[0]
		return position{seg: f.seg.id, off: f.off, seq: f.seq}
	}
	if q.r != nil {
		return position{seg: q.r.id, off: q.roff, seq: q.expect}
	}
	return position{seg: q.nextID, off: segHdrSize, seq: q.nextSeq}
}

// collectLocked moves the reader past finished segments and deletes the segments before the
// confirmed position.
func (q *Queue) collectLocked() {
	for q.r != nil && q.r.sealed && q.roff >= q.r.size {
		i := slices.Index(q.segs, q.r)
		q.closeReaderLocked()
		if i < 0 || i+1 >= len(q.segs) {
			break
		}
		q.r, q.roff = q.segs[i+1], segHdrSize
	}
	c := q.confirmedLocked()
	for len(q.segs) > 0 {
		s := q.segs[0]
		finished := s.sealed && s == q.r && q.roff >= s.size && len(q.inflight) == 0
		if s == q.w || s.id >= c.seg && !finished {
			break
		}
		if s == q.r {
			q.r = nil
			if len(q.segs) > 1 {
				q.r, q.roff = q.segs[1], segHdrSize
			}
		}
		q.removeLocked(s)
	}
}

func (q *Queue) pendingLocked() int64 {
	var n int64
	for _, s := range q.segs {
		n += s.unread
	}
	for _, f := range q.inflight {
		if !f.done {
			n += int64(f.events)
		}
	}
	return n
}

// Next returns the oldest record not yet handed out, as a batch whose acknowledgement
// confirms it: nil or any error but flow.ErrShutdown removes it from the queue, while
// flow.ErrShutdown leaves it to be delivered again at the next start. Next waits for a
// record; it returns nil when ctx is done, after Stop, or after CloseWrites once everything
// written has been handed out.
func (q *Queue) Next(ctx context.Context) *flow.Batch { return q.next(ctx, true) }

// NextEncoded is Next without decoding: the batch holds the record's payload as it is on
// disk (the plugin host's codec, internal/codec), undecoded (flow.NewEncodedBatch), so that
// a sink plugin is sent it as it is and another sink decodes it once (flow.Batch.Decode).
// The payload is checked first with codec.Validate, which makes every check codec.Decode
// makes, so a record that Next would skip as damaged (counted as queue_corrupt, logged) is
// skipped and counted the same way, and never handed out. The payload stays in the queue's
// read buffer until the batch is acknowledged, which gives the buffer back; whoever keeps
// the encoding beyond (a tap's ring) copies it (flow.Batch.EncodingCopy).
func (q *Queue) NextEncoded(ctx context.Context) *flow.Batch { return q.next(ctx, false) }

func (q *Queue) next(ctx context.Context, decode bool) *flow.Batch {
	for {
		q.mu.Lock()
		var fl *flight
		var payload *[]byte
		for {
			if q.stopped {
				q.mu.Unlock()
				return nil
			}
			var ok bool
			fl, payload, ok = q.readLocked()
			if ok {
				break
			}
			if q.closed {
				q.mu.Unlock()
				signal(q.notEmpty)
				return nil
			}
			q.mu.Unlock()
			select {
			case <-q.notEmpty:
			case <-ctx.Done():
				return nil
			}
			q.mu.Lock()
		}
		q.inflight = append(q.inflight, fl)
		q.mu.Unlock()
		signal(q.notEmpty) // another writer may take the next record

		if !decode {
			sourced, err := codec.Validate(*payload, fl.events)
			if err != nil {
				q.bufs.Put(payload)
				q.corruptRecord(fl, err)
				q.confirm(fl)
				continue
			}
			return flow.NewEncodedBatch(*payload, fl.events, sourced, codec.Decode, func(err error) {
				// Nothing reads the payload after the ack: the sink has sent or decoded it.
				q.bufs.Put(payload)
				if errors.Is(err, flow.ErrShutdown) {
					return // stays in the queue for the next start
				}
				q.confirm(fl)
			})
		}
		ep, _ := q.evs.Get().(*[]flow.Event)
		if ep == nil {
			ep = new([]flow.Event)
		}
		events, err := codec.Decode((*ep)[:0], *payload, fl.events)
		q.bufs.Put(payload)
		if err != nil {
			q.corruptRecord(fl, err)
			q.evs.Put(ep)
			q.confirm(fl)
			continue
		}
		*ep = events
		return flow.NewBatch(events, func(err error) {
			if errors.Is(err, flow.ErrShutdown) {
				return // stays in the queue for the next start
			}
			q.confirm(fl)
			clear(*ep)
			q.evs.Put(ep)
		})
	}
}

func (q *Queue) corruptRecord(fl *flight, err error) {
	q.dropped("queue_corrupt", fl.events)
	q.log.Error("skipped a damaged disk queue record", "file", fl.seg.path, "offset", fl.off, "events", fl.events, "error", err)
}

// readLocked reads the next valid record at the reader's position, skipping and counting
// damage.
func (q *Queue) readLocked() (*flight, *[]byte, bool) {
	for {
		if q.r == nil {
			if len(q.segs) == 0 {
				return nil, nil, false
			}
			q.r, q.roff = q.segs[0], segHdrSize
		}
		s := q.r
		if q.roff >= s.size {
			if !s.sealed {
				return nil, nil, false
			}
			i := slices.Index(q.segs, s)
			if i+1 >= len(q.segs) {
				return nil, nil, false
			}
			q.closeReaderLocked()
			q.r, q.roff = q.segs[i+1], segHdrSize
			q.collectLocked()
			continue
		}
		if q.rfile == nil {
			f, err := os.Open(s.path)
			if err != nil {
				q.log.Error("cannot open a disk queue segment; skipping it", "file", s.path, "error", err)
				q.corrupt.Add(s.size - q.roff)
				q.roff, s.unread, s.records = s.size, 0, 0
				s.sealed = s.sealed || s != q.w
				continue
			}
			q.rfile = f
		}
		bp := q.getBuf()
		off := q.roff
		kind, h, next, err := scanAt(q.rfile, off, s.size, bp)
		if err != nil {
			q.log.Error("reading a disk queue segment", "file", s.path, "offset", off, "error", err)
		}
		switch kind {
		case recOK, recBadPayload:
			q.roff = next
			s.unread -= int64(h.events)
			s.records--
			if q.expect != 0 && h.seq > q.expect {
				missing := h.seq - q.expect
				q.dropped("queue_corrupt", int(missing))
				q.log.Error("events are missing from the disk queue (a segment or records were damaged or removed)", "file", s.path, "offset", off, "events", missing)
			}
			q.expect = h.seq + uint64(h.events)
			fl := &flight{seg: s, off: off, end: next, seq: h.seq, events: int(h.events), time: h.time}
			if kind == recOK && err == nil {
				return fl, bp, true
			}
			q.bufs.Put(bp)
			q.corruptRecord(fl, errors.New("payload checksum mismatch"))
			q.dirty = true
		default: // recGarbage, recTorn
			q.bufs.Put(bp)
			q.corrupt.Add(next - off)
			q.log.Error("skipped damaged bytes in a disk queue segment", "file", s.path, "offset", off, "bytes", next-off)
			q.roff = next
			q.dirty = true
		}
	}
}

// confirm marks a record as written by the sink and moves the confirmed position over every
// record confirmed in order.
func (q *Queue) confirm(fl *flight) {
	q.mu.Lock()
	if q.shut {
		q.mu.Unlock()
		return // closed: the record comes back at the next start (at least once)
	}
	fl.done = true
	i := 0
	for i < len(q.inflight) && q.inflight[i].done {
		i++
	}
	if i > 0 {
		q.inflight = slices.Delete(q.inflight, 0, i)
		q.dirty = true
		q.collectLocked()
	}
	q.mu.Unlock()
	signal(q.notFull)
}

// flusher writes the cursor when it has moved, and fsyncs under SyncInterval.
func (q *Queue) flusher() {
	defer close(q.flushDone)
	every := 50 * time.Millisecond
	if q.opts.Sync == SyncInterval {
		every = q.opts.SyncInterval
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-q.flushStop:
			return
		case <-t.C:
		}
		q.flush()
	}
}

func (q *Queue) flush() {
	q.mu.Lock()
	w := q.w
	var end int64
	if w != nil {
		end = w.size
	}
	dirty := q.dirty
	q.dirty = false
	c := q.confirmedLocked()
	q.mu.Unlock()
	if w != nil && q.opts.Sync == SyncInterval {
		if err := q.syncSeg(w, end); err != nil {
			q.log.Error("disk queue fsync failed", "file", w.path, "error", err)
		}
	}
	if dirty {
		if err := writeFileAtomic(filepath.Join(q.opts.Dir, cursorName), encodeCursor(c)); err != nil {
			q.log.Error("cannot write the disk queue cursor", "path", q.opts.Dir, "error", err)
			q.mu.Lock()
			q.dirty = true
			q.mu.Unlock()
		}
	}
}

// CloseWrites refuses further appends; Next hands out what is left, then returns nil.
func (q *Queue) CloseWrites() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	signal(q.notEmpty)
	signal(q.notFull)
}

// Stop makes Next return nil from now on; what is left stays on disk for the next start.
func (q *Queue) Stop() {
	q.mu.Lock()
	q.stopped, q.closed = true, true
	q.mu.Unlock()
	signal(q.notEmpty)
	signal(q.notFull)
}

// Close stops the queue, makes what it holds durable, writes the cursor and releases the
// directory. Records handed out and not confirmed by now are delivered again at the next
// start.
func (q *Queue) Close() error {
	q.Stop()
	select {
	case <-q.flushDone:
		return nil // already closed
	default:
	}
	close(q.flushStop)
	<-q.flushDone
	q.smu.Lock()
	q.sstop = true
	q.scond.Broadcast()
	q.smu.Unlock()
	<-q.syncDone
	q.mu.Lock()
	q.sealLocked()
	q.closeReaderLocked()
	q.dirty = true
	q.mu.Unlock()
	q.flush()
	q.mu.Lock()
	q.shut = true
	q.mu.Unlock()
	unlockDir(q.lock)
	return nil
}

// Depth is what the queue holds that the sink has not confirmed, cheaply.
func (q *Queue) Depth() (records, events int64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, s := range q.segs {
		records += s.records
		events += s.unread
	}
	for _, f := range q.inflight {
		if !f.done {
			records++
			events += int64(f.events)
		}
	}
	return records, events
}

// Stats are a queue's figures for metrics.
type Stats struct {
	Segments      int
	Bytes         int64     // segment files on disk
	Events        int64     // events not yet confirmed
	Oldest        time.Time // write time of the oldest unconfirmed record; zero when none
	CorruptBytes  int64     // damaged bytes skipped since Open (events are counted by Dropped)
	InFlightBatch int       // records handed to the sink and not yet confirmed
	// DiskFull: the last write hit ENOSPC (or EDQUOT) or a failed fsync, and no write has
	// succeeded since; appends wait (block) or are refused (drop_*) meanwhile.
	DiskFull bool
}

// Stats returns the queue's current figures.
func (q *Queue) Stats() Stats {
	q.mu.Lock()
	st := Stats{Segments: len(q.segs), Bytes: q.bytes, Events: q.pendingLocked(), CorruptBytes: q.corrupt.Load(), DiskFull: q.full}
	for _, f := range q.inflight {
		if !f.done {
			st.InFlightBatch++
		}
	}
	var peek *segment
	var off int64
	if len(q.inflight) > 0 {
		st.Oldest = time.Unix(0, q.inflight[0].time)
	} else if q.r != nil && q.roff < q.r.size {
		peek, off = q.r, q.roff
	} else if q.r != nil {
		if i := slices.Index(q.segs, q.r); i >= 0 && i+1 < len(q.segs) {
			peek, off = q.segs[i+1], segHdrSize
		}
	}
	q.mu.Unlock()
	if peek != nil {
		if f, err := os.Open(peek.path); err == nil {
			var hb [recHdrSize]byte
			if _, err := f.ReadAt(hb[:], off); err == nil {
				if h, ok := parseRecHeader(hb[:]); ok {
					st.Oldest = time.Unix(0, h.time)
				}
			}
			f.Close()
		}
	}
	return st
}
