package main

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/flowpipe/flowpipe/core/admin"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/pipeline"
	"github.com/flowpipe/flowpipe/internal/pluginhost"
	"github.com/flowpipe/flowpipe/internal/tlsfiles"
)

// adminOptions resolves the admin section for the listener: the token (from token_file),
// TLS (the loader the gRPC components use), the tap points and the pipeline's picture.
func adminOptions(doc *config.Document, p *pipeline.Pipeline, log *slog.Logger) (admin.Options, error) {
	a := doc.Admin
	o := admin.Options{
		Listen: a.Listen, Registry: p.Metrics().Registry, Ready: p.Ready, Log: log, Token: a.Token,
		Taps:  p.Taps(),
		Graph: admin.GraphOf(doc, pluginhost.DefaultIsolation),
		// What a reload changed shows at the next request.
		CurrentGraph: func() admin.Graph { return admin.GraphOf(p.Document(), pluginhost.DefaultIsolation) },
	}
	if a.TokenFile != "" {
		b, err := os.ReadFile(doc.AdminPath(a.TokenFile))
		if err != nil {
			return o, fmt.Errorf("%s: admin.token_file: %w", doc.Where("admin.token_file"), err)
		}
		o.Token = strings.TrimSpace(string(b))
		if o.Token == "" {
			return o, fmt.Errorf("%s: admin.token_file: %s is empty", doc.Where("admin.token_file"), doc.AdminPath(a.TokenFile))
		}
	}
	if a.CertFile != "" {
		cfg, err := tlsfiles.Server(doc.AdminPath(a.CertFile), doc.AdminPath(a.KeyFile), doc.AdminPath(a.ClientCAFile))
		if err != nil {
			return o, fmt.Errorf("%s: admin.%w", doc.Where("admin.cert_file"), err)
		}
		o.TLS = cfg
	}
	return o, nil
}
