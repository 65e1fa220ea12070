#!/usr/bin/env bash
# Regenerates every *.pb.go in the repository from its .proto file, next to it.
# protoc comes from Debian (protobuf-compiler); the Go generators are pinned as Go tools in
# go.mod (go tool protoc-gen-go, go tool protoc-gen-go-grpc), so every machine generates the
# same code. CI runs this and fails when the committed code differs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null || { echo "protoc not found: apt-get install protobuf-compiler" >&2; exit 1; }
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go
go build -o "$bin/protoc-gen-go-grpc" google.golang.org/grpc/cmd/protoc-gen-go-grpc
git ls-files --cached --others --exclude-standard '*.proto' | while read -r f; do
  dir=$(dirname "$f")
  PATH="$bin:$PATH" protoc -I "$dir" \
    --go_out="$dir" --go_opt=paths=source_relative \
    --go-grpc_out="$dir" --go-grpc_opt=paths=source_relative \
    "$f"
done
