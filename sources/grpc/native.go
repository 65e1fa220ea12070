package grpcsource

import (
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/flowpipe/flowpipe/internal/flowwire"
	"github.com/flowpipe/flowpipe/internal/streamwire"
	streampb "github.com/flowpipe/flowpipe/proto/stream"
)

// nativeServer serves flowpipe's batch stream (proto/stream, flowpipe.stream.v1.Collector)
// on the receiver's listener, next to NetBird's FlowService: a whole batch per message in the
// packed codec, one ACK per batch. Authentication, TLS, limits, timeouts, de-duplication and
// the end-to-end ACK are the receiver's, shared with the NetBird protocol; only the framing
// differs. A type of its own, because the generated servers' embedded Unimplemented types
// clash when one type serves both.
type nativeServer struct {
	streampb.UnimplementedCollectorServer
	r *Receiver
}

// Stream serves one flowpipe agent's stream.
func (n nativeServer) Stream(ss grpc.BidiStreamingServer[streampb.Batch, streampb.BatchAck]) error {
	r := n.r
	leave, err := r.admit(ss.Context())
	if err != nil {
		return err
	}
	defer leave()
	// Headers at once: the client treats a stream without them as refused.
	if err := ss.SendHeader(metadata.Pairs("flowpipe-receiver", "1")); err != nil {
		return err
	}
	st := newStream(&r.unacked, true)
	return r.serve(ss, st, func() error { return r.receiveBatches(ss, st) })
}

// receiveBatches reads a native stream's batches until it ends; the result is the stream's
// status.
func (r *Receiver) receiveBatches(ss grpc.ServerStream, st *stream) error {
	ctx := ss.Context()
	var m streamwire.Batch
	if err := ss.RecvMsg(&m); err != nil {
		return r.recvError(ctx, err)
	}
	if m.Invalid != nil {
		return r.refuse(ctx, "malformed", codes.InvalidArgument, "%v", m.Invalid)
	}
	if m.Seq != 0 {
		return r.refuse(ctx, "missing_initiator", codes.InvalidArgument, "the first message must be the opening Batch{seq: 0}, not batch %d", m.Seq)
	}
	close(st.started)
	st.lastRecv.Store(nowNano())
	for {
		// As on a NetBird stream: stop reading while the stream has its maximum of events
		// waiting for ACKs (it may exceed it by one batch).
		for st.unacked.Load() >= int64(r.conf().MaxUnackedPerStrm) {
			select {
			case <-st.room:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if err := ss.RecvMsg(&m); err != nil {
			return r.recvError(ctx, err)
		}
		st.lastRecv.Store(nowNano())
		if m.Size > int(r.conf().MaxBatchMessageSize) {
			return r.refuse(ctx, "oversized", codes.ResourceExhausted, "batch message of %d bytes is above max_batch_message_size (%d)", m.Size, r.conf().MaxBatchMessageSize)
		}
		if m.Invalid != nil {
			return r.refuse(ctx, "malformed", codes.InvalidArgument, "%v", m.Invalid)
		}
		if m.Seq == 0 {
			return r.refuse(ctx, "malformed", codes.InvalidArgument, "%v", fmt.Errorf("%w: seq 0 after the opening message", streamwire.ErrMalformed))
		}
		n := len(m.Events)
		st.mu.Lock()
		_, dup := st.batches[m.Seq]
		if !dup {
			st.batches[m.Seq] = &batchState{left: n, total: n}
			if n == 0 {
				delete(st.batches, m.Seq)
				st.seqAcks = append(st.seqAcks, seqAck{m.Seq, 0})
			}
		}
		st.mu.Unlock()
		if dup {
			return r.refuse(ctx, "malformed", codes.InvalidArgument, "%v", fmt.Errorf("%w: batch %d is already in flight on this stream", streamwire.ErrMalformed, m.Seq))
		}
		if n == 0 {
			st.signal()
			continue
		}
		r.received.Add(float64(n))
		for i := range m.Events {
			m.Events[i].Source = r.env.Name
		}
		st.took(int64(n))
		r.coll.add(st, m.Seq, m.Events)
	}
}

// flushBatches sends a native stream's queued batch ACKs.
func (r *Receiver) flushBatches(ss grpc.ServerStream, st *stream, seqs *[]seqAck) error {
	st.mu.Lock()
	*seqs, st.seqAcks = st.seqAcks, (*seqs)[:0]
	st.mu.Unlock()
	if len(*seqs) == 0 {
		return nil
	}
	// gRPC writes a message's bytes after SendMsg returns: every ACK has bytes of its own.
	all := make([]byte, 0, len(*seqs)*11)
	for i, a := range *seqs {
		start := len(all)
		all = streamwire.AppendAck(all, a.seq)
		if err := ss.SendMsg(flowwire.Raw(all[start:len(all):len(all)])); err != nil {
			var rest int64
			for _, b := range (*seqs)[i:] {
				rest += int64(b.events)
			}
			st.done(rest) // the stream is broken: these ACKs will not be sent
			return err
		}
		st.done(int64(a.events))
	}
	return nil
}

func nowNano() int64 { return time.Now().UnixNano() }
