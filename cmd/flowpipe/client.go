package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/flowpipe/flowpipe/core/tap"
	"github.com/flowpipe/flowpipe/internal/tlsfiles"
)

// adminClient talks to a running flowpipe's admin listener (tap, top).
type adminClient struct {
	addr      string
	token     string
	tokenFile string
	caFile    string
	certFile  string
	keyFile   string
}

func (c *adminClient) flags(fs *pflag.FlagSet) {
	def := os.Getenv("FLOWPIPE_ADMIN")
	if def == "" {
		def = "127.0.0.1:9560"
	}
	fs.StringVar(&c.addr, "admin", def, "admin listener: host:port, https://host:port or unix:PATH ($FLOWPIPE_ADMIN)")
	fs.StringVar(&c.token, "token", "", "bearer token of the admin listener (default $FLOWPIPE_ADMIN_TOKEN)")
	fs.StringVar(&c.tokenFile, "token-file", "", "read the bearer token from this file")
	fs.StringVar(&c.caFile, "cacert", "", "CA certificate that signed the admin listener's (https)")
	fs.StringVar(&c.certFile, "cert", "", "client certificate for mTLS")
	fs.StringVar(&c.keyFile, "key", "", "client key for mTLS")
}

// get starts a GET of path with query q and returns the response body, or an error that
// says what to do.
func (c *adminClient) get(ctx context.Context, path string, q string) (io.ReadCloser, error) {
	resp, err := c.do(ctx, http.MethodGet, path, q)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		return nil, c.statusError(resp)
	}
	return resp.Body, nil
}

// errUnreachable marks the errors of do that mean no flowpipe answered at c.addr.
var errUnreachable = errors.New("cannot reach the admin listener")

// do sends a request with no body to the admin listener, with the bearer token, and returns
// the response whatever its status. An error that wraps errUnreachable means nothing answered.
func (c *adminClient) do(ctx context.Context, method, path string, q string) (*http.Response, error) {
	tr := &http.Transport{}
	base := "http://" + c.addr
	switch {
	case strings.HasPrefix(c.addr, "unix:") || strings.HasPrefix(c.addr, "/"):
		sock := strings.TrimPrefix(c.addr, "unix:")
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}
		base = "http://flowpipe"
	case strings.HasPrefix(c.addr, "https://"):
		base = strings.TrimSuffix(c.addr, "/")
		cfg, err := tlsfiles.Client(c.caFile, c.certFile, c.keyFile, "")
		if err != nil {
			return nil, fmt.Errorf("--cacert/--cert/--key: %w", err)
		}
		tr.TLSClientConfig = cfg
	case strings.HasPrefix(c.addr, "http://"):
		base = strings.TrimSuffix(c.addr, "/")
	}
	token := c.token
	if token == "" && c.tokenFile != "" {
		b, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("--token-file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if token == "" {
		token = os.Getenv("FLOWPIPE_ADMIN_TOKEN")
	}
	url := base + path
	if q != "" || method == http.MethodGet {
		url += "?" + q
	}
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, fmt.Errorf("--admin %s: %w", c.addr, err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w at %s: %w (is `flowpipe run` running, and is this its admin.listen? set --admin)", errUnreachable, c.addr, err)
	}
	return resp, nil
}

// statusError is what a response other than 200 says, for the user.
func (c *adminClient) statusError(resp *http.Response) error {
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode == http.StatusUnauthorized {
		return fmt.Errorf("the admin listener at %s wants its token (admin.token): pass --token, --token-file or $FLOWPIPE_ADMIN_TOKEN", c.addr)
	}
	return fmt.Errorf("admin listener at %s: %s", c.addr, strings.TrimSpace(string(msg)))
}

// lines calls fn for each line of r, and idle (if not nil) whenever no more input is
// waiting, so that output is flushed while the stream is quiet.
func lines(r io.Reader, fn func([]byte) error, idle func()) error {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		if idle != nil && br.Buffered() == 0 {
			idle()
		}
		line, err := br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			// A line longer than the buffer: gather it.
			buf := append([]byte(nil), line...)
			for err == bufio.ErrBufferFull {
				line, err = br.ReadSlice('\n')
				buf = append(buf, line...)
			}
			line = buf
		}
		if len(line) > 0 {
			if e := fn(line); e != nil {
				return e
			}
		}
		if err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}

// filterFlags builds a tap.Filter from --ip, --port, ... (one group, AND; a flag given
// twice ORs its values), --not before any of them, and --filter groups (OR).
type filterFlags struct {
	group  tap.Group
	groups []string
	not    bool
	err    error
}

type termFlag struct {
	f   *filterFlags
	key string
}

func (t termFlag) String() string { return "" }
func (t termFlag) Type() string {
	switch t.key {
	case "ip", "src", "dst":
		return "addr|cidr"
	case "port", "src-port", "dst-port":
		return "port"
	}
	return "string"
}

func (t termFlag) Set(v string) error {
	not := t.f.not
	t.f.not = false
	for i := range t.f.group {
		if g := &t.f.group[i]; g.Key == t.key && g.Not == not {
			merged, err := tap.NewTerm(not, t.key, append(g.Values, strings.Split(v, ",")...))
			if err != nil {
				return err
			}
			*g = merged
			return nil
		}
	}
	term, err := tap.NewTerm(not, t.key, strings.Split(v, ","))
	if err != nil {
		return err
	}
	t.f.group = append(t.f.group, term)
	return nil
}

type notFlag struct{ f *filterFlags }

func (n notFlag) String() string   { return "false" }
func (n notFlag) Type() string     { return "bool" }
func (n notFlag) IsBoolFlag() bool { return true }
func (n notFlag) Set(v string) error {
	if v != "true" {
		return fmt.Errorf("--not takes no value; write it before the filter it negates: --not --port 22")
	}
	if n.f.not {
		return fmt.Errorf("--not --not: write --not once, before the filter it negates")
	}
	n.f.not = true
	return nil
}

var filterHelp = map[string]string{
	"ip":           "source or destination address or CIDR",
	"src":          "source address or CIDR",
	"dst":          "destination address or CIDR",
	"port":         "source or destination port",
	"src-port":     "source port",
	"dst-port":     "destination port",
	"proto":        "protocol: tcp, udp, icmp, icmpv6, sctp or a number",
	"type":         "event type: start, end, drop or aggregate",
	"direction":    "ingress or egress",
	"rule":         "rule ID",
	"resource":     "source or destination resource ID",
	"src-resource": "source resource ID",
	"dst-resource": "destination resource ID",
}

func (f *filterFlags) add(fs *pflag.FlagSet) {
	for _, k := range tap.Keys {
		fs.Var(termFlag{f, k}, k, filterHelp[k]+" (repeat or separate with commas for any of several)")
	}
	fs.Var(notFlag{f}, "not", "negate the filter flag that follows: --not --port 22")
	fs.Lookup("not").NoOptDefVal = "true"
	fs.StringArrayVar(&f.groups, "filter", nil, `a group of filters ANDed, e.g. "src=10.0.0.0/8 !dst-port=53"; groups (and the filter flags, one group) are ORed`)
}

func (f *filterFlags) filter() (*tap.Filter, error) {
	if f.not {
		return nil, fmt.Errorf("--not must come before the filter it negates, e.g. --not --port 22")
	}
	out, err := tap.ParseFilter(f.groups)
	if err != nil {
		return nil, fmt.Errorf("--filter: %w", err)
	}
	if len(f.group) > 0 {
		out.Groups = append([]tap.Group{f.group}, out.Groups...)
	}
	return out, nil
}

// interrupted is a context ended by SIGINT or SIGTERM; an ended stream is then not an error.
func isDone(ctx context.Context, err error) bool { return ctx.Err() != nil }

func withConn(cmd *cobra.Command, c *adminClient, f *filterFlags) {
	c.flags(cmd.Flags())
	f.add(cmd.Flags())
}
