#!/usr/bin/env bash
# Builds the flowpipe Debian package with nfpm (version pinned in scripts/nfpm/go.mod) from
# a flowpipe binary: packaging/nfpm.yaml lists what goes in.
#
#   scripts/package.sh BINARY GOARCH VERSION OUTDIR
#   scripts/package.sh dist/flowpipe-linux-amd64 amd64 v1.2.3 dist
#
# VERSION is what `flowpipe version` prints (v1.2.3 or devel+<commit>); the package version
# drops the v, and a devel build becomes 0~devel+<commit> (sorts before any release).
set -euo pipefail
if [ $# -ne 4 ]; then
	echo "usage: $0 BINARY GOARCH VERSION OUTDIR" >&2
	exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
binary="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
arch="$2" version="$3" out="$4"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

debversion="${version#v}"
case "$debversion" in
	[0-9]*) ;;
	*) debversion="0~$debversion" ;;
esac

nfpm="$out/.nfpm"
(cd "$root/scripts/nfpm" && go build -o "$nfpm" github.com/goreleaser/nfpm/v2/cmd/nfpm)

cd "$root"
deb="$out/flowpipe_${debversion}_${arch}.deb"
# nfpm expands the environment in some fields only: substitute here, in every field.
config="$out/.nfpm.yaml"
sed -e "s#\${FLOWPIPE_ARCH}#$arch#g" -e "s#\${FLOWPIPE_DEB_VERSION}#$debversion#g" \
	-e "s#\${FLOWPIPE_BINARY}#$binary#g" packaging/nfpm.yaml >"$config"
"$nfpm" package --config "$config" --packager deb --target "$deb" >&2
rm -f "$nfpm" "$config"
echo "$deb"
