package options

import "errors"

// Check is the one path from raw options to a valid config, in process and in a plugin
// process alike: it decodes raw into cfg (a pointer to a struct holding the defaults) and,
// when that found nothing wrong, runs cfg's Validate() error if it has one. Every problem
// comes back with its key path under prefix, ready to be positioned at its line.
func Check(raw map[string]any, cfg any, prefix string) FieldErrors {
	if errs := Decode(raw, cfg, prefix); len(errs) > 0 {
		return errs
	}
	v, ok := cfg.(interface{ Validate() error })
	if !ok {
		return nil
	}
	err := v.Validate()
	if err == nil {
		return nil
	}
	errs, ok := FieldErrorsOf(err)
	if !ok {
		errs = FieldErrors{{Msg: err.Error()}}
	}
	if prefix == "" {
		return errs
	}
	out := make(FieldErrors, len(errs))
	for i, e := range errs {
		out[i] = FieldError{Path: Join(prefix, e.Path), Msg: e.Msg}
	}
	return out
}

// FieldErrorsOf returns the problems err carries when it is (or wraps) FieldErrors or a
// single FieldError.
func FieldErrorsOf(err error) (FieldErrors, bool) {
	var fe FieldErrors
	if errors.As(err, &fe) {
		return fe, true
	}
	var one FieldError
	if errors.As(err, &one) {
		return FieldErrors{one}, true
	}
	return nil, false
}
