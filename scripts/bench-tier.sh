#!/usr/bin/env bash
# The collector tier with the real flowpipe binary and a real JetStream cluster, all on
# loopback: an agent (generate -> grpc sink), a collector (grpc source -> jetstream sink),
# a 3-node nats-server cluster with an R3 stream, and a writer (jetstream source -> file
# sink, fsync per batch), every component in its own plugin process (the default). For each
# format it prints the events/s from the agent's start until the last event is in the file,
# and the CPU time per event of each tier (user+system of the process and its plugin
# children, and of the three nats-servers together).
# Usage: scripts/bench-tier.sh [EVENTS] [FORMATS] (default 500000 "packed json protobuf")
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-500000}
FORMATS=${2:-packed json protobuf}
command -v nats-server >/dev/null || { echo "nats-server not found: apt-get install nats-server" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
go build -o "$work/flowpipe" ./cmd/flowpipe
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

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

for fmt in $FORMATS; do
  rm -rf "$work/run"; mkdir -p "$work/run"; cd "$work/run"
  pids=()
  c1=$(port); c2=$(port); c3=$(port); r1=$(port); r2=$(port); r3=$(port)
  servers="[nats://127.0.0.1:$c1, nats://127.0.0.1:$c2, nats://127.0.0.1:$c3]"
  i=0
  for pair in "$c1 $r1" "$c2 $r2" "$c3 $r3"; do
    i=$((i+1)); set -- $pair
    cat > n$i.conf <<CONF
server_name: n$i
listen: 127.0.0.1:$1
jetstream { store_dir: "$work/run/n$i" }
cluster { name: bench, listen: 127.0.0.1:$2, routes: [nats-route://127.0.0.1:$r1, nats-route://127.0.0.1:$r2, nats-route://127.0.0.1:$r3] }
CONF
    nats-server -c n$i.conf >n$i.log 2>&1 & pids+=($!)
  done
  nats_pids=("${pids[@]}")
  listen=127.0.0.1:$(port)
  cat > collector.yaml <<YAML
admin: {listen: ""}
sources:
  agents: {type: grpc, listen: "$listen", auth: none}
sinks:
  log: {type: jetstream, servers: $servers, stream: FLOWS, subject: flows.in, format: $fmt, create_stream: {replicas: 3}}
YAML
  cat > writer.yaml <<YAML
admin: {listen: ""}
sources:
  log: {type: jetstream, servers: $servers, stream: FLOWS, durable: writers}
sinks:
  store: {type: file, path: out.jsonl, max_size: 0, in_flight: 2}
YAML
  cat > agent.yaml <<YAML
admin: {listen: ""}
sources:
  gen: {type: generate, count: $N, batch_size: 1000, seed: 1}
sinks:
  collector: {type: grpc, url: "http://$listen"}
YAML
  # The cluster elects a meta leader before the stream can be created: retry the collector.
  for _ in $(seq 50); do
    ../flowpipe run -c collector.yaml --log-level warn 2>collector.log & cpid=$!
    sleep 1
    if kill -0 $cpid 2>/dev/null; then break; fi
  done
  pids+=($cpid)
  ../flowpipe run -c writer.yaml --log-level warn 2>writer.log & wpid=$!; pids+=($wpid)
  sleep 1
  start=$(date +%s.%N)
  # The agent's CPU: its rusage and its plugin children's, once it exits (all ACKed).
  python3 -c 'import resource,subprocess,sys; subprocess.run(sys.argv[1:], stderr=open("agent.log","w")); r=resource.getrusage(resource.RUSAGE_CHILDREN); open("agent.cpu","w").write(str(r.ru_utime+r.ru_stime))' \
    ../flowpipe run -c agent.yaml --log-level warn & apid=$!; pids+=($apid)
  while [ "$(cat out.jsonl 2>/dev/null | wc -l)" -lt "$N" ]; do sleep 0.05; done
  end=$(date +%s.%N)
  wait $apid || true
  agent_cpu=$(python3 -c "print(int(float(open('agent.cpu').read())*$hz))")
  ccpu=$(cpu $cpid); wcpu=$(cpu $wpid); ncpu=0
  for p in "${nats_pids[@]}"; do ncpu=$((ncpu + $(cpu $p))); done
  python3 - "$fmt" "$N" "$start" "$end" "$hz" "$agent_cpu" "$ccpu" "$ncpu" "$wcpu" <<'PY'
import sys
fmt, n, s, e, hz = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
a, c, j, w = (int(x) / hz * 1e6 / n for x in sys.argv[6:10])
print(f"{fmt:9s} {n/(e-s):10.0f} events/s end to end   CPU µs/event: agent {a:.1f}  collector {c:.1f}  nats-servers {j:.1f}  writer {w:.1f}")
PY
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  cd "$work"
done
