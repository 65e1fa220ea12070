#!/usr/bin/env bash
# Measures a whole pipeline with the sink, then an enricher, in process and out of process,
# then generate -> file with the default isolation (source and sink both plugin processes)
# against the same pipeline in process (docs/benchmarks.md, plugins section). Each case runs `flowpipe run` on N generated events
# (source in process, as fast as the pipeline takes them) RUNS times; the best run counts,
# since the machine is shared. Process start-up is included in the time.
#   usage: scripts/bench-plugins.sh [N] [RUNS]
# FLOWPIPE=path/to/flowpipe measures that binary instead of building this tree;
# BEFORE=path/to/flowpipe measures that one too, out of process, interleaved with this one
# (a before and an after in one run).
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

once() { # binary name -> events/s of one run
  local t0 t1
  rm -f "$work/$2.jsonl"
  t0=$(date +%s.%N)
  "$1" run -c "$work/$2.yaml" 2>"$work/$2.log" || { cat "$work/$2.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  echo "$t0 $t1" | awk -v n="$n" '{print n / ($2 - $1)}'
}

# row label inproc-case process-case: the best of $runs runs of each, the runs of a row
# interleaved (in process, before, after, in process, ...) so that they share the machine's
# moods; ratios are to the in-process case of the same row.
row() {
  local bi=0 bb=0 ba=0 r
  for _ in $(seq "$runs"); do
    r=$(once "$work/flowpipe" "$2"); bi=$(echo "$r $bi" | awk '{print ($1 > $2 ? $1 : $2)}')
    if [ -n "${BEFORE:-}" ]; then
      r=$(once "$work/before" "$3"); bb=$(echo "$r $bb" | awk '{print ($1 > $2 ? $1 : $2)}')
    fi
    r=$(once "$work/flowpipe" "$3"); ba=$(echo "$r $ba" | awk '{print ($1 > $2 ? $1 : $2)}')
  done
  if [ -n "${BEFORE:-}" ]; then
    printf "%-36s %12.0f %12.0f %6.2f %12.0f %6.2f\n" "$1" "$bi" "$bb" "$(echo "$bb $bi" | awk '{print $1/$2}')" "$ba" "$(echo "$ba $bi" | awk '{print $1/$2}')"
  else
    printf "%-36s %12.0f %12.0f %6.2f\n" "$1" "$bi" "$ba" "$(echo "$ba $bi" | awk '{print $1/$2}')"
  fi
}

pipeline sink-inproc - inproc
pipeline sink-process - process
pipeline sink-process-4 - process 4
pipeline enrich-inproc inproc inproc
pipeline enrich-process process inproc
filepipeline file-inproc inproc
filepipeline file-default ""

if [ -n "${BEFORE:-}" ]; then
  cp "$BEFORE" "$work/before"
  printf "%-36s %12s %12s %6s %12s %6s\n" "case (events/s)" "in process" "before" "ratio" "out" "ratio"
else
  printf "%-36s %12s %12s %6s\n" "case (events/s)" "in process" "out" "ratio"
fi
row "generate -> discard, sink out" sink-inproc sink-process
row "the same, sink in_flight 4" sink-inproc sink-process-4
row "generate -> community_id, enricher out" enrich-inproc enrich-process
row "generate -> file, default isolation" file-inproc file-default
