package grpcsink

import (
	"net"
	"net/url"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// dial is what New gives grpc.NewClient: with url, the collector's address; with urls, every
// collector behind a resolver of their own, picked by pick_first over a shuffled list — each
// agent sticks to one live collector, agents spread over all of them, and a stream that breaks
// is opened again on the next collector that answers, with every unacknowledged event.
func (c *Config) dial() (target string, useTLS bool, opts []grpc.DialOption) {
	if len(c.URLs) == 0 {
		addr, tls := c.target()
		return addr, tls, nil
	}
	var addrs []resolver.Address
	for _, raw := range c.URLs {
		u, _ := url.Parse(raw)
		useTLS = u.Scheme == "https"
		port := u.Port()
		if port == "" {
			port = map[bool]string{true: "443", false: "80"}[useTLS]
		}
		sn := c.ServerName
		if sn == "" {
			sn = u.Hostname()
		}
		addrs = append(addrs, resolver.Address{Addr: net.JoinHostPort(u.Hostname(), port), ServerName: sn})
	}
	r := manual.NewBuilderWithScheme("flowpipe-collectors")
	r.InitialState(resolver.State{Addresses: addrs})
	return r.Scheme() + ":///collectors", useTLS, []grpc.DialOption{
		grpc.WithResolvers(r),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": true}}]}`),
	}
}

// collectors is how the sink names its collectors in logs and errors.
func (c *Config) collectors() string {
	if len(c.URLs) == 0 {
		return c.URL
	}
	return strings.Join(c.URLs, ",")
}
