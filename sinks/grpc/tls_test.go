package grpcsink_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

// pki is a CA with a server and a client certificate, written as PEM files in a test dir.
type pki struct {
	dir                                                  string
	caFile, serverCert, serverKey, clientCert, clientKey string
	otherCA                                              string // a CA that signed nothing here
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	dir := t.TempDir()
	p := &pki{dir: dir}
	caKey, caCert, caDER := makeCA(t, "flowpipe test CA")
	p.caFile = writePEM(t, dir, "ca.pem", "CERTIFICATE", caDER)
	_, _, otherDER := makeCA(t, "unrelated CA")
	p.otherCA = writePEM(t, dir, "other-ca.pem", "CERTIFICATE", otherDER)
	p.serverCert, p.serverKey = makeLeaf(t, dir, "server", caKey, caCert, x509.ExtKeyUsageServerAuth, []string{"collector.test"}, []net.IP{net.IPv4(127, 0, 0, 1)})
	p.clientCert, p.clientKey = makeLeaf(t, dir, "client", caKey, caCert, x509.ExtKeyUsageClientAuth, nil, nil)
	return p
}

var serial int64 = 1

func makeCA(t *testing.T, name string) (*ecdsa.PrivateKey, *x509.Certificate, []byte) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return key, cert, der
}

func makeLeaf(t *testing.T, dir, name string, caKey *ecdsa.PrivateKey, ca *x509.Certificate, usage x509.ExtKeyUsage, dns []string, ips []net.IP) (certFile, keyFile string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
		DNSNames: dns, IPAddresses: ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return writePEM(t, dir, name+".pem", "CERTIFICATE", der), writePEM(t, dir, name+"-key.pem", "EC PRIVATE KEY", kder)
}

func writePEM(t *testing.T, dir, name, typ string, der []byte) string {
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// delivers reports whether a batch written through s is ACKed within a generous bound; a
// refused sink keeps retrying, so a refusal shows as the bound passing.
func delivers(t *testing.T, s *grpcsink.Sink, n int, within time.Duration) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	return s.Write(ctx, flow.NewBatch(makeEvents(n), nil))
}

func TestTLS(t *testing.T) {
	p := newPKI(t)
	em := newMemEmitter()
	r := startReceiver(t, &grpcsrc.Config{Auth: "none", CertFile: p.serverCert, KeyFile: p.serverKey}, em)
	port := portOf(r.Addr())

	// Verified against ca_file, by the name in the certificate.
	s := newSink(t, &grpcsink.Config{URL: "https://127.0.0.1:" + port, CAFile: p.caFile, ServerName: "collector.test"})
	if err := delivers(t, s, 100, time.Minute); err != nil {
		t.Fatalf("TLS with ca_file: %v", err)
	}
	// A server certificate from another CA is not trusted: nothing is delivered.
	bad := newSink(t, &grpcsink.Config{URL: "https://127.0.0.1:" + port, CAFile: p.otherCA})
	if err := delivers(t, bad, 100, 2*time.Second); err == nil {
		t.Fatal("sink trusting another CA delivered")
	}
	if d, _ := em.counts(); d != 100 {
		t.Fatalf("collector has %d events, want the 100 of the trusted sink", d)
	}
}

func TestMutualTLS(t *testing.T) {
	p := newPKI(t)
	em := newMemEmitter()
	r := startReceiver(t, &grpcsrc.Config{Auth: "none", CertFile: p.serverCert, KeyFile: p.serverKey, ClientCAFile: p.caFile}, em)
	url := "https://127.0.0.1:" + portOf(r.Addr())

	with := newSink(t, &grpcsink.Config{URL: url, CAFile: p.caFile, CertFile: p.clientCert, KeyFile: p.clientKey})
	if err := delivers(t, with, 100, time.Minute); err != nil {
		t.Fatalf("client with certificate: %v", err)
	}
	without := newSink(t, &grpcsink.Config{URL: url, CAFile: p.caFile})
	if err := delivers(t, without, 100, 2*time.Second); err == nil {
		t.Fatal("client without certificate delivered under mTLS")
	}
	if d, _ := em.counts(); d != 100 {
		t.Fatalf("collector has %d events, want only the 100 of the client with a certificate", d)
	}
}

func TestSinkTokens(t *testing.T) {
	em := newMemEmitter()
	const secret = "collector-secret-0123456789"
	r := startReceiver(t, &grpcsrc.Config{Auth: "hmac", Secrets: []string{secret}}, em)
	url := "http://" + r.Addr().String()

	minted := newSink(t, &grpcsink.Config{URL: url, HMACSecret: secret})
	if err := delivers(t, minted, 100, time.Minute); err != nil {
		t.Fatalf("sink minting its tokens: %v", err)
	}
	wrong := newSink(t, &grpcsink.Config{URL: url, HMACSecret: "some-other-secret-0123456789"})
	if err := delivers(t, wrong, 100, 2*time.Second); err == nil {
		t.Fatal("sink with the wrong secret delivered")
	}
	none := newSink(t, &grpcsink.Config{URL: url})
	if err := delivers(t, none, 100, 2*time.Second); err == nil {
		t.Fatal("sink without a token delivered")
	}
	// The refusal shows in the sink's health, with its cause.
	if err := none.Health(); err == nil || !strings.Contains(err.Error(), "Unauthenticated") {
		t.Errorf("health of the refused sink: %v, want an Unauthenticated error", err)
	}
	if err := minted.Health(); err != nil {
		t.Errorf("health of the connected sink: %v", err)
	}
	if d, _ := em.counts(); d != 100 {
		t.Fatalf("collector has %d events, want only the 100 of the sink with a valid token", d)
	}
}

func portOf(a net.Addr) string {
	_, port, _ := net.SplitHostPort(a.String())
	return port
}
