#!/usr/bin/env bash
# Burst benchmark of the conntrack source (docs/benchmarks.md, issue 4).
#
# Two network namespaces joined by a veth pair; the client namespace opens N short UDP flows
# as fast as one thread can (one datagram from each of N source ports), the flows expire
# (nf_conntrack_udp_timeout is set low in that namespace), then ONE table dump makes the
# kernel destroy every expired entry at once: the worst burst of DESTROY events. It prints how
# many of the N starts and N ends were recorded, and the CPU the recorder used.
#
#   sudo scripts/bench-conntrack.sh                 # flowpipe run: conntrack -> file sink
#   sudo scripts/bench-conntrack.sh conntrack-e     # the peer reference: conntrack -E
#   sudo scripts/bench-conntrack.sh flowpipe-ipfix  # conntrack -> ipfix sink (UDP) -> nfcapd
#   sudo scripts/bench-conntrack.sh ulogd2-ipfix    # the IPFIX peer: ulogd2 NFCT -> IPFIX -> nfcapd
#   N=5000 RUNS=1 sudo -E scripts/bench-conntrack.sh
#   READ_BUFFER=256KiB sudo -E scripts/bench-conntrack.sh   # force overruns: resync path
#   FLOWPIPE=/tmp/old/flowpipe sudo -E scripts/bench-conntrack.sh  # a binary built elsewhere
#
# The flowpipe modes print the CPU of each process too: the host and every plugin process
# (by its component type; built-ins run as plugin processes by default), and the CPU per
# recorded event (starts + ends). FLOWPIPE_PLUGIN_CPUPROFILE=/tmp/prof in the environment
# makes every plugin process write a CPU profile (docs/plugins.md, Debug it).
#
# Needs root, iproute2, nftables, conntrack, socat and Go (the IPFIX modes: nfdump, ulogd2). Touches only its own namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-flowpipe}
N=${N:-20000}
RUNS=${RUNS:-3}
PORT=9000
FIRST=$(( N > 45000 ? 65535 - N : 20000 ))   # source ports FIRST..FIRST+N-1 must fit below 65536
UDP_TIMEOUT=2
READ_BUFFER=${READ_BUFFER:-32MiB}
ISOLATION=${ISOLATION:-}   # inproc or process for the source and the sink; empty: flowpipe's default

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, netlink)"; exit 1; }
case $MODE in flowpipe|conntrack-e|flowpipe-ipfix|ulogd2-ipfix) ;; *) echo "mode: flowpipe, conntrack-e, flowpipe-ipfix or ulogd2-ipfix"; exit 2;; esac

work=$(mktemp -d /tmp/bench-conntrack.XXXXXX)
id=$(printf '%04x' $((RANDOM)))
A=fpbA$id B=fpbB$id
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "building into $work"
if [ -n "${FLOWPIPE:-}" ]; then
  cp "$FLOWPIPE" "$work/flowpipe"
else
  go build -o "$work/flowpipe" ./cmd/flowpipe
fi
go build -o "$work/udpflood" ./sources/conntrack/internal/udpflood

setup() {
  ip netns add "$A"; ip netns add "$B"
  ip link add "va$id" netns "$A" type veth peer name "vb$id" netns "$B"
  ip -n "$A" addr add 10.250.0.1/24 dev "va$id"; ip -n "$B" addr add 10.250.0.2/24 dev "vb$id"
  for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
  ip -n "$A" link set "va$id" up; ip -n "$B" link set "vb$id" up
  ip netns exec "$A" sysctl -q -w net.netfilter.nf_conntrack_udp_timeout=$UDP_TIMEOUT
  ip netns exec "$A" sysctl -q -w net.netfilter.nf_conntrack_udp_timeout_stream=$UDP_TIMEOUT
  ip netns exec "$B" socat -u UDP-RECV:$PORT,bind=10.250.0.2 /dev/null & pids+=($!)
}
teardown() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  ip netns del "$A"; ip netns del "$B"
}

# cpu PID: user+system CPU seconds so far of a process and its children (flowpipe runs its
# built-in components as plugin processes by default).
cpu() {
  local p total=0
  for p in $1 $(pgrep -P "$1"); do
    total=$(awk -v t="$(getconf CLK_TCK)" -v s="$total" '{printf "%.2f", s + ($14+$15)/t}' "/proc/$p/stat" 2>/dev/null || echo "$total")
  done
  echo "$total"
}

# cpu_each PID: "name user system" (seconds) for the process and each child; a built-in plugin process is
# named by the type it serves (its command line is "flowpipe plugin serve KIND TYPE").
cpu_each() {
  local p name
  for p in $1 $(pgrep -P "$1"); do
    if [ "$p" = "$1" ]; then name=host; else
      name=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | awk '$2 == "plugin" && $3 == "serve" {print $5}')
      [ -n "$name" ] || name=child$p
    fi
    awk -v t="$(getconf CLK_TCK)" -v n="$name" '{printf "%s %.2f %.2f\n", n, $14/t, $15/t}' "/proc/$p/stat" 2>/dev/null || true
  done
}

# settle FILE PATTERN: wait until the count of lines matching PATTERN stops changing.
settle() {
  local last=-1 cur same=0
  while [ $same -lt 6 ]; do
    sleep 0.5
    cur=$(grep -c -- "$2" "$1" || true)
    if [ "$cur" = "$last" ]; then same=$((same+1)); else same=0; last=$cur; fi
  done
}

burst() {
  ip netns exec "$A" "$work/udpflood" -dst 10.250.0.2:$PORT -n "$N" -first-port $FIRST
  sleep $((UDP_TIMEOUT + 1))
  # The one dump: every expired entry is destroyed now, in one burst.
  ip netns exec "$A" conntrack -L >/dev/null 2>&1
}

run_flowpipe() {
  out=$work/flows.jsonl
  : >"$out"
  cat >"$work/pipeline.yaml" <<YAML
admin:
  listen: ""
sources:
  kernel:
    type: conntrack
    netns: $A
    activate: true
    protocols: [udp]
    read_buffer: $READ_BUFFER
${ISOLATION:+    isolation: $ISOLATION}
sinks:
  out:
    type: file
    path: $out
${ISOLATION:+    isolation: $ISOLATION}
YAML
  "$work/flowpipe" run -c "$work/pipeline.yaml" 2>"$work/flowpipe.log" & fp=$!; pids+=($fp)
  until ip netns exec "$A" nft list tables 2>/dev/null | grep -q flowpipe_kernel; do
    kill -0 $fp 2>/dev/null || { cat "$work/flowpipe.log"; exit 1; }
    sleep 0.1
  done
  sleep 0.5
  cpu_each $fp >"$work/cpu0"
  cpu0=$(cpu $fp)
  burst
  settle "$out" '"type":"end"'
  cpu1=$(cpu $fp)
  cpu_each $fp >"$work/cpu1"
  kill -INT $fp; wait $fp || true
  # From the source's log (its own metrics stay in the plugin process when it runs isolated).
  overruns=$(grep -c "overran the socket buffer" "$work/flowpipe.log" || true)
  rstarts=$( { grep -o 'reconstructed_starts=[0-9]*' "$work/flowpipe.log" || true; } | awk -F= '{s += $2} END {print s+0}')
  rends=$( { grep -o 'reconstructed_ends=[0-9]*' "$work/flowpipe.log" || true; } | awk -F= '{s += $2} END {print s+0}')
  starts=$(grep '"type":"start"' "$out" | grep -c "\"dst_port\":$PORT" || true)
  ends=$(grep '"type":"end"' "$out" | grep -c "\"dst_port\":$PORT" || true)
  marked=$(grep -c '"reconstructed":true' "$out" || true)
  printf 'flowpipe:    starts %d/%d (%.1f%%)  ends %d/%d (%.1f%%)  cpu %.2fs  overrun episodes %d  reconstructed starts %d ends %d (marked in output: %d)\n' \
    "$starts" "$N" "$(echo "100*$starts/$N" | bc -l)" "$ends" "$N" "$(echo "100*$ends/$N" | bc -l)" \
    "$(echo "$cpu1-$cpu0" | bc -l)" "$overruns" "$rstarts" "$rends" "$marked"
  per_event "$(echo "$cpu1-$cpu0" | bc -l)" $((starts + ends))
  printf '             cpu by process:'
  awk 'NR == FNR {u[$1] = $2; s[$1] = $3; next} {printf " %s %.2fs (user %.2f, system %.2f)", $1, $2 + $3 - u[$1] - s[$1], $2 - u[$1], $3 - s[$1]}' "$work/cpu0" "$work/cpu1"
  echo
}

# per_event SECONDS EVENTS: the CPU per recorded event.
per_event() {
  printf '             cpu per recorded event (starts + ends): %.2f us\n' "$(echo "1000000*$1/($2+(0==$2))" | bc -l)"
}

run_conntrack_e() {
  out=$work/events.txt
  # Make the namespace track connections, as activate: true does for flowpipe.
  ip netns exec "$A" nft 'add table inet peer; add chain inet peer c; add rule inet peer c ct state new counter'
  ip netns exec "$A" conntrack -E -e NEW,DESTROY -p udp >"$out" 2>"$work/conntrack.err" & ce=$!; pids+=($ce)
  sleep 0.5
  cpu0=$(cpu $ce)
  burst
  settle "$out" DESTROY
  cpu1=$(cpu $ce)
  starts=$(grep NEW "$out" | grep -c "dport=$PORT" || true)
  ends=$(grep DESTROY "$out" | grep -c "dport=$PORT" || true)
  printf 'conntrack -E: starts %d/%d (%.1f%%)  ends %d/%d (%.1f%%)  cpu %.2fs  (%s)\n' \
    "$starts" "$N" "$(echo "100*$starts/$N" | bc -l)" "$ends" "$N" "$(echo "100*$ends/$N" | bc -l)" \
    "$(echo "$cpu1-$cpu0" | bc -l)" "$(tr '\n' ' ' <"$work/conntrack.err" | cut -c1-80)"
  per_event "$(echo "$cpu1-$cpu0" | bc -l)" $((starts + ends))
}

# ipfix_count DIR: records nfcapd stored for the flood's flows, and how many carry the
# flow's real counters (1 packet each) and a start time.
ipfix_count() {
  nfdump -R "$1" -q -o "fmt:%ts %dp %pkt" 2>/dev/null | awk -v port=$PORT '
    $3 == port { n++; if ($4 == 1) c++; if ($1 != "1970-01-01") ts++ }
    END { printf "%d %d %d\n", n, c, ts }'
}

# nfcapd_in NS DIR PORT: a collector on 127.0.0.1:PORT of namespace NS ("" for this one).
nfcapd_in() {
  mkdir -p "$2"
  if [ -n "$1" ]; then
    ip netns exec "$1" nfcapd -b 127.0.0.1 -p "$3" -w "$2" -t 3600 >"$work/nfcapd.log" 2>&1 & nf=$!
  else
    nfcapd -b 127.0.0.1 -p "$3" -w "$2" -t 3600 >"$work/nfcapd.log" 2>&1 & nf=$!
  fi
  pids+=($nf)
  sleep 0.5
}

run_flowpipe_ipfix() {
  rm -rf "$work/nf"; nfcapd_in "" "$work/nf" 4739
  cat >"$work/pipeline.yaml" <<YAML
admin:
  listen: ""
sources:
  kernel:
    type: conntrack
    netns: $A
    activate: true
    protocols: [udp]
    read_buffer: $READ_BUFFER
${ISOLATION:+    isolation: $ISOLATION}
sinks:
  collector:
    type: ipfix
    address: 127.0.0.1:4739
    events: end
${ISOLATION:+    isolation: $ISOLATION}
YAML
  "$work/flowpipe" run -c "$work/pipeline.yaml" 2>"$work/flowpipe.log" & fp=$!; pids+=($fp)
  until ip netns exec "$A" nft list tables 2>/dev/null | grep -q flowpipe_kernel; do
    kill -0 $fp 2>/dev/null || { cat "$work/flowpipe.log"; exit 1; }
    sleep 0.1
  done
  sleep 0.5
  cpu0=$(cpu $fp)
  burst
  sleep 3   # no output file to watch: give the exporter time to send the burst
  cpu1=$(cpu $fp)
  kill -INT $fp; wait $fp || true
  sleep 1; kill -TERM $nf; wait $nf || true
  read -r ends counted timed < <(ipfix_count "$work/nf")
  printf 'flowpipe -> IPFIX: end records %d/%d (%.1f%%), with counters %d, with times %d  cpu %.2fs  nfcapd: %s\n' \
    "$ends" "$N" "$(echo "100*$ends/$N" | bc -l)" "$counted" "$timed" "$(echo "$cpu1-$cpu0" | bc -l)" \
    "$(grep -o 'Sequence Errors: [0-9]*' "$work/nfcapd.log" | tail -1)"
}

run_ulogd2_ipfix() {
  command -v ulogd >/dev/null || { echo "ulogd2 is not installed (apt-get install ulogd2)"; exit 1; }
  # ulogd2's own socket must not take a source port of the flood.
  ip netns exec "$A" sysctl -q -w net.ipv4.ip_local_port_range="50000 60000"
  rm -rf "$work/nf"; nfcapd_in "$A" "$work/nf" 4739
  # What activate: true does for flowpipe: track connections, count them, time them.
  ip netns exec "$A" nft 'add table inet peer; add chain inet peer c { type filter hook output priority 0; }; add rule inet peer c ct state new counter'
  ip netns exec "$A" sysctl -q -w net.netfilter.nf_conntrack_acct=1 net.netfilter.nf_conntrack_timestamp=1
  cat >"$work/ulogd.conf" <<CONF
[global]
logfile="$work/ulogd.log"
loglevel=5
plugin="/usr/lib/x86_64-linux-gnu/ulogd/ulogd_inpflow_NFCT.so"
plugin="/usr/lib/x86_64-linux-gnu/ulogd/ulogd_output_IPFIX.so"
stack=ct1:NFCT,ipfix1:IPFIX
[ct1]
event_mask=0x00000004
hash_enable=0
netlink_socket_buffer_size=33554432
netlink_socket_buffer_maxsize=33554432
[ipfix1]
oid=1
host="127.0.0.1"
port=4739
proto="udp"
send_template="once"
CONF
  ip netns exec "$A" ulogd -c "$work/ulogd.conf" >/dev/null 2>&1 & ul=$!; pids+=($ul)
  sleep 1
  cpu0=$(cpu $ul)
  burst
  sleep 3
  cpu1=$(cpu $ul)
  kill -TERM $ul; wait $ul || true
  sleep 1; kill -TERM $nf; wait $nf || true
  read -r ends counted timed < <(ipfix_count "$work/nf")
  printf 'ulogd2 -> IPFIX:   end records %d/%d (%.1f%%), with counters %d, with times %d  cpu %.2fs  nfcapd: %s\n' \
    "$ends" "$N" "$(echo "100*$ends/$N" | bc -l)" "$counted" "$timed" "$(echo "$cpu1-$cpu0" | bc -l)" \
    "$(grep -o 'Sequence Errors: [0-9]*' "$work/nfcapd.log" | tail -1)"
}

for i in $(seq "$RUNS"); do
  setup
  case $MODE in
    flowpipe) run_flowpipe ;;
    conntrack-e) run_conntrack_e ;;
    flowpipe-ipfix) run_flowpipe_ipfix ;;
    ulogd2-ipfix) run_ulogd2_ipfix ;;
  esac
  teardown
done
