// Package tlsfiles builds the TLS configuration of flowpipe's network components (the gRPC
// sink, the gRPC receiver) from the PEM files their options name: one loader for the client
// and the server side, TLS 1.2 at least, errors that name the option.
package tlsfiles

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

// Client is a client's TLS: the roots in caFile ("" trusts the system's), a client
// certificate for mutual TLS when certFile and keyFile are set, and serverName to verify
// when it is not the dialled host. Paths are as the component resolved them.
func Client(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	cfg := &tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS12}
	pool, err := loadPool("ca_file", caFile)
	if err != nil {
		return nil, err
	}
	cfg.RootCAs = pool
	if certFile != "" {
		if cfg.Certificates, err = loadPair(certFile, keyFile); err != nil {
			return nil, err
		}
	}
	return cfg, nil
}

// Server is a server's TLS with the certificate in certFile and keyFile; with clientCAFile,
// clients must present a certificate signed by one of its CAs (mutual TLS).
func Server(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	certs, err := loadPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{Certificates: certs, MinVersion: tls.VersionTLS12}
	pool, err := loadPool("client_ca_file", clientCAFile)
	if err != nil {
		return nil, err
	}
	if pool != nil {
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

func loadPair(certFile, keyFile string) ([]tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("cert_file/key_file: %w", err)
	}
	return []tls.Certificate{cert}, nil
}

// loadPool reads the CAs in file; nil for no file.
func loadPool(option, file string) (*x509.CertPool, error) {
	if file == "" {
		return nil, nil
	}
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", option, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s %s: no PEM certificate in it", option, file)
	}
	return pool, nil
}
