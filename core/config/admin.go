package config

import (
	"net"
	"net/netip"
	"path/filepath"
	"strings"
)

// DefaultTapRing is the default admin.tap_ring.
const DefaultTapRing = 256

// maxTapRing bounds admin.tap_ring (each event kept is about 300 bytes, per tap point).
const maxTapRing = 1_000_000

// checkAdmin checks the admin section: a listener others can reach must authenticate.
func (d *Document) checkAdmin() Problems {
	a := &d.Admin
	var probs Problems
	if a.Token != "" && a.TokenFile != "" {
		probs = append(probs, d.Problem("admin.token_file", "set admin.token or admin.token_file, not both"))
	}
	if (a.CertFile == "") != (a.KeyFile == "") {
		probs = append(probs, d.Problem("admin.cert_file", "set both cert_file and key_file, or neither"))
	}
	if a.ClientCAFile != "" && a.CertFile == "" {
		probs = append(probs, d.Problem("admin.client_ca_file", "mTLS needs cert_file and key_file too"))
	}
	if a.TapRing < 0 || a.TapRing > maxTapRing {
		probs = append(probs, d.Problem("admin.tap_ring", "must be between 0 and %d, got %d", maxTapRing, a.TapRing))
	}
	if a.Listen == "" {
		return probs
	}
	if path, ok := strings.CutPrefix(a.Listen, "unix:"); ok {
		if path == "" {
			probs = append(probs, d.Problem("admin.listen", "unix: needs a socket path, e.g. unix:/run/flowpipe/admin.sock"))
		}
		return probs
	}
	host, _, err := net.SplitHostPort(a.Listen)
	if err != nil {
		return append(probs, d.Problem("admin.listen", "want host:port or unix:PATH, got %q", a.Listen))
	}
	authenticated := a.Token != "" || a.TokenFile != "" || a.ClientCAFile != ""
	if !isLoopback(host) && !authenticated && !a.Insecure {
		probs = append(probs, d.Problem("admin.listen", "%s is reachable from other hosts: set admin.token or admin.token_file (bearer token) or admin.client_ca_file (mTLS), or write admin.insecure: true", a.Listen))
	}
	return probs
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

// AdminPath resolves a path of the admin section (token_file, cert_file, ...) against the
// directory of pipeline.yaml.
func (d *Document) AdminPath(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(d.Dir, p)
}
