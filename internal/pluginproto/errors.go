package pluginproto

import (
	"errors"

	"github.com/flowpipe/flowpipe/core/flow"
)

// ErrorToProto carries err across the boundary with its class; nil for nil.
func ErrorToProto(err error) *Error {
	if err == nil {
		return nil
	}
	e := &Error{Message: err.Error()}
	var drop *flow.DropError
	switch {
	case errors.As(err, &drop):
		e.Class, e.Component, e.Reason, e.Message = Error_CLASS_DROP, drop.Component, drop.Reason, drop.Message
	case flow.IsFatal(err):
		e.Class = Error_CLASS_FATAL
	case flow.IsPermanent(err):
		e.Class = Error_CLASS_PERMANENT
	case errors.Is(err, flow.ErrShutdown):
		e.Class = Error_CLASS_SHUTDOWN
	}
	return e
}

// ErrorFromProto rebuilds an error that crossed the boundary: with its class when the peer
// sent one, else from the bare message of an older peer (retryable); nil when neither is set.
func ErrorFromProto(e *Error, message string) error {
	if e == nil {
		if message == "" {
			return nil
		}
		return errors.New(message)
	}
	switch e.Class {
	case Error_CLASS_PERMANENT:
		return flow.Permanent(errors.New(e.Message))
	case Error_CLASS_FATAL:
		return flow.Fatal(errors.New(e.Message))
	case Error_CLASS_DROP:
		return &flow.DropError{Component: e.Component, Reason: e.Reason, Message: e.Message}
	case Error_CLASS_SHUTDOWN:
		return &classed{msg: e.Message, class: flow.ErrShutdown}
	}
	return errors.New(e.Message)
}

// classed keeps the message of an error that wrapped a sentinel on the other side.
type classed struct {
	msg   string
	class error
}

func (c *classed) Error() string { return c.msg }
func (c *classed) Unwrap() error { return c.class }
