package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
)

// The exit codes of `flowpipe reload` (its --help lists them).
const (
	exitReloadRejected    = 1 // the new file was rejected (422), applying it failed (500), or no answer in time
	exitReloadUnreachable = 2 // no flowpipe answered: not running, wrong address, admin listener disabled
	exitReloadRefused     = 3 // the admin listener refused the request: a wrong or missing token
	exitReloadUnavailable = 4 // flowpipe is starting or stopping: no reload now (503)
)

func newReloadCmd(g *globalFlags) *cobra.Command {
	var (
		c        adminClient
		asJSON   bool
		timeout  time.Duration
		hupPID   int
		explicit bool
	)
	cmd := &cobra.Command{
		Use:   "reload",
		Short: "Reload a running flowpipe's pipeline file and print what changed, or why nothing did",
		Long: `reload asks a running flowpipe to apply its pipeline file again (POST /-/reload on its
admin listener, as SIGHUP does) and waits until the reload is done. It prints the diff of
an applied reload (components started, stopped and changed, with the keys that changed and
how, how many were kept, how many queued events were handed over), or the problems of a
rejected file exactly as ` + "`flowpipe validate`" + ` prints them (nothing changed then: the old
pipeline runs on). --json prints the answer as the admin listener gave it.

Where flowpipe is: --admin (or $FLOWPIPE_ADMIN) when given; else the pipeline file's
admin.listen (-c, $FLOWPIPE_CONFIG or ./pipeline.yaml; https:// when it sets
admin.cert_file), with its admin.token or admin.token_file unless --token, --token-file or
$FLOWPIPE_ADMIN_TOKEN is given; else 127.0.0.1:9560.

With the admin listener disabled (admin.listen: "") there is no one to ask: reload says so
and exits 2; send SIGHUP instead (kill -HUP <pid>), whose result is only in flowpipe's log.
--hup-pid PID does that itself in that one case: it validates the file as ` + "`flowpipe validate`" + `
does (exit 1 on a problem) and sends SIGHUP to PID (the systemd unit's ExecReload passes
$MAINPID).

Exit status:
  0  the reload was applied
  1  the new file was rejected (nothing changed), applying it failed (in part), or no
     answer came within --timeout
  2  cannot reach flowpipe: not running, another address, or the admin listener disabled
  3  the admin listener refused the request: a wrong or missing token
  4  flowpipe is starting or stopping: try again`,
		Example: `  flowpipe reload
  flowpipe reload -c /etc/flowpipe/pipeline.yaml
  flowpipe reload --admin 127.0.0.1:9560 --token-file /etc/flowpipe/admin.token --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			explicit = cmd.Flags().Changed("admin") || os.Getenv("FLOWPIPE_ADMIN") != ""
			stderr := cmd.ErrOrStderr()
			if !explicit {
				disabled, err := c.fromPipelineFile(g, cmd.Flags().Changed("config") || os.Getenv("FLOWPIPE_CONFIG") != "")
				if err != nil {
					fmt.Fprintln(stderr, "flowpipe reload:", err)
					return exitError{exitReloadUnreachable}
				}
				if disabled {
					if hupPID > 0 {
						return hupFallback(cmd.OutOrStdout(), stderr, g, hupPID)
					}
					fmt.Fprintf(stderr, "flowpipe reload: cannot reach flowpipe: %s disables the admin listener (admin.listen: \"\"), which reload asks; send SIGHUP instead (kill -HUP <pid of flowpipe run>, or systemctl reload flowpipe) and read the result in flowpipe's log\n", g.config)
					return exitError{exitReloadUnreachable}
				}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			resp, err := c.do(ctx, http.MethodPost, "/-/reload", "")
			if err != nil {
				if errors.Is(err, context.DeadlineExceeded) {
					// Reached, perhaps, but no answer: the outcome is unknown.
					fmt.Fprintf(stderr, "flowpipe reload: no answer from %s within --timeout %s; a reload that began goes on in flowpipe: see its log\n", c.addr, timeout)
					return exitError{exitReloadRejected}
				}
				fmt.Fprintln(stderr, "flowpipe reload:", err)
				if errors.Is(err, errUnreachable) {
					return exitError{exitReloadUnreachable}
				}
				return exitError{exitReloadRejected}
			}
			defer resp.Body.Close()
			return printReload(cmd.OutOrStdout(), stderr, &c, resp, asJSON)
		},
	}
	c.flags(cmd.Flags())
	addConfigFlag(cmd, g)
	fs := cmd.Flags()
	fs.BoolVar(&asJSON, "json", false, "print the admin listener's answer (JSON) as it is")
	fs.DurationVar(&timeout, "timeout", 5*time.Minute, "how long to wait for the reload to finish")
	fs.IntVar(&hupPID, "hup-pid", 0, "when the pipeline file disables the admin listener, validate the file and send SIGHUP to this process instead")
	return cmd
}

// fromPipelineFile points c at the admin listener the pipeline file declares, with its token
// when none was given. It reports whether the file disables the listener. A file that is
// not there is no error when it was not named (-c, $FLOWPIPE_CONFIG): c keeps its default.
func (c *adminClient) fromPipelineFile(g *globalFlags, named bool) (disabled bool, err error) {
	if _, err := os.Stat(g.config); !named && errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	doc, err := g.loadConfig()
	if doc == nil {
		return false, fmt.Errorf("where is flowpipe? reading the pipeline file for admin.listen: %w (or set --admin)", err)
	}
	// A file with problems still says where its admin listener is: the running flowpipe
	// answers with the problems. (admin: takes effect only at start; a reload that changes
	// it is rejected.)
	a := doc.Admin
	if a.Listen == "" {
		return true, nil
	}
	c.addr = a.Listen
	if a.CertFile != "" && !strings.HasPrefix(a.Listen, "unix:") {
		c.addr = "https://" + a.Listen
	}
	if c.token == "" && c.tokenFile == "" && os.Getenv("FLOWPIPE_ADMIN_TOKEN") == "" {
		c.token = a.Token
		if a.TokenFile != "" {
			c.tokenFile = doc.AdminPath(a.TokenFile)
		}
	}
	return false, nil
}

// hupFallback is reload without an admin listener: validate, then SIGHUP.
func hupFallback(stdout, stderr io.Writer, g *globalFlags, pid int) error {
	if err := validateFile(stdout, g); err != nil {
		var ee exitError
		if !errors.As(err, &ee) {
			fmt.Fprintln(stderr, "flowpipe reload:", err)
		}
		fmt.Fprintln(stderr, "flowpipe reload: not reloaded: the file has problems; the running pipeline goes on as before")
		return exitError{exitReloadRejected}
	}
	if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
		fmt.Fprintf(stderr, "flowpipe reload: kill -HUP %d: %v\n", pid, err)
		return exitError{exitReloadUnreachable}
	}
	fmt.Fprintf(stderr, "flowpipe reload: the admin listener is disabled (admin.listen: \"\"): sent SIGHUP to %d; the result is only in flowpipe's log\n", pid)
	return nil
}

// printReload prints the answer of POST /-/reload and returns the exit error for anything
// but 200.
func printReload(stdout, stderr io.Writer, c *adminClient, resp *http.Response, asJSON bool) error {
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		fmt.Fprintf(stderr, "flowpipe reload: reading the answer of %s: %v\n", c.addr, err)
		return exitError{exitReloadUnreachable}
	}
	switch resp.StatusCode {
	case http.StatusUnauthorized, http.StatusForbidden:
		fmt.Fprintln(stderr, "flowpipe reload:", c.statusError(&http.Response{StatusCode: resp.StatusCode, Body: io.NopCloser(strings.NewReader(string(body)))}))
		return exitError{exitReloadRefused}
	case http.StatusOK, http.StatusUnprocessableEntity, http.StatusServiceUnavailable, http.StatusInternalServerError:
	default:
		fmt.Fprintf(stderr, "flowpipe reload: admin listener at %s: %s: %s (is this flowpipe's admin listener, and flowpipe new enough to have POST /-/reload?)\n", c.addr, resp.Status, strings.TrimSpace(string(body)))
		return exitError{exitReloadRejected}
	}
	var a struct {
		reloadAnswer
		Problems []string `json:"problems"`
		Error    string   `json:"error"`
	}
	if err := json.Unmarshal(body, &a); err != nil {
		fmt.Fprintf(stderr, "flowpipe reload: admin listener at %s: %s, not a reload answer: %s\n", c.addr, resp.Status, strings.TrimSpace(string(body)))
		return exitError{exitReloadRejected}
	}
	if asJSON {
		stdout.Write(body)
		if len(body) > 0 && body[len(body)-1] != '\n' {
			fmt.Fprintln(stdout)
		}
	}
	switch resp.StatusCode {
	case http.StatusOK:
		if !asJSON {
			printDiff(stdout, &a.reloadAnswer, "reload applied")
		}
		return nil
	case http.StatusUnprocessableEntity:
		// On stderr, as validate prints them.
		if !asJSON {
			for _, p := range a.Problems {
				fmt.Fprintln(stderr, p)
			}
		}
		fmt.Fprintf(stderr, "reload rejected: %d problem(s) found; nothing changed, flowpipe runs on as before\n", len(a.Problems))
		return exitError{exitReloadRejected}
	case http.StatusServiceUnavailable:
		fmt.Fprintf(stderr, "flowpipe reload: no reload now: %s; try again\n", strings.TrimPrefix(a.Error, "no reload now: "))
		return exitError{exitReloadUnavailable}
	}
	// 500: failed, or applied in part.
	if a.Error != "" {
		fmt.Fprintf(stderr, "reload failed: the new file is valid, but applying it failed: %s\n", a.Error)
		return exitError{exitReloadRejected}
	}
	if !asJSON {
		printDiff(stdout, &a.reloadAnswer, "reload applied in part")
		for _, e := range a.Errors {
			fmt.Fprintln(stderr, "error:", e)
		}
	}
	fmt.Fprintf(stderr, "reload failed in part: %d change(s) could not be applied; the pipeline file does not say what runs (see flowpipe's log)\n", len(a.Errors))
	return exitError{exitReloadRejected}
}

// printDiff prints what a reload did, one line per component started, stopped or changed,
// then verdict with the counts.
func printDiff(w io.Writer, a *reloadAnswer, verdict string) {
	for _, s := range a.Started {
		fmt.Fprintf(w, "started  %s\n", s)
	}
	for _, s := range a.Stopped {
		line := "stopped  " + s
		if name, ok := strings.CutPrefix(s, "sink/"); ok {
			if n, ok := a.Delivered[name]; ok {
				line += fmt.Sprintf(" (delivered %d queued events", n)
				if u := a.Undelivered[name]; u > 0 {
					line += fmt.Sprintf(", %d could not be delivered", u)
				}
				line += ")"
			}
		}
		fmt.Fprintln(w, line)
	}
	for _, ch := range a.Changed {
		line := fmt.Sprintf("changed  %s: %s (%s)", ch.Component, strings.Join(ch.Keys, ", "), ch.How)
		if name, ok := strings.CutPrefix(ch.Component, "sink/"); ok {
			if n, ok := a.HandedOver[name]; ok {
				line += fmt.Sprintf(", %d queued events handed over", n)
			}
		}
		fmt.Fprintln(w, line)
	}
	// Counts for sinks not named above (a sink whose queue moved, say).
	named := map[string]bool{}
	for _, s := range a.Stopped {
		named[strings.TrimPrefix(s, "sink/")] = true
	}
	for _, ch := range a.Changed {
		named[strings.TrimPrefix(ch.Component, "sink/")] = true
	}
	var rest []string
	for name := range a.HandedOver {
		if !named[name] {
			rest = append(rest, name)
		}
	}
	sort.Strings(rest)
	for _, name := range rest {
		fmt.Fprintf(w, "handed over  sink/%s: %d queued events\n", name, a.HandedOver[name])
	}
	if len(a.Started)+len(a.Stopped)+len(a.Changed) == 0 {
		fmt.Fprintf(w, "%s: nothing changed (%d components kept)\n", verdict, len(a.Kept))
		return
	}
	fmt.Fprintf(w, "%s: %d started, %d stopped, %d changed, %d kept\n", verdict, len(a.Started), len(a.Stopped), len(a.Changed), len(a.Kept))
}
