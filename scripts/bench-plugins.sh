#!/usr/bin/env bash
# Measures a whole pipeline with the sink, then an enricher, in process and out of process,
# then generate -> file with the default isolation (source and sink both plugin processes)
# against the same pipeline in process (docs/benchmarks.md, plugins section). Each case runs `flowpipe run` on N generated events
# (source in process, as fast as the pipeline takes them) RUNS times; the best run counts,
# since the machine is shared. Process start-up is included in the time.
#   usage: scripts/bench-plugins.sh [N] [RUNS]
# FLOWPIPE=path/to/flowpipe measures that binary instead of building this tree (a before and
# an after in one session).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000000}
runs=${2:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "${FLOWPIPE:-}" ]; then
  cp "$FLOWPIPE" "$work/flowpipe"
else
  go build -o "$work/flowpipe" ./cmd/flowpipe
fi

pipeline() { # name enricher-isolation sink-isolation [in_flight]
  local enrich=""
  if [ "$2" != "-" ]; then
    enrich="enrichers:
  - {type: community_id, isolation: $2}"
  fi
  cat > "$work/$1.yaml" <<YAML
admin: {listen: ""}
sources:
  gen: {type: generate, isolation: inproc, count: $n, batch_size: 1024, seed: 1}
$enrich
sinks:
  out: {type: discard, isolation: $3, in_flight: ${4:-1}}
YAML
}

filepipeline() { # name isolation ("" for the default)
  local iso=""
  [ -n "$2" ] && iso="isolation: $2, "
  cat > "$work/$1.yaml" <<YAML
admin: {listen: ""}
sources:
  gen: {type: generate, ${iso}count: $n, batch_size: 1024, seed: 1}
sinks:
  out: {type: file, ${iso}path: $work/$1.jsonl, max_size: 0}
YAML
}

best() { # name -> events/s of the fastest of $runs runs
  local best=""
  for _ in $(seq "$runs"); do
    local t0 t1
    t0=$(date +%s.%N)
    rm -f "$work/$1.jsonl"
    "$work/flowpipe" run -c "$work/$1.yaml" 2>"$work/$1.log" || { cat "$work/$1.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    best=$(echo "$t0 $t1 ${best:-0}" | awk -v n="$n" '{r = n / ($2 - $1); print (r > $3 ? r : $3)}')
  done
  echo "$best"
}

pipeline sink-inproc - inproc
pipeline sink-process - process
pipeline sink-process-4 - process 4
pipeline enrich-inproc inproc inproc
pipeline enrich-process process inproc
filepipeline file-inproc inproc
filepipeline file-default ""

printf "%-34s %14s %8s\n" "case" "events/s" "ratio"
si=$(best sink-inproc);     printf "%-34s %14.0f %8s\n" "sink in process" "$si" "1"
sp=$(best sink-process);    printf "%-34s %14.0f %8.2f\n" "sink out of process" "$sp" "$(echo "$sp $si" | awk '{print $1/$2}')"
sp4=$(best sink-process-4); printf "%-34s %14.0f %8.2f\n" "sink out of process, in_flight 4" "$sp4" "$(echo "$sp4 $si" | awk '{print $1/$2}')"
ei=$(best enrich-inproc);   printf "%-34s %14.0f %8s\n" "enricher in process" "$ei" "1"
ep=$(best enrich-process);  printf "%-34s %14.0f %8.2f\n" "enricher out of process" "$ep" "$(echo "$ep $ei" | awk '{print $1/$2}')"
fi=$(best file-inproc);      printf "%-34s %14.0f %8s\n" "generate -> file in process" "$fi" "1"
fd=$(best file-default);     printf "%-34s %14.0f %8.2f\n" "generate -> file default isolation" "$fd" "$(echo "$fd $fi" | awk '{print $1/$2}')"
