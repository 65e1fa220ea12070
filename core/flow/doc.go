// Package flow defines the flow event that every flowpipe component shares, the batch in
// which events move through a pipeline, and the acknowledgement that travels from the sinks
// back to the source that produced a batch.
//
// An Event is a plain value (about 270 bytes, see docs/schema.md); events move in batches so
// that locks, syscalls, RPCs and allocations are paid per batch, not per event.
package flow
