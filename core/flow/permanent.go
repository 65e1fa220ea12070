package flow

import "errors"

// Permanent marks a sink's error as permanent: the batch can never be written (the collector
// rejects it as malformed, the endpoint answers 4xx), so retrying it is pointless. The
// runtime drops such a batch at once, counts it as dropped with reason "rejected", logs
// err's message, and acknowledges it to its source as a *DropError carrying that message.
// Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &PermanentError{Err: err}
}

// PermanentError is an error marked with Permanent.
type PermanentError struct{ Err error }

func (e *PermanentError) Error() string { return e.Err.Error() }
func (e *PermanentError) Unwrap() error { return e.Err }

// IsPermanent reports whether err, or an error it wraps, was marked with Permanent.
func IsPermanent(err error) bool {
	var p *PermanentError
	return errors.As(err, &p)
}
