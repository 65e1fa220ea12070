package pluginproto

import (
	"errors"
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
