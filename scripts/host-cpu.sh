#!/usr/bin/env bash
# Measures the CPU of the flowpipe process alone (not its plugin processes) per event, for
# generate -> file with the default isolation (source and sink both plugin processes), the
# host's share of what scripts/bench-plugins.sh reports for all processes together. Each
# binary runs N events RUNS times, interleaved; every run is printed (µs of user + system
# CPU per event, from /proc/<pid>/stat, sampled every 10 ms until the process exits).
# QUEUE=disk puts the file sink behind a disk queue (queue: {type: disk}, in a fresh data_dir
# for every run); SOURCE_ISOLATION=inproc runs the source in the flowpipe process.
#   usage: [QUEUE=disk] [SOURCE_ISOLATION=inproc] scripts/host-cpu.sh [N] [RUNS] BINARY...
set -euo pipefail
n=${1:-2000000}
runs=${2:-3}
shift 2 || true
[ $# -gt 0 ] || { echo "usage: $0 N RUNS BINARY..." >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
queue=""
[ "${QUEUE:-}" = disk ] && queue=", queue: {type: disk}"
srciso=""
[ -n "${SOURCE_ISOLATION:-}" ] && srciso=", isolation: $SOURCE_ISOLATION"
cat > "$work/p.yaml" <<YAML
admin: {listen: ""}
data_dir: $work/data
sources:
  gen: {type: generate, count: $n, batch_size: 1024, seed: 1$srciso}
sinks:
  out: {type: file, path: $work/out.jsonl, max_size: 0$queue}
YAML
hz=$(getconf CLK_TCK)
for _ in $(seq "$runs"); do
  for bin in "$@"; do
    rm -rf "$work/out.jsonl" "$work/data"
    "$bin" run -c "$work/p.yaml" 2>"$work/log" & pid=$!
    ticks=0
    while [ -r "/proc/$pid/stat" ]; do # sampled every 10 ms; the last sample counts
      t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || true)
      [ -n "$t" ] && ticks=$t
      sleep 0.01
    done
    wait "$pid" || { cat "$work/log" >&2; exit 1; }
    lines=$(wc -l < "$work/out.jsonl")
    [ "$lines" -eq "$n" ] || { echo "$bin wrote $lines events, want $n" >&2; exit 1; }
    awk -v t="$ticks" -v hz="$hz" -v n="$n" -v b="$bin" 'BEGIN {printf "%-40s %.2f µs host CPU/event\n", b, t / hz * 1e6 / n}'
  done
done
