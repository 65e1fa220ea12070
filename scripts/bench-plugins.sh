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

once() { # binary name -> "events/s cpu" of one run; cpu: µs of CPU (user + system) per
  # event of flowpipe and its plugin processes together, which the machine's load disturbs
  # far less than the rate
  rm -f "$work/$2.jsonl"
  /usr/bin/time -f "%e %U %S" -o "$work/time" "$1" run -c "$work/$2.yaml" 2>"$work/$2.log" || { cat "$work/$2.log" >&2; exit 1; }
  awk -v n="$n" '{print n / $1, ($2 + $3) * 1e6 / n}' "$work/time"
}

# row label inproc-case process-case: the best of $runs runs of each (highest rate, least
# CPU), the runs of a row interleaved (in process, before, after, in process, ...) so that
# they share the machine's moods; ratios are to the in-process case of the same row.
row() {
  local i="0 1e9" b="0 1e9" a="0 1e9" keep='{split($0, x, " "); print (x[1] > x[3] ? x[1] : x[3]), (x[2] < x[4] ? x[2] : x[4])}'
  for _ in $(seq "$runs"); do
    i=$(echo "$(once "$work/flowpipe" "$2") $i" | awk "$keep")
    if [ -n "${BEFORE:-}" ]; then
      b=$(echo "$(once "$work/before" "$3") $b" | awk "$keep")
    fi
    a=$(echo "$(once "$work/flowpipe" "$3") $a" | awk "$keep")
  done
  if [ -n "${BEFORE:-}" ]; then
    echo "$1|$i $b $a" | awk -F'|' '{split($2, v, " "); printf "%-38s %10.0f %10.0f %5.2f %10.0f %5.2f | %5.2f %5.2f %5.2f\n", $1, v[1], v[3], v[3]/v[1], v[5], v[5]/v[1], v[2], v[4], v[6]}'
  else
    echo "$1|$i $a" | awk -F'|' '{split($2, v, " "); printf "%-38s %10.0f %10.0f %5.2f | %5.2f %5.2f\n", $1, v[1], v[3], v[3]/v[1], v[2], v[4]}'
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
  printf "%-38s %10s %10s %5s %10s %5s | %s\n" "events/s; µs CPU/event" "in proc" "before" "ratio" "after" "ratio" "CPU in, before, after"
else
  printf "%-38s %10s %10s %5s | %s\n" "events/s; µs CPU/event" "in proc" "out" "ratio" "CPU in, out"
fi
row "generate -> discard, sink out" sink-inproc sink-process
row "the same, sink in_flight 4" sink-inproc sink-process-4
row "generate -> community_id, enricher out" enrich-inproc enrich-process
row "generate -> file, default isolation" file-inproc file-default
