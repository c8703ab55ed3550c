#!/usr/bin/env bash
# Install the benchmark's reference tools (outside the repository):
#   fio, bindfs, and libfuse's example/passthrough_hp built from Debian's fuse3 source package.
# Nothing of libfuse is stored in this repository: the source is fetched with
# `apt-get source fuse3` into $TDFS_BENCH_OPT (default /opt/tdfs-bench) and built there.
# Idempotent; run as root. Needs network access to the Debian archive.
set -euo pipefail

OPT="${TDFS_BENCH_OPT:-/opt/tdfs-bench}"
log() { printf '==> %s\n' "$*" >&2; }

[[ "$(id -u)" -eq 0 ]] || { echo "run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

# A deb-src entry for the suite the system already uses (deb822 or one-line format).
have_src() {
  grep -rqsE '^[[:space:]]*(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}
if ! have_src; then
  suite="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
  [[ -n "$suite" ]] || { echo "cannot tell the Debian suite" >&2; exit 1; }
  # The first Debian archive entry in use, and its Signed-By (apt rejects a deb-src entry for
  # the same URI with a different Signed-By as conflicting).
  uri=http://deb.debian.org/debian key=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    read -r u k < <(awk '
      /^URIs:/      { for (i = 2; i <= NF; i++) if ($i ~ /debian\/?$/ && $i !~ /security/) u = $i }
      /^Signed-By:/ { k = $2 }
      /^$/          { if (u != "") exit; k = "" }
      END           { if (u != "") print u, k }' "$f") || true
    if [[ -n "${u:-}" ]]; then uri="$u" key="${k:-}"; break; fi
  done
  f=/etc/apt/sources.list.d/tdfs-bench-src.sources
  log "adding deb-src $uri $suite main ($f)"
  {
    echo "Types: deb-src"
    echo "URIs: $uri"
    echo "Suites: $suite"
    echo "Components: main"
    [[ -n "$key" ]] && echo "Signed-By: $key"
  } >"$f"
  apt-get update -qq
fi

log "installing fio, bindfs, fuse3, libfuse3-dev, g++, pkg-config, dpkg-dev"
apt-get install -y -qq fio bindfs fuse3 libfuse3-dev g++ pkg-config dpkg-dev >/dev/null

bin="$OPT/passthrough_hp"
if [[ -x "$bin" && "${REBUILD:-0}" != 1 ]]; then
  log "passthrough_hp already built: $bin"
  exit 0
fi
mkdir -p "$OPT/src"
cd "$OPT/src"
if ! ls -d fuse3-*/ >/dev/null 2>&1; then
  log "apt-get source fuse3 into $OPT/src"
  apt-get source -qq fuse3 >/dev/null
fi
srcdir="$(ls -d fuse3-*/ | head -n 1)"
cc="$OPT/src/${srcdir%/}/example/passthrough_hp.cc"
[[ -f "$cc" ]] || { echo "no $cc in the source package" >&2; exit 1; }
log "building $bin from $cc"
# libfuse's meson build defines these in config.h; without them passthrough_hp answers
# utimensat/fallocate/xattr calls with EOPNOTSUPP (glibc on Linux has all three).
# shellcheck disable=SC2046
g++ -O2 -std=c++17 -DHAVE_UTIMENSAT -DHAVE_POSIX_FALLOCATE -DHAVE_SETXATTR "$cc" \
  $(pkg-config --cflags --libs fuse3) -lpthread -o "$bin.tmp"
mv "$bin.tmp" "$bin"
log "built $bin"
