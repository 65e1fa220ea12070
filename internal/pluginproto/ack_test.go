package pluginproto

import (
	"errors"
	"fmt"
	"testing"

	"github.com/flowpipe/flowpipe/core/flow"
)

// A source's acknowledgement keeps its meaning across the boundary: delivered, a counted
// drop (with the sink and reason), a shutdown, or another failure.
func TestAckRoundTrip(t *testing.T) {
	for _, err := range []error{
		nil,
		&flow.DropError{Component: "out", Reason: "queue_full"},
		flow.ErrShutdown,
		errors.New("sink exploded"),
	} {
		got := AckFromProto(AckToProto(7, err))
		switch {
		case err == nil:
			if got != nil {
				t.Errorf("delivered came back as %v", got)
			}
		case flow.IsDrop(err):
			var d *flow.DropError
			if !errors.As(got, &d) || d.Component != "out" || d.Reason != "queue_full" {
				t.Errorf("drop came back as %v", got)
			}
		case errors.Is(err, flow.ErrShutdown):
			if !errors.Is(got, flow.ErrShutdown) {
				t.Errorf("shutdown came back as %v", got)
			}
		default:
			if got == nil || got.Error() != err.Error() {
				t.Errorf("failure came back as %v", got)
			}
		}
	}
}

// A component's error keeps its class and message across the boundary: retryable,
// permanent, a counted drop, a shutdown; an older peer's bare message is retryable.
func TestErrorRoundTrip(t *testing.T) {
	if ErrorFromProto(ErrorToProto(nil), "") != nil {
		t.Fatal("nil came back as an error")
	}
	got := ErrorFromProto(ErrorToProto(errors.New("collector unreachable")), "")
	if got == nil || got.Error() != "collector unreachable" || flow.IsPermanent(got) || flow.IsDrop(got) {
		t.Errorf("retryable came back as %v", got)
	}
	got = ErrorFromProto(ErrorToProto(fmt.Errorf("POST: %w", flow.Permanent(errors.New("400 Bad Request")))), "")
	if !flow.IsPermanent(got) || got.Error() != "POST: 400 Bad Request" {
		t.Errorf("permanent came back as %v", got)
	}
	got = ErrorFromProto(ErrorToProto(&flow.DropError{Component: "out", Reason: "rejected", Message: "malformed"}), "")
	var d *flow.DropError
	if !errors.As(got, &d) || d.Component != "out" || d.Reason != "rejected" || d.Message != "malformed" {
		t.Errorf("drop came back as %v", got)
	}
	got = ErrorFromProto(ErrorToProto(fmt.Errorf("flush: %w", flow.ErrShutdown)), "")
	if !errors.Is(got, flow.ErrShutdown) || got.Error() != "flush: "+flow.ErrShutdown.Error() {
		t.Errorf("shutdown came back as %v", got)
	}
	if got := ErrorFromProto(nil, "old plugin failed"); got == nil || got.Error() != "old plugin failed" || flow.IsPermanent(got) {
		t.Errorf("an older peer's message came back as %v", got)
	}
}
