package config

import "strings"

// Problem is one positioned configuration problem: where (file and line, or the environment
// variable that set the value), the full key path, and what is wrong.
type Problem struct {
	Where string // "pipeline.yaml:14", "env FLOWPIPE_SINKS__LOCAL__PATH", or the file alone
	Path  string // full key path, e.g. "sinks.local.max_size"
	Msg   string
}

func (p Problem) String() string {
	var b strings.Builder
	if p.Where != "" {
		b.WriteString(p.Where)
		b.WriteString(": ")
	}
	if p.Path != "" {
		b.WriteString(p.Path)
		b.WriteString(": ")
	}
	b.WriteString(p.Msg)
	return b.String()
}

// Problems is every problem found in a configuration; it is an error.
type Problems []Problem

func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}
