#!/usr/bin/env bash
# Agent-to-collector benchmark with the real flowpipe binary, two processes on loopback:
# the collector runs `grpc source -> file sink (fsync per batch)`, the agent runs
# `generate -> grpc sink`; every event is ACKed by the collector after its file sink fsynced
# it. Prints the agent's events/s (its run ends when the last event is ACKed) and the CPU time
# per event of agent and collector (user+system of each process and its plugin children) for each
# protocol (flowpipe: a run of events per message, an ACK per message; netbird: NetBird's
# FlowService, an event per message, an ACK per event), isolation and grpc sink in_flight.
# Usage: scripts/bench-grpc.sh [EVENTS] [PROTOCOLS] [IN_FLIGHTS] [ISOLATIONS]
#        (default 1000000 "flowpipe netbird" "16" "inproc process")
# The protocol "default" sets none (for a binary from before the protocol option). FLOWPIPE=path
# runs that binary instead of building this tree. FLOWPIPE_BEFORE=path runs every case twice,
# interleaved: with that binary ("before") and then with this tree's (or FLOWPIPE's, "after"),
# so that both see the same load. AGENT_QUEUE=disk puts the agent's grpc sink behind a disk
# queue (queue: {type: disk}, a fresh data_dir for every run), as an agent that must survive a
# restart runs.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
PROTOCOLS=${2:-flowpipe netbird}
IN_FLIGHTS=${3:-16}
ISOLATIONS=${4:-inproc process}
work=$(mktemp -d)
collector_pid=""
cleanup() {
  if [ -n "$collector_pid" ]; then kill "$collector_pid" 2>/dev/null || true; wait "$collector_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
if [ -n "${FLOWPIPE:-}" ]; then cp "$FLOWPIPE" "$work/flowpipe"; else go build -o "$work/flowpipe" ./cmd/flowpipe; fi
binaries="flowpipe"
if [ -n "${FLOWPIPE_BEFORE:-}" ]; then cp "$FLOWPIPE_BEFORE" "$work/flowpipe-before"; binaries="flowpipe-before flowpipe"; fi
bin=flowpipe
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
secret=bench-secret-0123456789abcdef

start_collector() { # isolation
  cat > "$work/collector.yaml" <<YAML
admin: {listen: ""}
sources:
  agents: {type: grpc, isolation: $1, listen: "127.0.0.1:$port", auth: hmac, secrets: ["$secret"]}
sinks:
  out: {type: file, isolation: $1, in_flight: 4, path: flows.jsonl, max_size: 0}
YAML
  rm -f "$work"/flows.jsonl*
  (cd "$work" && exec ./$bin run -c collector.yaml --log-level warn) &
  collector_pid=$!
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.1; done
  echo "collector did not start" >&2; exit 1
}

# cpu PID: user+system clock ticks of PID and every descendant.
cpu() {
  python3 - "$1" <<'PY'
import os, sys
root = int(sys.argv[1]); kids = {}; ticks = {}
for d in os.listdir('/proc'):
    if not d.isdigit(): continue
    try: s = open(f'/proc/{d}/stat').read()
    except OSError: continue
    f = s[s.rindex(')')+2:].split()
    kids.setdefault(int(f[1]), []).append(int(d)); ticks[int(d)] = int(f[11]) + int(f[12])
tot, todo = 0, [root]
while todo:
    p = todo.pop(); tot += ticks.get(p, 0); todo += kids.get(p, [])
print(tot)
PY
}
hz=$(getconf CLK_TCK)

stop_collector() {
  kill -TERM "$collector_pid"; wait "$collector_pid" || true; collector_pid=""
}

run_agent() { # name, isolation, in_flight, protocol
  local proto="protocol: $4, "
  [ "$4" = default ] && proto=""
  local queue=""
  [ "${AGENT_QUEUE:-}" = disk ] && queue=", queue: {type: disk}"
  rm -rf "$work/agent-data"
  cat > "$work/agent.yaml" <<YAML
admin: {listen: ""}
data_dir: agent-data
sources:
  gen: {type: generate, isolation: $2, count: $N, batch_size: 1024}
sinks:
  collector: {type: grpc, isolation: $2, in_flight: $3, ${proto}url: "http://127.0.0.1:$port", hmac_secret: "$secret"$queue}
YAML
  local t0 t1 lines c0 c1 acpu
  c0=$(cpu "$collector_pid")
  t0=$(date +%s.%N)
  # The agent's CPU: its rusage and its plugin children's, once it exits (all ACKed).
  (cd "$work" && python3 -c 'import resource,subprocess,sys; subprocess.run(sys.argv[1:], check=True); r=resource.getrusage(resource.RUSAGE_CHILDREN); print(r.ru_utime+r.ru_stime)' \
    ./$bin run -c agent.yaml --log-level warn) > "$work/agent.cpu"
  t1=$(date +%s.%N)
  c1=$(cpu "$collector_pid")
  lines=$(wc -l < "$work/flows.jsonl")
  acpu=$(cat "$work/agent.cpu")
  awk -v n="$lines" -v a="$t0" -v b="$t1" -v name="$1" -v ac="$acpu" -v cc="$((c1 - c0))" -v hz="$hz" \
    'BEGIN { printf "%-62s %9d events in %6.2fs = %9.0f events/s   CPU µs/event: agent %.2f  collector %.2f\n", name, n, b-a, n/(b-a), ac*1e6/n, cc/hz*1e6/n }'
}

for iso in $ISOLATIONS; do
  for inflight in $IN_FLIGHTS; do
    for proto in $PROTOCOLS; do
      for bin in $binaries; do
        label=""
        [ "$binaries" != flowpipe ] && label="$([ "$bin" = flowpipe ] && echo "after:  " || echo "before: ")"
        start_collector "$iso"
        run_agent "$label$proto: agent -> collector ($iso, in_flight $inflight)" "$iso" "$inflight" "$proto"
        stop_collector
      done
    done
  done
done
