package netout

import (
	"net"
	"strings"
	"time"

	"github.com/flowpipe/flowpipe/core/options"
	"github.com/flowpipe/flowpipe/internal/tlsfiles"
)

// Options are the connection options of a sink that pushes to a collector through netout,
// written inline among the sink's own options (`yaml:",inline"`).
type Options struct {
	// Address of the collector, host:port.
	Address string `yaml:"address" required:"true"`
	// Transport is one of the sink's transports: udp, tcp or tls.
	Transport string `yaml:"transport"`

	CAFile     string `yaml:"ca_file"`
	CertFile   string `yaml:"cert_file"`
	KeyFile    string `yaml:"key_file"`
	ServerName string `yaml:"server_name"`

	DialTimeout  time.Duration `yaml:"dial_timeout"`
	WriteTimeout time.Duration `yaml:"write_timeout"`
}

// DefaultOptions use transport and the usual timeouts: 10 s to connect, 30 s to write.
func DefaultOptions(transport string) Options {
	return Options{Transport: transport, DialTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second}
}

// Check adds the problems of o to errs; transports are the ones the sink speaks, in the order
// its documentation lists them.
func (o *Options) Check(errs *options.FieldErrors, transports ...string) {
	if _, port, err := net.SplitHostPort(o.Address); err != nil || port == "" {
		errs.Add("address", "want host:port, got %q", o.Address)
	}
	known := false
	for _, t := range transports {
		known = known || t == o.Transport
	}
	if !known {
		list := strings.Join(transports[:len(transports)-1], ", ") + " or " + transports[len(transports)-1]
		errs.Add("transport", "unknown transport %q (want %s)", o.Transport, list)
	}
	if o.Transport != "tls" && (o.CAFile != "" || o.CertFile != "" || o.ServerName != "") {
		errs.Add("transport", "ca_file, cert_file and server_name need transport: tls")
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		errs.Add("cert_file", "cert_file and key_file go together")
	}
	if o.DialTimeout <= 0 {
		errs.Add("dial_timeout", "must be positive")
	}
	if o.WriteTimeout <= 0 {
		errs.Add("write_timeout", "must be positive")
	}
}

// Conn makes the connection o describes (not dialled yet); resolve makes the TLS files'
// paths absolute (component.Env.Path).
func (o *Options) Conn(resolve func(string) string) (*Conn, error) {
	nc := Config{Network: o.Transport, Address: o.Address, DialTimeout: o.DialTimeout, WriteTimeout: o.WriteTimeout}
	if o.Transport == "tls" {
		tc, err := tlsfiles.Client(resolve(o.CAFile), resolve(o.CertFile), resolve(o.KeyFile), o.ServerName)
		if err != nil {
			return nil, err
		}
		nc.TLS = tc
	}
	return New(nc), nil
}
