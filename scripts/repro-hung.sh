#!/usr/bin/env bash
# A loaded collector tier with a short process.ping_interval, to see whether live plugins
# are killed as "hung": an agent (generate -> grpc sink) streams as fast as it can into a
# collector (grpc source -> jetstream sink, 3-node R3 JetStream cluster on loopback) and a
# writer (jetstream source -> file sink), every component in its own plugin process, every
# one with process.ping_interval: $PING (call_timeout twice that). It prints, for the
# collector and the writer, how many times a plugin was killed as hung and how many plugin
# failures there were in all, and whether every event reached the file.
# Usage: scripts/repro-hung.sh [EVENTS] [PING] [FLOWPIPE-BINARY]
#        (default 300000, 50ms, built from this checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300000}
PING=${2:-50ms}
BIN=${3:-}
command -v nats-server >/dev/null || { echo "nats-server not found: apt-get install nats-server" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
if [ -z "$BIN" ]; then go build -o "$work/flowpipe" ./cmd/flowpipe; BIN=$work/flowpipe; fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
call=$(python3 -c "import re,sys; m=re.fullmatch(r'(\d+)(ms|s)','$PING'); print(str(int(m[1])*2)+m[2])")
proc="process: {ping_interval: $PING, call_timeout: $call}"

mkdir -p "$work/run"; cd "$work/run"
c1=$(port); c2=$(port); c3=$(port); r1=$(port); r2=$(port); r3=$(port)
servers="[nats://127.0.0.1:$c1, nats://127.0.0.1:$c2, nats://127.0.0.1:$c3]"
i=0
for pair in "$c1 $r1" "$c2 $r2" "$c3 $r3"; do
  i=$((i+1)); set -- $pair
  cat > n$i.conf <<CONF
server_name: n$i
listen: 127.0.0.1:$1
jetstream { store_dir: "$work/run/n$i" }
cluster { name: repro, listen: 127.0.0.1:$2, routes: [nats-route://127.0.0.1:$r1, nats-route://127.0.0.1:$r2, nats-route://127.0.0.1:$r3] }
CONF
  nats-server -c n$i.conf >n$i.log 2>&1 & pids+=($!)
done
listen=127.0.0.1:$(port)
cat > collector.yaml <<YAML
admin: {listen: ""}
sources:
  agents: {type: grpc, listen: "$listen", auth: none, $proc}
sinks:
  log: {type: jetstream, servers: $servers, stream: FLOWS, subject: flows.in, format: packed, create_stream: {replicas: 3}, $proc}
YAML
cat > writer.yaml <<YAML
admin: {listen: ""}
sources:
  log: {type: jetstream, servers: $servers, stream: FLOWS, durable: writers, $proc}
sinks:
  store: {type: file, path: out.jsonl, max_size: 0, in_flight: 2, $proc}
YAML
cat > agent.yaml <<YAML
admin: {listen: ""}
sources:
  gen: {type: generate, count: $N, batch_size: 1000, seed: 1}
sinks:
  collector: {type: grpc, url: "http://$listen"}
YAML
for _ in $(seq 50); do # the cluster elects a meta leader before the stream can be created
  "$BIN" run -c collector.yaml --log-level warn 2>collector.log & cpid=$!
  sleep 1
  if kill -0 $cpid 2>/dev/null; then break; fi
done
pids+=($cpid)
"$BIN" run -c writer.yaml --log-level warn 2>writer.log & pids+=($!)
sleep 1
"$BIN" run -c agent.yaml --log-level warn 2>agent.log & apid=$!; pids+=($apid)
deadline=$((SECONDS + 300))
# Until every event is in the file (lines written twice count once), or 5 minutes.
while [ $SECONDS -lt $deadline ]; do
  if [ "$(cat out.jsonl 2>/dev/null | wc -l)" -ge "$N" ] && [ "$(sort -u out.jsonl | wc -l)" -ge "$N" ]; then break; fi
  sleep 0.2
done
lines=$(cat out.jsonl 2>/dev/null | wc -l); distinct=$(sort -u out.jsonl 2>/dev/null | wc -l)
for t in collector writer; do
  echo "$t: killed as hung $(grep -c 'the plugin is hung' $t.log || true) times, plugin failures $(grep -c 'plugin failed; restarting it' $t.log || true)"
  grep 'plugin failed; restarting it' $t.log | cut -c1-400 | sed 's/^/  /' || true
done
echo "file: $lines lines, $distinct distinct, of $N events"
