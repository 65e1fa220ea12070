package grpcsink_test

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/core/flow"
	"github.com/flowpipe/flowpipe/internal/flowwire"
	"github.com/flowpipe/flowpipe/internal/testenv"
	pb "github.com/flowpipe/flowpipe/proto/flow"
	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
)

// minimalReceiver is a flow receiver written from the protocol description alone, with the
// generated code and gRPC's standard codec: headers and the initiator ACK first, then an ACK
// per event. It checks the token as the description says and keeps what it receives.
type minimalReceiver struct {
	pb.UnimplementedFlowServiceServer
	secret []byte

	mu     sync.Mutex
	events map[uuid.UUID]*pb.FlowEvent
	auth   []string
	cut    bool // end the current streams at their next message
}

func (m *minimalReceiver) Events(stream pb.FlowService_EventsServer) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	m.mu.Lock()
	m.auth = append(m.auth, md.Get("authorization")...)
	m.mu.Unlock()
	var value string
	if v := md.Get("authorization"); len(v) > 0 {
		value = v[0]
	}
	if err := flowwire.VerifyAuthorization(value, [][]byte{m.secret}, time.Now()); err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	if err := stream.SendHeader(metadata.Pairs("receiver", "minimal")); err != nil {
		return err
	}
	if err := stream.Send(&pb.FlowEventAck{IsInitiator: true}); err != nil {
		return err
	}
	first := true
	for {
		ev, err := stream.Recv()
		if err != nil {
			return err
		}
		if first {
			first = false
			if !ev.IsInitiator {
				return status.Error(codes.InvalidArgument, "first message is not the initiator")
			}
			continue
		}
		m.mu.Lock()
		cut := m.cut
		m.cut = false
		m.mu.Unlock()
		if cut {
			return status.Error(codes.Unavailable, "cut by the test")
		}
		id, err := uuid.FromBytes(ev.EventId)
		if err != nil {
			return status.Error(codes.InvalidArgument, "bad event_id")
		}
		m.mu.Lock()
		m.events[id] = ev
		m.mu.Unlock()
		if err := stream.Send(&pb.FlowEventAck{EventId: ev.EventId}); err != nil {
			return err
		}
	}
}

// startMinimalReceiver serves a minimalReceiver (NetBird's service only) on loopback.
func startMinimalReceiver(t *testing.T) (*minimalReceiver, string) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	recv := &minimalReceiver{secret: []byte("minimal-receiver-secret"), events: map[uuid.UUID]*pb.FlowEvent{}}
	srv := grpc.NewServer()
	pb.RegisterFlowServiceServer(srv, recv)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return recv, lis.Addr().String()
}

// TestSinkToMinimalReceiver: the sink's events arrive at a receiver built only from the
// protocol description, field by field, and its writes complete on that receiver's ACKs.
// The sink has the default protocol (auto): the receiver does not serve flowpipe's batch
// stream (it answers UNIMPLEMENTED, as NetBird's does), so the sink falls back to NetBird's
// protocol, and says so once in its log.
func TestSinkToMinimalReceiver(t *testing.T) {
	recv, addr := startMinimalReceiver(t)
	tok := flowwire.MintToken(recv.secret, time.Now().Add(time.Hour))
	cfg := grpcsink.Factory().NewConfig().(*grpcsink.Config)
	cfg.URL, cfg.Token = "http://"+addr, &grpcsink.TokenConfig{Payload: tok.Payload, Signature: tok.Signature}
	cfg.ReconnectMin, cfg.ReconnectMax = 20*time.Millisecond, 200*time.Millisecond
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.Protocol != "auto" {
		t.Fatalf("default protocol %q, want auto", cfg.Protocol)
	}
	log := &testenv.SyncBuffer{}
	s, err := grpcsink.New(component.Env{Name: "agent", Logger: slog.New(slog.NewTextHandler(log, nil))}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	events := makeEvents(5000)
	events[0].Protocol, events[0].ICMPType, events[0].ICMPCode = flow.ProtoICMP, 8, 0
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	writeAll(ctx, t, s, events[:2500], 1000, 2)
	// A reconnect tries flowpipe's protocol again and falls back again, without a second
	// Info line: the receiver ends the stream at the next event.
	recv.mu.Lock()
	recv.cut = true
	recv.mu.Unlock()
	writeAll(ctx, t, s, events[2500:], 1000, 2)
	recv.mu.Lock()
	streams := len(recv.auth)
	recv.mu.Unlock()
	if streams < 2 {
		t.Fatalf("%d streams, want a second one after the cut", streams)
	}
	if n := strings.Count(log.String(), "does not serve flowpipe's batch stream"); n != 1 {
		t.Errorf("fallback logged %d times, want once:\n%s", n, log)
	}
	if !strings.Contains(log.String(), "level=INFO msg=\"collector does not serve") {
		t.Errorf("fallback not logged at Info:\n%s", log)
	}

	recv.mu.Lock()
	defer recv.mu.Unlock()
	if len(recv.events) != len(events) {
		t.Fatalf("receiver has %d events, want %d", len(recv.events), len(events))
	}
	if want := "Bearer " + tok.Signature + "." + tok.Payload; recv.auth[0] != want {
		t.Errorf("authorization %q, want %q", recv.auth[0], want)
	}
	for _, e := range events {
		got := recv.events[e.EventID]
		ff := got.GetFlowFields()
		if got == nil || uuid.UUID(ff.GetFlowId()) != e.FlowID || ff.GetType() != pb.Type_TYPE_START ||
			ff.GetDirection() != pb.Direction_EGRESS || ff.GetProtocol() != uint32(e.Protocol) ||
			string(ff.GetSourceIp()) != string(e.SrcAddr.AsSlice()) || string(ff.GetDestIp()) != string(e.DstAddr.AsSlice()) ||
			string(ff.GetRuleId()) != e.RuleID || ff.GetRxPackets() != e.RxPackets || ff.GetTxBytes() != e.TxBytes ||
			got.GetTimestamp().AsTime().UnixNano() != int64(e.Timestamp) {
			t.Fatalf("event %s arrived as %v", e.EventID, got)
		}
		if flow.IsICMP(e.Protocol) {
			if ff.GetIcmpInfo().GetIcmpType() != uint32(e.ICMPType) {
				t.Fatalf("ICMP event arrived as %v", got)
			}
		} else if ff.GetPortInfo().GetSourcePort() != uint32(e.SrcPort) || ff.GetPortInfo().GetDestPort() != uint32(e.DstPort) {
			t.Fatalf("event %s ports arrived as %v", e.EventID, ff.GetPortInfo())
		}
	}
}

// With protocol: flowpipe the sink does not fall back: the receiver's UNIMPLEMENTED shows in
// the sink's health, and nothing is delivered.
func TestExplicitFlowpipeProtocolDoesNotFallBack(t *testing.T) {
	recv, addr := startMinimalReceiver(t)
	tok := flowwire.MintToken(recv.secret, time.Now().Add(time.Hour))
	s := newSink(t, &grpcsink.Config{Protocol: "flowpipe", URL: "http://" + addr,
		Token: &grpcsink.TokenConfig{Payload: tok.Payload, Signature: tok.Signature}})
	if err := delivers(t, s, 10, 2*time.Second); err == nil {
		t.Fatal("protocol: flowpipe delivered to a NetBird-only receiver")
	}
	if err := s.Health(); err == nil || !strings.Contains(err.Error(), "Unimplemented") {
		t.Errorf("Health() = %v, want the receiver's Unimplemented", err)
	}
	recv.mu.Lock()
	defer recv.mu.Unlock()
	if len(recv.events) != 0 {
		t.Errorf("receiver got %d events", len(recv.events))
	}
}
