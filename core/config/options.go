package config

import "github.com/flowpipe/flowpipe/core/options"

// The option decoding lives in core/options, which a plugin links without the loader; these
// names keep the configuration API in one place for the runtime's callers.
type (
	FieldError  = options.FieldError
	FieldErrors = options.FieldErrors
	ByteSize    = options.ByteSize
)

// Decode is options.Decode.
func Decode(raw map[string]any, out any, prefix string) FieldErrors {
	return options.Decode(raw, out, prefix)
}

// Join is options.Join.
func Join(parent, child string) string { return options.Join(parent, child) }
