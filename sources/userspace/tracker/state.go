package tracker

import "time"

// State is the state of a connection. TCP connections move through the TCP states; UDP and
// ICMP connections are StateUnreplied until the first answer, then StateReplied.
type State uint8

const (
	StateNone        State = iota
	StateSynSent           // TCP: SYN seen from the initiator
	StateSynSent2          // TCP: simultaneous open, SYNs seen from both ends
	StateSynReceived       // TCP: SYN-ACK seen
	StateEstablished       // TCP: handshake complete (or connection picked up mid-stream)
	StateFinWait           // TCP: one end sent FIN, not yet acknowledged
	StateCloseWait         // TCP: one end's FIN acknowledged, the other still open (half-closed)
	StateClosing           // TCP: both ends sent FIN, the first not yet acknowledged
	StateLastAck           // TCP: both ends sent FIN, only the last one awaits its ACK
	StateTimeWait          // TCP: both FINs acknowledged
	StateClose             // TCP: reset
	StateUnreplied         // UDP, ICMP: packets seen from the initiator only
	StateReplied           // UDP, ICMP: answered
	numStates
)

var stateNames = [...]string{"none", "syn_sent", "syn_sent2", "syn_received", "established",
	"fin_wait", "close_wait", "closing", "last_ack", "time_wait", "close", "unreplied", "replied"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "invalid"
}

// Timeouts are how long a connection may stay idle in each state before it is removed. The
// zero value of a field means the Linux nf_conntrack default (DefaultTimeouts).
type Timeouts struct {
	TCPSynSent     time.Duration `yaml:"tcp_syn_sent"`
	TCPSynRecv     time.Duration `yaml:"tcp_syn_recv"`
	TCPEstablished time.Duration `yaml:"tcp_established"`
	TCPFinWait     time.Duration `yaml:"tcp_fin_wait"`
	TCPCloseWait   time.Duration `yaml:"tcp_close_wait"`
	TCPLastAck     time.Duration `yaml:"tcp_last_ack"` // also the simultaneous-close state
	TCPTimeWait    time.Duration `yaml:"tcp_time_wait"`
	TCPClose       time.Duration `yaml:"tcp_close"`
	UDPUnreplied   time.Duration `yaml:"udp_unreplied"`
	UDPStream      time.Duration `yaml:"udp_stream"`
	ICMP           time.Duration `yaml:"icmp"`
}

// DefaultTimeouts are the Linux nf_conntrack defaults (net.netfilter.nf_conntrack_*_timeout_*).
func DefaultTimeouts() Timeouts {
	return Timeouts{
		TCPSynSent:     2 * time.Minute,
		TCPSynRecv:     60 * time.Second,
		TCPEstablished: 5 * 24 * time.Hour,
		TCPFinWait:     2 * time.Minute,
		TCPCloseWait:   60 * time.Second,
		TCPLastAck:     30 * time.Second,
		TCPTimeWait:    2 * time.Minute,
		TCPClose:       10 * time.Second,
		UDPUnreplied:   30 * time.Second,
		UDPStream:      120 * time.Second,
		ICMP:           30 * time.Second,
	}
}

func (t Timeouts) withDefaults() Timeouts {
	d := DefaultTimeouts()
	for _, f := range []struct{ v, def *time.Duration }{
		{&t.TCPSynSent, &d.TCPSynSent}, {&t.TCPSynRecv, &d.TCPSynRecv},
		{&t.TCPEstablished, &d.TCPEstablished}, {&t.TCPFinWait, &d.TCPFinWait},
		{&t.TCPCloseWait, &d.TCPCloseWait}, {&t.TCPLastAck, &d.TCPLastAck},
		{&t.TCPTimeWait, &d.TCPTimeWait}, {&t.TCPClose, &d.TCPClose},
		{&t.UDPUnreplied, &d.UDPUnreplied}, {&t.UDPStream, &d.UDPStream}, {&t.ICMP, &d.ICMP},
	} {
		if *f.v <= 0 {
			*f.v = *f.def
		}
	}
	return t
}

// Timeout classes: the entries of one class share a timeout, so a list of them ordered by last
// activity is also ordered by expiry. TCP states map one to one; UDP and ICMP have their own.
const (
	classUDPUnreplied = uint8(numStates) + iota
	classUDPReplied
	classICMP
	numClasses
)

func classOf(proto uint8, s State) uint8 {
	switch proto {
	case 6:
		return uint8(s)
	case 17:
		if s == StateReplied {
			return classUDPReplied
		}
		return classUDPUnreplied
	}
	return classICMP
}

func (t Timeouts) byClass() [numClasses]int64 {
	var c [numClasses]int64
	c[StateSynSent] = int64(t.TCPSynSent)
	c[StateSynSent2] = int64(t.TCPSynSent)
	c[StateSynReceived] = int64(t.TCPSynRecv)
	c[StateEstablished] = int64(t.TCPEstablished)
	c[StateFinWait] = int64(t.TCPFinWait)
	c[StateCloseWait] = int64(t.TCPCloseWait)
	c[StateClosing] = int64(t.TCPLastAck)
	c[StateLastAck] = int64(t.TCPLastAck)
	c[StateTimeWait] = int64(t.TCPTimeWait)
	c[StateClose] = int64(t.TCPClose)
	c[StateUnreplied] = int64(t.UDPUnreplied) // unused: UDP and ICMP use their own classes
	c[StateReplied] = int64(t.UDPStream)
	c[classUDPUnreplied] = int64(t.UDPUnreplied)
	c[classUDPReplied] = int64(t.UDPStream)
	c[classICMP] = int64(t.ICMP)
	return c
}
