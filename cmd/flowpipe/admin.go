package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/flowpipe/flowpipe/core/admin"
	"github.com/flowpipe/flowpipe/core/config"
	"github.com/flowpipe/flowpipe/core/pipeline"
)

// adminOptions resolves the admin section for the listener: the token (from token_file),
// TLS, the tap points and the pipeline's picture.
func adminOptions(doc *config.Document, p *pipeline.Pipeline, log *slog.Logger) (admin.Options, error) {
	a := doc.Admin
	o := admin.Options{
		Listen: a.Listen, Registry: p.Metrics().Registry, Ready: p.Ready, Log: log, Token: a.Token,
		Taps:  p.Taps(),
		Graph: admin.GraphOf(doc, pipelineOptions(log).DefaultIsolation),
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
	if a.TLS.Cert != "" {
		cert, err := tls.LoadX509KeyPair(doc.AdminPath(a.TLS.Cert), doc.AdminPath(a.TLS.Key))
		if err != nil {
			return o, fmt.Errorf("%s: admin.tls: %w", doc.Where("admin.tls"), err)
		}
		o.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		if a.TLS.ClientCA != "" {
			pem, err := os.ReadFile(doc.AdminPath(a.TLS.ClientCA))
			if err != nil {
				return o, fmt.Errorf("%s: admin.tls.client_ca: %w", doc.Where("admin.tls.client_ca"), err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return o, fmt.Errorf("%s: admin.tls.client_ca: no PEM certificate in %s", doc.Where("admin.tls.client_ca"), a.TLS.ClientCA)
			}
			o.TLS.ClientCAs = pool
			o.TLS.ClientAuth = tls.RequireAndVerifyClientCert
		}
	}
	return o, nil
}
