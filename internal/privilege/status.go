package privilege

import (
	"bufio"
	"io"
	"os"
	"strconv"
	"strings"
)

// Status is the privilege fields of /proc/PID/status.
type Status struct {
	CapEff, CapPrm, CapInh, CapBnd, CapAmb Set
	NoNewPrivs                             bool
	UID, GID                               int
}

// ReadStatus reads the privilege fields of /proc/<pid>/status.
func ReadStatus(pid int) (Status, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return Status{}, err
	}
	defer f.Close()
	return parseStatus(f)
}

func parseStatus(r io.Reader) (Status, error) {
	var st Status
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		hex := func() Set { n, _ := strconv.ParseUint(v, 16, 64); return Set(n) }
		switch k {
		case "CapEff":
			st.CapEff = hex()
		case "CapPrm":
			st.CapPrm = hex()
		case "CapInh":
			st.CapInh = hex()
		case "CapBnd":
			st.CapBnd = hex()
		case "CapAmb":
			st.CapAmb = hex()
		case "NoNewPrivs":
			st.NoNewPrivs = v == "1"
		case "Uid":
			st.UID, _ = strconv.Atoi(strings.Fields(v)[1]) // effective
		case "Gid":
			st.GID, _ = strconv.Atoi(strings.Fields(v)[1])
		}
	}
	return st, sc.Err()
}
