package grpcsource_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/flowwire"
	"github.com/flowpipe/flowpipe/internal/testenv"
	pb "github.com/flowpipe/flowpipe/proto/flow"
	grpcsrc "github.com/flowpipe/flowpipe/sources/grpc"
)

const secret2 = "second-secret-9876543210"

// opts are the options of start's receiver as a reload hands them over, with secrets.
func opts(secrets ...string) map[string]any {
	list := make([]any, len(secrets))
	for i, s := range secrets {
		list[i] = s
	}
	return map[string]any{"listen": "127.0.0.1:0", "auth": "hmac", "secrets": list}
}

func tokenWith(s string) string {
	return flowwire.MintToken([]byte(s), time.Now().Add(time.Hour)).Authorization()
}

// TestReconfigureSecrets: a running receiver takes a new secret list in place, on both
// protocols: with [s1, s2] streams of either token are admitted and the open ones go on; with
// [s2] the streams authenticated with s1 are closed (UNAUTHENTICATED, documented in
// reconfigure.go), new ones with s1 are refused, new ones with s2 admitted, and the IDs
// delivered before the change are still recognised: a resend is ACKed as a duplicate and
// not delivered again.
func TestReconfigureSecrets(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, nil, out)
	addr := r.Addr().String()
	ctx := context.Background()

	nb := dial(t, addr, tokenWith(secret))
	if err := nb.handshake(); err != nil {
		t.Fatal(err)
	}
	first := uuid.New()
	nb.stream.Send(protoEvent(first))
	if ack, err := nb.stream.Recv(); err != nil || uuid.UUID(ack.EventId) != first {
		t.Fatalf("before the change: %v %v", err, ack)
	}
	nat := dialNative(t, addr, tokenWith(secret))
	if err := nat.open(); err != nil {
		t.Fatal(err)
	}
	batch := nativeEvents(20)
	nat.send(1, batch)
	if ack, err := nat.stream.Recv(); err != nil || ack.Seq != 1 {
		t.Fatalf("native before the change: %v %v", err, ack)
	}

	// [s1, s2]: both tokens work, the open streams go on.
	if err := r.Reconfigure(ctx, opts(secret, secret2)); err != nil {
		t.Fatal(err)
	}
	second := uuid.New()
	nb.stream.Send(protoEvent(second))
	if ack, err := nb.stream.Recv(); err != nil || uuid.UUID(ack.EventId) != second {
		t.Fatalf("open stream after adding a secret: %v %v", err, ack)
	}
	for _, s := range []string{secret, secret2} {
		if err := dial(t, addr, tokenWith(s)).handshake(); err != nil {
			t.Fatalf("token of %q with secrets [s1, s2]: %v", s[:6], err)
		}
		if err := dialNative(t, addr, tokenWith(s)).open(); err != nil {
			t.Fatalf("native, token of %q with secrets [s1, s2]: %v", s[:6], err)
		}
	}

	// [s2]: the s1 streams are closed, s1 refused, s2 admitted.
	if err := r.Reconfigure(ctx, opts(secret2)); err != nil {
		t.Fatal(err)
	}
	revoked := func(what string, err error) {
		t.Helper()
		if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "removed its secret") {
			t.Errorf("%s: %v, want UNAUTHENTICATED saying its secret was removed", what, err)
		}
	}
	_, err := nb.stream.Recv()
	revoked("NetBird stream of s1 after s1 was removed", err)
	_, err = nat.stream.Recv()
	revoked("native stream of s1 after s1 was removed", err)
	if err := dial(t, addr, tokenWith(secret)).handshake(); !isCode(err, codes.Unauthenticated) {
		t.Errorf("new NetBird stream with s1: %v, want UNAUTHENTICATED", err)
	}
	if err := dialNative(t, addr, tokenWith(secret)).open(); !isCode(err, codes.Unauthenticated) {
		t.Errorf("new native stream with s1: %v, want UNAUTHENTICATED", err)
	}

	// The client reconnects with s2 and resends: duplicates, ACKed, not delivered again.
	nb2 := dial(t, addr, tokenWith(secret2))
	if err := nb2.handshake(); err != nil {
		t.Fatal(err)
	}
	nb2.stream.Send(protoEvent(second))
	if ack, err := nb2.stream.Recv(); err != nil || uuid.UUID(ack.EventId) != second {
		t.Fatalf("resend with s2: %v %v", err, ack)
	}
	nat2 := dialNative(t, addr, tokenWith(secret2))
	if err := nat2.open(); err != nil {
		t.Fatal(err)
	}
	nat2.send(1, batch)
	if ack, err := nat2.stream.Recv(); err != nil || ack.Seq != 1 {
		t.Fatalf("native resend with s2: %v %v", err, ack)
	}
	if n, want := len(out.got()), 2+len(batch); n != want {
		t.Errorf("%d events delivered, want %d (each once)", n, want)
	}
	if v := counter(t, r.reg, "flowpipe_grpc_source_duplicates_total"); v != float64(1+len(batch)) {
		t.Errorf("duplicates counted %v, want %d", v, 1+len(batch))
	}
}

// TestReconfigureRefused: bad options come back positioned at their keys and change
// nothing; a new listen address needs a new instance (ErrRestartNeeded), as do the keepalive
// settings; new limits apply in place.
func TestReconfigureRefused(t *testing.T) {
	out := &sinkEmitter{}
	r := start(t, nil, out)
	addr := r.Addr().String()
	ctx := context.Background()

	bad := opts("short")
	bad["max_streams"] = 0
	err := r.Reconfigure(ctx, bad)
	fe, ok := options.FieldErrorsOf(err)
	if !ok {
		t.Fatalf("bad options: %v, want field errors", err)
	}
	paths := map[string]bool{}
	for _, e := range fe {
		paths[e.Path] = true
	}
	if !paths["secrets[0]"] || !paths["max_streams"] {
		t.Errorf("bad options: %v, want problems at secrets[0] and max_streams", err)
	}
	admitted := func(what string) {
		t.Helper()
		c := dial(t, addr, tokenWith(secret))
		defer c.conn.Close()
		if err := c.handshake(); err != nil {
			t.Errorf("%s: %v", what, err)
		}
	}
	admitted("the old secret after refused options")

	for key, v := range map[string]any{"listen": "127.0.0.1:1", "keepalive_time": "1m", "max_batch_message_size": "64MiB"} {
		o := opts(secret)
		o[key] = v
		if err := r.Reconfigure(ctx, o); !errors.Is(err, component.ErrRestartNeeded) || !strings.Contains(err.Error(), key) {
			t.Errorf("%s changed: %v, want ErrRestartNeeded naming it", key, err)
		}
	}
	admitted("after the refused restarts")

	// max_streams 1 in place: one stream open, the next refused.
	o := opts(secret)
	o["max_streams"] = 1
	o["max_message_size"] = "1KiB"
	if err := r.Reconfigure(ctx, o); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the earlier streams to end", func() bool { return gauge(t, r.reg, "flowpipe_grpc_source_streams") == 0 })
	one := dial(t, addr, tokenWith(secret))
	if err := one.handshake(); err != nil {
		t.Fatal(err)
	}
	if err := dial(t, addr, tokenWith(secret)).handshake(); !isCode(err, codes.ResourceExhausted) {
		t.Errorf("second stream with max_streams 1: %v, want RESOURCE_EXHAUSTED", err)
	}
	big := protoEvent(uuid.New())
	big.FlowFields.RuleId = make([]byte, 2048)
	one.stream.Send(big)
	if _, err := one.stream.Recv(); !isCode(err, codes.ResourceExhausted) {
		t.Errorf("event above the new max_message_size: %v, want RESOURCE_EXHAUSTED", err)
	}
}

// TestReconfigureTLSFiles: new certificate files serve the next handshakes of the running
// listener; a client that trusts only the old CA is refused from then on.
func TestReconfigureTLSFiles(t *testing.T) {
	p1, p2 := testenv.NewPKI(t), testenv.NewPKI(t)
	r := start(t, func(c *grpcsrc.Config) {
		c.Auth, c.Secrets, c.CertFile, c.KeyFile = "none", nil, p1.ServerCert, p1.ServerKey
	}, &sinkEmitter{})
	addr := r.Addr().String()
	handshake := func(caFile string) error {
		t.Helper()
		creds, err := credentials.NewClientTLSFromFile(caFile, "collector.test")
		if err != nil {
			t.Fatal(err)
		}
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		stream, err := pb.NewFlowServiceClient(conn).Events(context.Background())
		if err != nil {
			return err
		}
		return (&netbirdClient{stream: stream, conn: conn}).handshake()
	}
	if err := handshake(p1.CAFile); err != nil {
		t.Fatalf("with the first certificate: %v", err)
	}
	o := map[string]any{"listen": "127.0.0.1:0", "auth": "none", "cert_file": p2.ServerCert, "key_file": p2.ServerKey}
	if err := r.Reconfigure(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if err := handshake(p2.CAFile); err != nil {
		t.Errorf("trusting the new CA after the change: %v", err)
	}
	if err := handshake(p1.CAFile); err == nil {
		t.Error("a client trusting only the old CA was served after the certificate changed")
	}
	// TLS off needs a new listener.
	delete(o, "cert_file")
	delete(o, "key_file")
	if err := r.Reconfigure(context.Background(), o); !errors.Is(err, component.ErrRestartNeeded) {
		t.Errorf("TLS turned off: %v, want ErrRestartNeeded", err)
	}
}
