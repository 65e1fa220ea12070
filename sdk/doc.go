// Package sdk is what a third-party flowpipe plugin imports: a plugin's main is one call,
// ServeSink, ServeSource or ServeEnricher, with the plugin's Info, a function returning its
// typed config with defaults, and the function that builds the component. flowpipe sends the
// options from pipeline.yaml; they are decoded strictly into the config (yaml tags, unknown
// keys rejected, the config's Validate run if it has one; core/options) and every problem is
// shown at its line by `flowpipe validate`. sdk/plugintest runs the component through the
// real plugin protocol in a test.
//
// The component itself implements the interfaces of core/component, the same as a built-in.
// One that can take new options while it runs implements component.Reconfigurer: a reload
// of pipeline.yaml then calls its Reconfigure with the new options (decode and check them
// with options.Check, as the SDK did for the first ones) instead of starting a new plugin
// process; it returns an error wrapping component.ErrRestartNeeded for a change it cannot
// apply in place. A component without the method is replaced by a new process on a change.
// The plugin host that starts plugin processes is internal to flowpipe; a plugin links only
// this package, the wire protocol and core's component types.
package sdk
