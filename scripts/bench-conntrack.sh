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
#   N=5000 RUNS=1 sudo -E scripts/bench-conntrack.sh
#   READ_BUFFER=256KiB sudo -E scripts/bench-conntrack.sh   # force overruns: resync path
#
# Needs root, iproute2, nftables, conntrack, socat and Go. Touches only its own namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-flowpipe}
N=${N:-20000}
RUNS=${RUNS:-3}
PORT=9000
FIRST=20000
UDP_TIMEOUT=2
READ_BUFFER=${READ_BUFFER:-32MiB}
ISOLATION=${ISOLATION:-}   # inproc or process for the source and the sink; empty: flowpipe's default

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, netlink)"; exit 1; }
case $MODE in flowpipe|conntrack-e) ;; *) echo "mode: flowpipe or conntrack-e"; exit 2;; esac

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
go build -o "$work/flowpipe" ./cmd/flowpipe
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
  cpu0=$(cpu $fp)
  burst
  settle "$out" '"type":"end"'
  cpu1=$(cpu $fp)
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
}

for i in $(seq "$RUNS"); do
  setup
  case $MODE in
    flowpipe) run_flowpipe ;;
    conntrack-e) run_conntrack_e ;;
  esac
  teardown
done
