// Package plugin runs flowpipe components as separate processes over hashicorp/go-plugin
// (gRPC). It is both sides of that boundary:
//
//   - the SDK a plugin's main calls: ServeSink, ServeSource and ServeEnricher (one call each,
//     options decoded into the plugin's own typed config), and Serve for any
//     component.Factory, which is how the flowpipe binary serves its built-ins when it is
//     re-executed as `flowpipe plugin serve <kind> <type>`;
//   - the Host that flowpipe's runtime uses to start plugin processes (pinned by SHA-256,
//     mutual TLS, logs forwarded), to reach them through the ordinary component.Source,
//     Enricher and Sink interfaces, and to restart them when they crash or hang, delivering
//     again every batch they had not acknowledged.
//
// The wire protocol is flowpipe.plugin.v1 (proto/v1); events cross it in batches in a packed
// binary encoding (internal/codec).
package plugin
