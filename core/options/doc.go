// Package options turns a component's options, the maps and scalars YAML produces, into its
// typed config struct: strict decoding (unknown keys, wrong types and missing required keys
// are all reported), and problems named by their key path (FieldErrors) so that the caller
// can show each at its line. It is what in-process components and plugins both decode with,
// and it links no configuration loader, so a plugin built on the SDK stays small.
package options
