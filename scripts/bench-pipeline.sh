#!/usr/bin/env bash
# Whole-pipeline benchmark: runs the real flowpipe binary on generated events and prints
# events/s for each pipeline shape. Usage: scripts/bench-pipeline.sh [EVENTS] (default 5000000)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
go build -o "$work/flowpipe" ./cmd/flowpipe

run() { # name, sink yaml
  local name=$1 sink=$2
  cat > "$work/p.yaml" <<YAML
admin: {listen: ""}
sources:
  gen: {type: generate, count: $N, batch_size: 4096, isolation: inproc}
sinks:
  out: $sink
YAML
  rm -rf "$work"/flows.jsonl* "$work"/q
  local t0 t1
  t0=$(date +%s.%N)
  "$work/flowpipe" run -c "$work/p.yaml" --log-level warn
  t1=$(date +%s.%N)
  awk -v n="$N" -v a="$t0" -v b="$t1" -v name="$name" \
    'BEGIN { printf "%-34s %10d events in %6.2fs = %10.0f events/s\n", name, n, b-a, n/(b-a) }'
}

run "generate -> discard"              "{type: discard, isolation: inproc}"
run "generate -> file (sync: batch)"   "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0}"
run "generate -> file (sync, in_flight 2)" "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, in_flight: 2}"
run "generate -> file (sync: none)"    "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none}"
run "generate -> file, memory queue"  "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none}"
run "generate -> file, disk queue (sync: batch)" "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none, queue: {type: disk, path: q, max_size: 4GiB, sync: batch}}"
run "generate -> file, disk queue (sync: interval)" "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none, queue: {type: disk, path: q, max_size: 4GiB, sync: interval}}"
