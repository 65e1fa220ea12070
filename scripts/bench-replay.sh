#!/usr/bin/env bash
# The userspace source replaying a pcap, beside softflowd (Debian's softflowd) on the same file.
# Makes a capture with sources/userspace/internal/pcapgen (606,000 connections in 684,000
# packets: single UDP datagrams and full TCP connections), then for each of RUNS rounds times:
#   softflowd -r (every flow tracked, -m 1000000; NetFlow v9 to a UDP port on loopback),
#   flowpipe: userspace (pcap) -> discard, -> file, -> file zstd (compression_level fastest,
#   then lines, the default), -> file gzip (fsync per batch; both components in process, and zstd also
#   with the default isolation).
# Wall time and user+sys CPU of the whole process (its plugin processes included) per run.
# Usage: scripts/bench-replay.sh [RUNS] (default 3). BEFORE=/path/to/an/older/flowpipe also
# runs that binary's -> file zstd lines (in process and with the default isolation) in each round, to compare the two in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
work=$(mktemp -d)
listener=
cleanup() { [ -n "$listener" ] && kill "$listener" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
command -v softflowd >/dev/null || { echo "softflowd is not installed (apt-get install softflowd)" >&2; exit 1; }
go build -o "$work/flowpipe" ./cmd/flowpipe
go build -o "$work/pcapgen" ./sources/userspace/internal/pcapgen
"$work/pcapgen" -o "$work/bench.pcap"

# A UDP sink for softflowd's NetFlow datagrams (softflowd's sends fail without one).
python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("127.0.0.1", 9995))
while True:
    s.recv(65535)
' &
listener=$!

timed() { # name, command...: prints wall and CPU seconds
  local name=$1; shift
  /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" > "$work/out" 2>&1 || { cat "$work/out" >&2; exit 1; }
  read -r wall user sys < "$work/time"
  awk -v n="$name" -v w="$wall" -v u="$user" -v s="$sys" 'BEGIN { printf "%-44s %6.2f s wall %6.2f s CPU\n", n, w, u+s }'
}

pipeline() { # sink yaml, isolation of the source
  cat > "$work/p.yaml" <<YAML
admin: {listen: ""}
sources:
  pcap: {type: userspace, pcap: bench.pcap, progress: "off", max_entries: 1048576, isolation: $2}
sinks:
  out: $1
YAML
  rm -f "$work"/flows*
}

for r in $(seq "$RUNS"); do
  echo "round $r"
  timed "softflowd -r (NetFlow v9 to loopback)" softflowd -r "$work/bench.pcap" -n 127.0.0.1:9995 -v 9 -d -m 1000000 -c none -p "$work/sf.pid"
  pipeline "{type: discard, isolation: inproc}" inproc
  timed "flowpipe userspace -> discard" "$work/flowpipe" run -c "$work/p.yaml" --log-level warn
  pipeline "{type: file, isolation: inproc, path: flows.jsonl, max_size: 0}" inproc
  timed "flowpipe userspace -> file" "$work/flowpipe" run -c "$work/p.yaml" --log-level warn
  lines=$(wc -l < "$work/flows.jsonl"); size=$(stat -c %s "$work/flows.jsonl")
  pipeline "{type: file, isolation: inproc, path: flows.zst, max_size: 0, compression: zstd, compression_level: fastest}" inproc
  timed "flowpipe userspace -> file, zstd fastest" "$work/flowpipe" run -c "$work/p.yaml" --log-level warn
  zlines=$(zstdcat "$work/flows.zst" | wc -l); zsize=$(stat -c %s "$work/flows.zst")
  if [ -n "${BEFORE:-}" ]; then
    pipeline "{type: file, isolation: inproc, path: flows.zst, max_size: 0, compression: zstd, compression_level: lines}" inproc
    timed "BEFORE userspace -> file, zstd lines" "$BEFORE" run -c "$work/p.yaml" --log-level warn
    pipeline "{type: file, path: flows.zst, max_size: 0, compression: zstd, compression_level: lines}" process
    timed "BEFORE userspace -> file, zstd lines (default isolation)" "$BEFORE" run -c "$work/p.yaml" --log-level warn
  fi
  pipeline "{type: file, isolation: inproc, path: flows.zst, max_size: 0, compression: zstd, compression_level: lines}" inproc
  timed "flowpipe userspace -> file, zstd lines" "$work/flowpipe" run -c "$work/p.yaml" --log-level warn
  llines=$(zstdcat "$work/flows.zst" | wc -l); lsize=$(stat -c %s "$work/flows.zst")
  pipeline "{type: file, isolation: inproc, path: flows.gz, max_size: 0, compression: gzip}" inproc
  timed "flowpipe userspace -> file, gzip" "$work/flowpipe" run -c "$work/p.yaml" --log-level warn
  pipeline "{type: file, path: flows.zst, max_size: 0, compression: zstd, compression_level: fastest}" process
  timed "flowpipe userspace -> file, zstd fastest (default isolation)" "$work/flowpipe" run -c "$work/p.yaml" --log-level warn
  pipeline "{type: file, path: flows.zst, max_size: 0, compression: zstd, compression_level: lines}" process
  timed "flowpipe userspace -> file, zstd lines (default isolation)" "$work/flowpipe" run -c "$work/p.yaml" --log-level warn
  echo "  (file: $lines lines, $size bytes; zstd: $zlines lines, $zsize bytes; zstd lines: $llines lines, $lsize bytes)"
done
