package pipeline

import (
	"context"
	"errors"

	"github.com/flowpipe/flowpipe/core/config"
)

// ReloadReport says what a reload did, component by component. Components are named
// "<kind>/<name>" (source/kernel, sink/collector, enricher/resources).
type ReloadReport struct {
	Started []string // new components, or ones turned on with enabled: true
	Stopped []string // removed components, or ones turned off with enabled: false
	Changed []Change // components whose settings changed
	Kept    []string // unchanged components, left running untouched
	// HandedOver is, by sink name, how many queued events a changed sink's queue handed to
	// its new instance; Delivered how many a removed sink delivered before it stopped, and
	// Undelivered how many it could not (counted as at shutdown).
	HandedOver  map[string]int64
	Delivered   map[string]int64
	Undelivered map[string]int64
}

// Change is one changed component.
type Change struct {
	Component string   // "<kind>/<name>"
	Keys      []string // what changed: option key paths, or type, plugin, isolation, sha256, run_as, process
	// How is "reconfigured" (the running instance took the new options, component.Reconfigurer)
	// or "replaced" (a new instance took over).
	How string
}

// Reload changes the running pipeline into the one doc describes. doc is validated and its
// new and changed components are built first; if anything is wrong, Reload returns the
// problems (config.Problems) and nothing changes. Otherwise unchanged components keep running
// untouched, and changed, new and removed ones are swapped in without losing an accepted
// event (docs/configuration.md, Reload). Reload may be called only while Run runs; calls are
// serialised.
func (p *Pipeline) Reload(ctx context.Context, doc *config.Document) (*ReloadReport, error) {
	_ = ctx
	_ = doc
	return nil, errReloadNotImplemented
}

// errReloadNotImplemented is returned until Reload is implemented (issue 13, in progress).
var errReloadNotImplemented = errors.New("pipeline: reload is not implemented yet")
