package config

import (
	"strings"
	"testing"
)

// A tab in the indentation is named as such, at its line.
func TestTabInYAMLSaysTab(t *testing.T) {
	for _, doc := range []string{
		"sources:\n  gen:\n\ttype: generate\nsinks:\n  o: {type: file, path: x}\n",
		"sources:\n  gen: {type: generate}\nsinks:\n\to: {type: file, path: x}\n",
	} {
		_, ps := load(t, doc)
		if len(ps) != 1 || !strings.Contains(ps[0].Msg, "tab") || !strings.Contains(ps[0].Msg, "spaces") {
			t.Errorf("%q: got %v, want one problem that says a tab indents the line", doc, ps)
		}
	}
}
