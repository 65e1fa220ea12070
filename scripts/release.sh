#!/usr/bin/env bash
# Builds a flowpipe release into dist/: static binaries (CGO_ENABLED=0) for linux/amd64 and
# linux/arm64 with the version, commit and date stamped in (`flowpipe version` prints them),
# a Debian package for each, and SHA256SUMS over all of them.
#
#   scripts/release.sh            # version from the tag on HEAD, else devel+<commit>
#   VERSION=v1.2.3 scripts/release.sh
#
# Check the result: cd dist && sha256sum -c SHA256SUMS
set -euo pipefail
cd "$(dirname "$0")/.."

commit="$(git rev-parse HEAD)"
if [ -z "${VERSION:-}" ]; then
	VERSION="$(git describe --tags --exact-match --match 'v*' 2>/dev/null || echo "devel+${commit:0:12}")"
	if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
		VERSION="$VERSION+dirty"
	fi
fi
# The commit's time, so that a rebuild of the same commit stamps the same date.
date="$(TZ=UTC git show -s --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ HEAD)"
ldflags="-s -w -X main.version=$VERSION -X main.commit=$commit -X main.date=$date"

rm -rf dist
mkdir -p dist
for arch in amd64 arm64; do
	bin="dist/flowpipe-linux-$arch"
	echo "== $bin ($VERSION)" >&2
	CGO_ENABLED=0 GOOS=linux GOARCH="$arch" go build -trimpath -buildvcs=false -ldflags "$ldflags" -o "$bin" ./cmd/flowpipe
	scripts/package.sh "$bin" "$arch" "$VERSION" dist >/dev/null
done
(cd dist && sha256sum flowpipe-linux-* *.deb >SHA256SUMS)
echo "== dist/" >&2
ls -l dist >&2
cat dist/SHA256SUMS
