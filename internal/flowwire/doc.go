// Package flowwire is what the gRPC sink (sinks/grpc) and the gRPC receiver (sources/grpc)
// share about NetBird's flow protocol (proto/flow): the encoding of a flow.Event as a
// FlowEvent message and back, the gRPC codec that sends pre-encoded events and decodes
// received ones straight into flow.Event values, and the time-limited HMAC bearer tokens.
//
// The hand-written encoder and decoder exist because every event crosses the wire as its own
// message (NetBird's client sends one event per message, and ACKs are per event): going
// through the generated structs would cost several allocations per event on both ends. They
// are tested against the generated code (proto/flow) in both directions and fuzzed.
package flowwire
