#!/usr/bin/env bash
# Whole-pipeline benchmark: runs the real flowpipe binary on generated events and prints
# events/s for each pipeline shape. Usage: scripts/bench-pipeline.sh [EVENTS] (default 5000000)
# BACKLOG=10000000 scripts/bench-pipeline.sh also fills a disk queue with that many events
# (collector unreachable) and measures draining it into a file: events/s and peak RSS.
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
run "generate -> file, zstd fastest (sync)" "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, compression: zstd, compression_level: fastest}"
run "generate -> file, zstd fastest (sync, in_flight 2)" "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, compression: zstd, compression_level: fastest, in_flight: 2}"
run "generate -> file, zstd fastest (sync), default isolation" "{type: file, path: flows.jsonl, max_size: 0, compression: zstd, compression_level: fastest}"
run "generate -> file, zstd fastest (sync, in_flight 2), default isolation" "{type: file, path: flows.jsonl, max_size: 0, compression: zstd, compression_level: fastest, in_flight: 2}"
run "generate -> file, zstd lines, the default (sync, in_flight 2)" "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, compression: zstd, compression_level: lines, in_flight: 2}"
run "generate -> file, zstd lines, the default (sync, in_flight 2), default isolation" "{type: file, path: flows.jsonl, max_size: 0, compression: zstd, compression_level: lines, in_flight: 2}"
run "generate -> file, gzip (sync, in_flight 2)" "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, compression: gzip, in_flight: 2}"
run "generate -> discard, disk queue (sync: batch)" "{type: discard, isolation: inproc, queue: {type: disk, path: q, max_size: 4GiB, sync: batch}}"
run "generate -> file, memory queue"  "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none}"
run "generate -> file, disk queue (sync: batch)" "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none, queue: {type: disk, path: q, max_size: 4GiB, sync: batch}}"
run "generate -> file, disk queue (sync: interval)" "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none, queue: {type: disk, path: q, max_size: 4GiB, sync: interval}}"

# A disk-queue backlog: fill it while the sink cannot deliver, then drain it with a restart.
if [ -n "${BACKLOG:-}" ]; then
  rm -rf "$work/q" "$work"/flows.jsonl*
  cat > "$work/fill.yaml" <<YAML
admin: {listen: "127.0.0.1:9567"}
runtime: {shutdown_timeout: 1s}
sources:
  gen: {type: generate, count: $BACKLOG, batch_size: 4096, isolation: inproc}
sinks:
  out: {type: grpc, isolation: inproc, url: "http://127.0.0.1:1", queue: {type: disk, path: q, max_size: 64GiB, sync: interval}}
YAML
  "$work/flowpipe" run -c "$work/fill.yaml" --log-level error &
  fill=$!
  until curl -s 127.0.0.1:9567/metrics | awk -v n="$BACKLOG" '/^flowpipe_sink_queue_events\{/ { if ($2 >= n) ok=1 } END { exit !ok }'; do sleep 1; done
  kill -TERM $fill; wait $fill || true
  cat > "$work/drain.yaml" <<YAML
admin: {listen: ""}
sources:
  gen: {type: generate, count: 1, isolation: inproc}
sinks:
  out: {type: file, isolation: inproc, path: flows.jsonl, max_size: 0, sync: none, queue: {type: disk, path: q, max_size: 64GiB}}
YAML
  du -sh "$work/q"
  /usr/bin/time -f "drain: %e s, peak RSS %M KiB" "$work/flowpipe" run -c "$work/drain.yaml" --log-level warn
  echo "drained $(wc -l < "$work/flows.jsonl") events"
fi
