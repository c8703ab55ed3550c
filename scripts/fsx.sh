#!/usr/bin/env bash
# Run fsx (the File System eXerciser: random reads, writes, mmap I/O, truncates,
# fallocate/punch-hole, copy_file_range, sendfile, fsync, close/reopen, each read
# checked against a model) on one file through a tdfs mount with a local slave; then
# unmount, wait for the master to drain and exit 0, and check that the replica file is
# byte-identical to the backing file and the whole replica tree equals the backing tree.
#
# Usage: scripts/fsx.sh [--tdfs|--native] [--direct] [--basic] [-N OPS] [-S SEED]
#   --tdfs      through tdfs (default)
#   --native    on a plain temp directory, for reference
#   --direct    hold a write-only open of the file for the whole run, so fsx's read-write
#               opens join its direct I/O mode (see README, Reads) instead of the page cache
#   --basic     fsx's default operation mix only (pread/pwrite/mmap/truncate)
#   -N OPS      number of operations (default 20000, or $FSX_OPS)
#   -S SEED     RNG seed (default 4731, or $FSX_SEED); the run is reproducible per seed
# Needs root and /dev/fuse for --tdfs; fsx (cargo install fsx; installed here if missing).
# Environment: see scripts/lib.sh; also FSX_TIMEOUT (seconds, default 900).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODE=tdfs
BASIC=0
DIRECT=0
OPS="${FSX_OPS:-20000}"
SEED="${FSX_SEED:-4731}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tdfs) MODE=tdfs ;;
    --native) MODE=native ;;
    --basic) BASIC=1 ;;
    --direct) DIRECT=1 ;;
    -N) OPS="$2"; shift ;;
    -S) SEED="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done
FSX_TIMEOUT="${FSX_TIMEOUT:-900}"

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v fsx >/dev/null 2>&1; then
  log "fsx not found; cargo install fsx"
  cargo install --locked fsx || cargo install fsx
fi

tdfs_mkwork fsx
tdfs_install_trap

# Every operation fsx knows on Linux, so each kind of replicated write is exercised.
CONF="$TDFS_WORK/fsx.toml"
cat >"$CONF" <<'EOF'
flen = 262144

[opsize]
max = 65536
min = 0
align = 1

[weights]
close_open = 1
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 2
fsync = 1
fdatasync = 1
posix_fallocate = 2
punch_hole = 2
sendfile = 2
posix_fadvise = 1
copy_file_range = 2
EOF
[[ "$BASIC" == 1 ]] && printf 'flen = 262144\n' >"$CONF"
mkdir -p "$TDFS_WORK/artifacts"

run_fsx() {
  local file="$1" rc=0
  log "fsx -f fsx.toml -N $OPS -S $SEED $file"
  local t0
  t0=$(now_ms)
  timeout --foreground --kill-after=10 "$FSX_TIMEOUT" \
    fsx -f "$CONF" -N "$OPS" -S "$SEED" -P "$TDFS_WORK/artifacts" "$file" \
    >"$TDFS_WORK/fsx.log" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then
    tail -n 40 "$TDFS_WORK/fsx.log" >&2
    ls -l "$TDFS_WORK/artifacts" >&2 || true
    [[ $rc -eq 124 || $rc -eq 137 ]] && die "fsx timed out after ${FSX_TIMEOUT}s"
    die "fsx failed (exit $rc); rerun with: scripts/fsx.sh -N $OPS -S $SEED (KEEP_TMP=1 keeps $TDFS_WORK)"
  fi
  tail -n 1 "$TDFS_WORK/fsx.log"
  log "fsx: $OPS operations OK in $(( $(now_ms) - t0 )) ms"
}

if [[ "$MODE" == native ]]; then
  mkdir -p "$TDFS_WORK/native"
  run_fsx "$TDFS_WORK/native/fsx.file"
  echo "fsx (native): PASS"
  exit 0
fi

require_root
require_fuse
tdfs_bins
tdfs_start_slave "$TDFS_WORK/replica" "$TDFS_WORK/slave-state" "$TDFS_WORK/slave.log"
tdfs_start_master "$TDFS_WORK/backing" "$TDFS_WORK/mnt" "$TDFS_WORK/master-state" \
  "$TDFS_WORK/master.log" "$SLAVE_PORT"
if [[ "$DIRECT" == 1 ]]; then
  # O_WRONLY|O_APPEND|O_CREAT: the first open of the file, write-only, so it is direct I/O.
  exec 9>>"$TDFS_WORK/mnt/fsx.file"
  log "holding a write-only open of fsx.file: fsx's opens join its direct I/O"
fi
run_fsx "$TDFS_WORK/mnt/fsx.file"
[[ "$DIRECT" == 1 ]] && exec 9>&-
proc_alive "$MASTER_PID" || { show_log master "$MASTER_LOG"; die "the master died during fsx"; }
tdfs_unmount_and_drain "$TDFS_WORK/mnt"

STATUS=0
if cmp "$TDFS_WORK/backing/fsx.file" "$TDFS_WORK/replica/fsx.file"; then
  log "replica fsx.file is byte-identical to the backing file ($(stat -c %s "$TDFS_WORK/backing/fsx.file") bytes)"
else
  echo "FAIL: replica fsx.file differs from the backing file" >&2
  STATUS=1
fi
if ! tdfs_treecmp "$TDFS_WORK/backing" "$TDFS_WORK/replica"; then
  echo "FAIL: the replica tree differs from the backing tree" >&2
  STATUS=1
fi
tdfs_stop_slave || warn "slave exited non-zero on SIGTERM"
[[ $STATUS -eq 0 ]] && echo "fsx (tdfs): PASS" || echo "fsx (tdfs): FAIL"
exit "$STATUS"
