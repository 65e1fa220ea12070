package grpcsink_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/testenv"
	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

// delivers reports whether a batch written through s is ACKed within a generous bound; a
// refused sink keeps retrying, so a refusal shows as the bound passing.
func delivers(t *testing.T, s *grpcsink.Sink, n int, within time.Duration) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	return s.Write(ctx, flow.NewBatch(makeEvents(n), nil))
}

func TestTLS(t *testing.T) { eachProtocol(t, testTLS) }

func testTLS(t *testing.T, protocol string) {
	p := testenv.NewPKI(t)
	em := newMemEmitter()
	r := startReceiver(t, &grpcsrc.Config{Auth: "none", CertFile: p.ServerCert, KeyFile: p.ServerKey}, em)
	port := portOf(r.Addr())

	// Verified against ca_file, by the name in the certificate.
	s := newSink(t, &grpcsink.Config{Protocol: protocol, URL: "https://127.0.0.1:" + port, CAFile: p.CAFile, ServerName: "collector.test"})
	if err := delivers(t, s, 100, time.Minute); err != nil {
		t.Fatalf("TLS with ca_file: %v", err)
	}
	// A server certificate from another CA is not trusted: nothing is delivered.
	bad := newSink(t, &grpcsink.Config{Protocol: protocol, URL: "https://127.0.0.1:" + port, CAFile: p.OtherCA})
	if err := delivers(t, bad, 100, 2*time.Second); err == nil {
		t.Fatal("sink trusting another CA delivered")
	}
	if d, _ := em.counts(); d != 100 {
		t.Fatalf("collector has %d events, want the 100 of the trusted sink", d)
	}
}

func TestMutualTLS(t *testing.T) { eachProtocol(t, testMutualTLS) }

func testMutualTLS(t *testing.T, protocol string) {
	p := testenv.NewPKI(t)
	em := newMemEmitter()
	r := startReceiver(t, &grpcsrc.Config{Auth: "none", CertFile: p.ServerCert, KeyFile: p.ServerKey, ClientCAFile: p.CAFile}, em)
	url := "https://127.0.0.1:" + portOf(r.Addr())

	with := newSink(t, &grpcsink.Config{Protocol: protocol, URL: url, CAFile: p.CAFile, CertFile: p.ClientCert, KeyFile: p.ClientKey})
	if err := delivers(t, with, 100, time.Minute); err != nil {
		t.Fatalf("client with certificate: %v", err)
	}
	without := newSink(t, &grpcsink.Config{Protocol: protocol, URL: url, CAFile: p.CAFile})
	if err := delivers(t, without, 100, 2*time.Second); err == nil {
		t.Fatal("client without certificate delivered under mTLS")
	}
	if d, _ := em.counts(); d != 100 {
		t.Fatalf("collector has %d events, want only the 100 of the client with a certificate", d)
	}
}

func TestSinkTokens(t *testing.T) { eachProtocol(t, testSinkTokens) }

func testSinkTokens(t *testing.T, protocol string) {
	em := newMemEmitter()
	const secret = "collector-secret-0123456789"
	r := startReceiver(t, &grpcsrc.Config{Auth: "hmac", Secrets: []string{secret}}, em)
	url := "http://" + r.Addr().String()

	minted := newSink(t, &grpcsink.Config{Protocol: protocol, URL: url, HMACSecret: secret})
	if err := delivers(t, minted, 100, time.Minute); err != nil {
		t.Fatalf("sink minting its tokens: %v", err)
	}
	wrong := newSink(t, &grpcsink.Config{Protocol: protocol, URL: url, HMACSecret: "some-other-secret-0123456789"})
	if err := delivers(t, wrong, 100, 2*time.Second); err == nil {
		t.Fatal("sink with the wrong secret delivered")
	}
	none := newSink(t, &grpcsink.Config{Protocol: protocol, URL: url})
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
