package options

import "errors"

// Check is the one path from raw options to a valid config, in process and in a plugin
// process alike: it decodes raw into cfg (a pointer to a struct holding the defaults) and
// runs cfg's Validate() error if it has one, reporting every problem at once: a typo in one
// key does not hide a bad value in another. Validate's findings at a key that already
// failed to decode (and so kept its default) are left out. Every problem comes back with
// its key path under prefix, ready to be positioned at its line.
func Check(raw map[string]any, cfg any, prefix string) FieldErrors {
	errs := Decode(raw, cfg, "")
	v, ok := cfg.(interface{ Validate() error })
	if ok {
		if err := v.Validate(); err != nil {
			found, ok := FieldErrorsOf(err)
			if !ok {
				found = FieldErrors{{Msg: err.Error()}}
			}
			bad := map[string]bool{}
			for _, e := range errs {
				bad[e.Path] = true
			}
			for _, e := range found {
				if !bad[e.Path] {
					errs = append(errs, e)
				}
			}
		}
	}
	if prefix == "" || len(errs) == 0 {
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
