package pluginhost

import (
	"context"
	"fmt"
	"maps"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"gopkg.in/yaml.v3"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/options"
	pb "github.com/flowpipe/flowpipe/internal/pluginproto"
)

// A component in a plugin process takes new options while it runs through the Reconfigure
// call (component.Reconfigurer). Whatever the plugin cannot do in place comes back as an
// error wrapping component.ErrRestartNeeded, so that the runtime replaces the component:
// a plugin built before the call existed (Unimplemented), a component that does not
// implement Reconfigurer, a change the component itself refuses in place, new options that
// need other capabilities than its process was started with, and a process that failed
// during the call.

func (s *remoteSource) Reconfigure(ctx context.Context, opts map[string]any) error {
	return s.in.reconfigureProc(ctx, opts)
}

func (s *remoteSink) Reconfigure(ctx context.Context, opts map[string]any) error {
	return s.in.reconfigureProc(ctx, opts)
}

func (e *remoteEnricher) Reconfigure(ctx context.Context, opts map[string]any) error {
	return e.in.reconfigureProc(ctx, opts)
}

func (s *remoteSource) CheckOptions(ctx context.Context, opts map[string]any) error {
	return s.in.checkProc(ctx, opts)
}

func (s *remoteSink) CheckOptions(ctx context.Context, opts map[string]any) error {
	return s.in.checkProc(ctx, opts)
}

func (e *remoteEnricher) CheckOptions(ctx context.Context, opts map[string]any) error {
	return e.in.checkProc(ctx, opts)
}

// checkProc asks the running process to check options (component.OptionsChecker). What it
// cannot ask (a plugin built before Check, a process that is down or restarting, or one that
// fails the call) is not a problem of the options: nil, and they are checked when applied.
func (in *instance) checkProc(ctx context.Context, raw map[string]any) error {
	if raw == nil {
		raw = map[string]any{}
	}
	optYAML, err := yaml.Marshal(raw)
	if err != nil {
		return fmt.Errorf("encode options for the plugin: %w", err)
	}
	// A process that is restarting is not waited for (up to the restart backoff): the
	// options are checked when they are applied.
	in.mu.Lock()
	p := in.cur
	in.mu.Unlock()
	if p == nil {
		return nil
	}
	cctx, done := in.guard(ctx, p, "Check")
	resp, err := p.comp.Check(cctx, &pb.CheckRequest{OptionsYaml: optYAML})
	done()
	switch {
	case err != nil:
		if status.Code(err) != codes.Unimplemented {
			in.env.Logger.Debug("could not ask the plugin to check new options; they are checked when applied", "plugin", in.launcher.describe, "error", err)
		}
		return nil
	case len(resp.FieldErrors) > 0:
		errs := make(options.FieldErrors, 0, len(resp.FieldErrors))
		for _, fe := range resp.FieldErrors {
			errs = append(errs, options.FieldError{Path: fe.Path, Msg: fe.Message})
		}
		return errs
	case resp.Error != "":
		return options.FieldErrors{{Msg: resp.Error}}
	}
	return nil
}

// restartNeeded keeps the plugin's own explanation and wraps component.ErrRestartNeeded.
type restartNeeded struct{ msg string }

func (r *restartNeeded) Error() string { return r.msg }
func (r *restartNeeded) Unwrap() error { return component.ErrRestartNeeded }

func (in *instance) reconfigureProc(ctx context.Context, raw map[string]any) error {
	if raw == nil {
		raw = map[string]any{}
	}
	in.reconfigure.Lock()
	defer in.reconfigure.Unlock()
	describe := in.launcher.describe
	if in.capsOf != nil {
		caps, err := in.capsOf(raw)
		if err != nil {
			return err // the options' problems, positioned
		}
		var had []string
		if in.launcher.priv != nil {
			had = in.launcher.priv.Caps
		}
		if !sameSet(caps, had) {
			return &restartNeeded{fmt.Sprintf("%s: the new options need capabilities %v, its process has %v: %v", describe, caps, had, component.ErrRestartNeeded)}
		}
	}
	optYAML, err := yaml.Marshal(raw)
	if err != nil {
		return fmt.Errorf("encode options for the plugin: %w", err)
	}
	p, err := in.get(ctx)
	if err != nil {
		return &restartNeeded{fmt.Sprintf("%s: %v: %v", describe, err, component.ErrRestartNeeded)}
	}
	cctx, done := in.guard(ctx, p, "Reconfigure")
	resp, err := p.comp.Reconfigure(cctx, &pb.ReconfigureRequest{OptionsYaml: optYAML})
	done()
	switch {
	case status.Code(err) == codes.Unimplemented:
		return &restartNeeded{fmt.Sprintf("%s was built before plugins could take new options while they run: %v", describe, component.ErrRestartNeeded)}
	case err != nil:
		if ctx.Err() != nil {
			return fmt.Errorf("%s: reconfigure: %w", describe, ctx.Err())
		}
		return &restartNeeded{fmt.Sprintf("%s: reconfigure: %v: %v", describe, err, component.ErrRestartNeeded)}
	case len(resp.FieldErrors) > 0:
		errs := make(options.FieldErrors, 0, len(resp.FieldErrors))
		for _, fe := range resp.FieldErrors {
			errs = append(errs, options.FieldError{Path: fe.Path, Msg: fe.Message})
		}
		return errs
	case resp.RestartNeeded:
		return &restartNeeded{fmt.Sprintf("%s: %s", describe, resp.Error)}
	case resp.Error != "":
		return fmt.Errorf("%s: reconfigure: %s", describe, resp.Error)
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.cur != p {
		// The process was replaced during the call, and the new one was configured with
		// the old options: only a new instance is sure to run with the new ones.
		return &restartNeeded{fmt.Sprintf("%s was restarted while it took new options: %v", describe, component.ErrRestartNeeded)}
	}
	// A process started after a crash gets the options the running one has.
	in.options = optYAML
	in.spec.Options = maps.Clone(raw)
	return nil
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}
