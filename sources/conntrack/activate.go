package conntrack

import (
	"fmt"

	"github.com/flowpipe/flowpipe/internal/netns"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Since Linux 4.x the kernel registers its conntrack hooks in a namespace only while some
// rule needs them (an iptables state match, an nftables ct expression, NAT). A namespace with
// no firewall tracks nothing and so sends no events. activate adds the smallest nftables
// ruleset that needs conntrack for IPv4 and IPv6: one inet table holding a regular
// (non-base) chain with the rule `ct state new counter`. The chain is attached to no hook, so
// no packet ever traverses it; the ct expression alone takes the conntrack reference.

// activation is the table a source added, removed again on stop.
type activation struct {
	ns    *netns.NS
	table *nftables.Table
}

func activate(ns *netns.NS, tableName string) (*activation, error) {
	c, err := nftables.New(nftables.WithNetNSFd(ns.Fd()))
	if err != nil {
		return nil, fmt.Errorf("activate conntrack in %s: open nftables: %w", ns, err)
	}
	t := &nftables.Table{Name: tableName, Family: nftables.TableFamilyINet}
	// A table left by a process that was killed is replaced, not doubled.
	if old, err := c.ListTableOfFamily(tableName, nftables.TableFamilyINet); err == nil && old != nil {
		c.DelTable(t)
		if err := c.Flush(); err != nil {
			return nil, fmt.Errorf("activate conntrack in %s: remove stale table inet %s: %w", ns, tableName, err)
		}
	}
	c.AddTable(t)
	ch := c.AddChain(&nftables.Chain{Name: "track", Table: t})
	c.AddRule(&nftables.Rule{
		Table: t,
		Chain: ch,
		Exprs: []expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: nativeUint32(expr.CtStateBitNEW), Xor: nativeUint32(0)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: nativeUint32(0)},
			&expr.Counter{},
		},
	})
	if err := c.Flush(); err != nil {
		return nil, fmt.Errorf("activate conntrack in %s: add table inet %s: %w (needs CAP_NET_ADMIN)", ns, tableName, err)
	}
	return &activation{ns: ns, table: t}, nil
}

func (a *activation) remove() error {
	c, err := nftables.New(nftables.WithNetNSFd(a.ns.Fd()))
	if err != nil {
		return fmt.Errorf("remove table inet %s in %s: %w", a.table.Name, a.ns, err)
	}
	c.DelTable(a.table)
	if err := c.Flush(); err != nil && err != unix.ENOENT {
		return fmt.Errorf("remove table inet %s in %s: %w", a.table.Name, a.ns, err)
	}
	return nil
}

func nativeUint32(v uint32) []byte { return binaryutil.NativeEndian.PutUint32(v) }
