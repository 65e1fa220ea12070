package main

import (
	"github.com/flowpipe/flowpipe/core/component"
	"github.com/flowpipe/flowpipe/enrich/aggregate"
	"github.com/flowpipe/flowpipe/enrich/communityid"
	"github.com/flowpipe/flowpipe/enrich/resources"
	"github.com/flowpipe/flowpipe/sinks/discard"
	"github.com/flowpipe/flowpipe/sinks/file"
	grpcsink "github.com/flowpipe/flowpipe/sinks/grpc"
	"github.com/flowpipe/flowpipe/sinks/ipfix"
	jssink "github.com/flowpipe/flowpipe/sinks/jetstream"
	kafkasink "github.com/flowpipe/flowpipe/sinks/kafka"
	"github.com/flowpipe/flowpipe/sinks/syslog"
	"github.com/flowpipe/flowpipe/sources/conntrack"
	"github.com/flowpipe/flowpipe/sources/generate"
	grpcsource "github.com/flowpipe/flowpipe/sources/grpc"
	jssource "github.com/flowpipe/flowpipe/sources/jetstream"
	kafkasource "github.com/flowpipe/flowpipe/sources/kafka"
	"github.com/flowpipe/flowpipe/sources/replay"
	"github.com/flowpipe/flowpipe/sources/userspace"
)

// builtins lists every component compiled into the flowpipe binary. A new built-in adds its
// factory here; core never imports a component.
func builtins() []component.Factory {
	return []component.Factory{
		// sources
		conntrack.Factory(),
		generate.Factory(),
		grpcsource.Factory(),
		jssource.Factory(),
		kafkasource.Factory(),
		replay.Factory(),
		userspace.Factory(),
		// enrichers
		resources.Factory(),
		aggregate.Factory(),
		communityid.Factory(),
		// sinks
		file.Factory(),
		discard.Factory(),
		grpcsink.Factory(),
		jssink.Factory(),
		kafkasink.Factory(),
		ipfix.Factory(),
		syslog.Factory(),
	}
}

func newRegistry() *component.Registry {
	reg := component.NewRegistry()
	for _, f := range builtins() {
		reg.Register(f)
	}
	return reg
}
