# shellcheck shell=bash
# Shared helpers for the tdfs scripts: building, starting a local slave and a master,
# waiting for the mount, unmounting/draining, comparing trees, and cleaning up.
#
# Source it from a script that runs with `set -euo pipefail`. The caller must call
# `tdfs_cleanup` from its EXIT trap (tdfs_install_trap does that for it).
#
# Environment knobs (all optional):
#   TDFS_PROFILE      debug (default) or release: which build to use
#   TDFS_BIN_DIR      directory holding tdfs and tdfs-slave (skips building)
#   TDFS_NO_BUILD=1   do not run cargo build (use whatever binaries exist)
#   TDFS_MASTER_ARGS  extra arguments for the master (e.g. "-z 1")
#   TDFS_SLAVE_ARGS   extra arguments for the slave
#   TDFS_TIMEOUT      seconds to wait for start-up and mount (default 30)
#   TDFS_DRAIN_TIMEOUT seconds to wait for the master to drain and exit (default 120)
#   KEEP_TMP=1        keep the temporary directory (logs, trees) after the run

TDFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TDFS_SCRIPTS="$TDFS_ROOT/scripts"
TDFS_PROFILE="${TDFS_PROFILE:-debug}"
TDFS_TIMEOUT="${TDFS_TIMEOUT:-30}"
TDFS_DRAIN_TIMEOUT="${TDFS_DRAIN_TIMEOUT:-120}"

# State filled in by the helpers below and used by tdfs_cleanup.
TDFS_WORK=""        # temp dir removed on exit
TDFS_MNT=""         # mountpoint currently (possibly) mounted
MASTER_PID=""
MASTER_LOG=""
MASTER_RC=""
SLAVE_PID=""
SLAVE_LOG=""
SLAVE_PORT=""

log()  { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die()  { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

now_ms() { date +%s%3N; }

# show_log NAME FILE: print the tail of a daemon log, indented.
show_log() {
  local name="$1" file="$2"
  [[ -n "$file" && -s "$file" ]] || return 0
  printf -- '---- last lines of %s log (%s) ----\n' "$name" "$file" >&2
  tail -n 40 "$file" | sed 's/^/    /' >&2
  printf -- '---- end of %s log ----\n' "$name" >&2
}

require_root() {
  [[ "$(id -u)" -eq 0 ]] || die "$(basename "$0") must run as root (FUSE mount with allow_other, chown to other users)"
}

require_fuse() {
  [[ -c /dev/fuse ]] || die "/dev/fuse is missing"
  command -v fusermount3 >/dev/null 2>&1 || command -v fusermount >/dev/null 2>&1 ||
    warn "fusermount3 not found (apt-get install fuse3); unmounting will use umount"
}

# Make a fresh temp dir for this run: sets TDFS_WORK.
tdfs_mkwork() {
  local tag="$1"
  TDFS_WORK="$(mktemp -d "${TMPDIR:-/tmp}/tdfs-$tag.XXXXXX")"
  chmod 0755 "$TDFS_WORK"
}

# Locate (and unless told otherwise, build) the binaries: sets TDFS_BIN and TDFS_SLAVE_BIN.
# The etcd client crate (tdfs node) generates its gRPC code with protoc when it is built.
need_protoc() {
  command -v protoc >/dev/null 2>&1 && [[ -e /usr/include/google/protobuf/timestamp.proto ]] &&
    return 0
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing protobuf-compiler and libprotobuf-dev (protoc, needed to build tdfs)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q protobuf-compiler libprotobuf-dev \
      >/dev/null || { apt-get update -q >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q protobuf-compiler libprotobuf-dev \
        >/dev/null; } || die "could not install protobuf-compiler and libprotobuf-dev"
  else
    die "building tdfs needs protoc: apt-get install protobuf-compiler libprotobuf-dev"
  fi
}

tdfs_bins() {
  local dir
  if [[ -n "${TDFS_BIN_DIR:-}" ]]; then
    dir="$TDFS_BIN_DIR"
  else
    local target="${CARGO_TARGET_DIR:-$TDFS_ROOT/target}"
    dir="$target/$TDFS_PROFILE"
    if [[ "${TDFS_NO_BUILD:-0}" != 1 ]]; then
      local flags=()
      [[ "$TDFS_PROFILE" == release ]] && flags+=(--release)
      need_protoc
      log "building tdfs and tdfs-slave ($TDFS_PROFILE; a no-op when up to date)"
      (cd "$TDFS_ROOT" && cargo build --quiet "${flags[@]}" -p tdfs -p tdfs-slave) ||
        die "cargo build failed"
    fi
  fi
  TDFS_BIN="$dir/tdfs"
  TDFS_SLAVE_BIN="$dir/tdfs-slave"
  [[ -x "$TDFS_BIN" ]] || die "master binary not found: $TDFS_BIN"
  [[ -x "$TDFS_SLAVE_BIN" ]] || die "slave binary not found: $TDFS_SLAVE_BIN"
}

proc_alive() {
  local pid="$1" state
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # A zombie is not alive.
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
  [[ "$state" != Z ]]
}

# is_mounted DIR: true if DIR is a mountpoint in /proc/mounts (never touches the mount
# itself, so it cannot hang on a dead FUSE server).
is_mounted() {
  local dir="$1"
  awk -v d="$dir" '$2 == d { found = 1 } END { exit !found }' /proc/mounts
}

# tdfs_start_slave MIRROR STATE_DIR LOG: start a slave on 127.0.0.1 with an ephemeral
# port; sets SLAVE_PID and SLAVE_PORT once it logged "listening on IP:PORT".
tdfs_start_slave() {
  local mirror="$1" state="$2" logf="$3"
  mkdir -p "$mirror"
  SLAVE_LOG="$logf"
  local extra=()
  # shellcheck disable=SC2206
  [[ -n "${TDFS_SLAVE_ARGS:-}" ]] && extra=($TDFS_SLAVE_ARGS)
  log "starting slave: tdfs-slave -m $mirror -l 127.0.0.1:0 --state-dir $state ${extra[*]}"
  "$TDFS_SLAVE_BIN" -m "$mirror" -l 127.0.0.1:0 --state-dir "$state" "${extra[@]}" \
    </dev/null >>"$logf" 2>&1 &
  SLAVE_PID=$!
  local deadline=$(( $(now_ms) + TDFS_TIMEOUT * 1000 )) line
  while :; do
    line="$(sed -n 's/.*listening on \(.*\)$/\1/p' "$logf" | head -n 1)"
    if [[ -n "$line" ]]; then
      # strip ANSI colour codes, then take the port after the last ':'
      line="$(printf '%s' "$line" | sed 's/\x1b\[[0-9;]*m//g' | awk '{print $1}')"
      SLAVE_PORT="${line##*:}"
      [[ "$SLAVE_PORT" =~ ^[0-9]+$ ]] || die "cannot parse slave address from '$line'"
      log "slave pid $SLAVE_PID is listening on 127.0.0.1:$SLAVE_PORT"
      return 0
    fi
    if ! proc_alive "$SLAVE_PID"; then
      show_log slave "$logf"
      die "slave exited before listening"
    fi
    if (( $(now_ms) > deadline )); then
      show_log slave "$logf"
      die "slave did not report 'listening on' within ${TDFS_TIMEOUT}s"
    fi
    sleep 0.05
  done
}

# tdfs_start_master BACKING MOUNTPOINT STATE_DIR LOG PORT: start the master against the
# local slave and wait (with a deadline) until MOUNTPOINT shows up in /proc/mounts.
tdfs_start_master() {
  local backing="$1" mnt="$2" state="$3" logf="$4" port="$5"
  mkdir -p "$backing" "$mnt"
  MASTER_LOG="$logf"
  local extra=()
  # shellcheck disable=SC2206
  [[ -n "${TDFS_MASTER_ARGS:-}" ]] && extra=($TDFS_MASTER_ARGS)
  log "starting master: tdfs -m $backing -c 127.0.0.1:$port --state-dir $state ${extra[*]} $mnt"
  TDFS_MNT="$mnt"
  "$TDFS_BIN" -m "$backing" -c "127.0.0.1:$port" --state-dir "$state" "${extra[@]}" "$mnt" \
    </dev/null >>"$logf" 2>&1 &
  MASTER_PID=$!
  local deadline=$(( $(now_ms) + TDFS_TIMEOUT * 1000 ))
  while ! is_mounted "$mnt"; do
    if ! proc_alive "$MASTER_PID"; then
      show_log master "$logf"
      die "master exited before mounting $mnt"
    fi
    if (( $(now_ms) > deadline )); then
      show_log master "$logf"
      die "$mnt did not appear in /proc/mounts within ${TDFS_TIMEOUT}s"
    fi
    sleep 0.05
  done
  log "master pid $MASTER_PID mounted $mnt"
}

# fuse_abort DIR: abort the FUSE connection behind DIR (for a hung server).
fuse_abort() {
  local dir="$1" minor
  minor="$(awk -v d="$dir" '$5 == d { split($3, a, ":"); print a[2]; exit }' /proc/self/mountinfo)"
  if [[ -n "$minor" && -e "/sys/fs/fuse/connections/$minor/abort" ]]; then
    warn "aborting FUSE connection $minor for $dir"
    echo 1 >"/sys/fs/fuse/connections/$minor/abort" 2>/dev/null || true
  fi
}

# do_unmount DIR: ordinary unmount; returns non-zero if it did not work.
do_unmount() {
  local dir="$1"
  if command -v fusermount3 >/dev/null 2>&1; then
    timeout 30 fusermount3 -u "$dir" 2>/dev/null && return 0
  fi
  timeout 30 umount "$dir" 2>/dev/null
}

# wait_master_exit SECONDS: wait for the master to exit; sets MASTER_RC. Returns 1 on
# timeout (the master is left running).
wait_master_exit() {
  local secs="$1"
  local deadline=$(( $(now_ms) + secs * 1000 ))
  while proc_alive "$MASTER_PID"; do
    (( $(now_ms) > deadline )) && return 1
    sleep 0.05
  done
  MASTER_RC=0
  wait "$MASTER_PID" || MASTER_RC=$?
  MASTER_PID=""
  return 0
}

# tdfs_unmount_and_drain MOUNTPOINT: unmount, then wait for the master to drain (all
# slaves acked) and exit. Fails unless it exits 0.
tdfs_unmount_and_drain() {
  local mnt="$1"
  log "unmounting $mnt (the master drains its queue to the slave, then exits)"
  local t0
  t0=$(now_ms)
  if ! do_unmount "$mnt"; then
    show_log master "$MASTER_LOG"
    die "could not unmount $mnt"
  fi
  TDFS_MNT=""
  if ! wait_master_exit "$TDFS_DRAIN_TIMEOUT"; then
    show_log master "$MASTER_LOG"
    show_log slave "$SLAVE_LOG"
    die "master did not exit within ${TDFS_DRAIN_TIMEOUT}s after unmount"
  fi
  if [[ "$MASTER_RC" -ne 0 ]]; then
    show_log master "$MASTER_LOG"
    show_log slave "$SLAVE_LOG"
    die "master exited with status $MASTER_RC after unmount (expected 0)"
  fi
  log "master drained and exited 0 in $(( $(now_ms) - t0 )) ms"
}

# tdfs_stop_slave: SIGTERM the slave and wait for it (deadline, then SIGKILL).
tdfs_stop_slave() {
  [[ -n "$SLAVE_PID" ]] || return 0
  if proc_alive "$SLAVE_PID"; then
    kill -TERM "$SLAVE_PID" 2>/dev/null || true
    local deadline=$(( $(now_ms) + 20000 ))
    while proc_alive "$SLAVE_PID" && (( $(now_ms) < deadline )); do sleep 0.05; done
    if proc_alive "$SLAVE_PID"; then
      warn "slave $SLAVE_PID ignored SIGTERM; killing it"
      kill -KILL "$SLAVE_PID" 2>/dev/null || true
    fi
  fi
  local rc=0
  wait "$SLAVE_PID" 2>/dev/null || rc=$?
  SLAVE_PID=""
  return "$rc"
}

# tdfs_treecmp REFERENCE REPLICA [treecmp.py options]
tdfs_treecmp() {
  local ref="$1" rep="$2"
  shift 2
  log "comparing $ref (backing) with $rep (replica)"
  python3 "$TDFS_SCRIPTS/treecmp.py" "$@" "$ref" "$rep"
}

# tdfs_cleanup: idempotent; unmounts, stops daemons, removes the temp dir. Call from the
# EXIT trap.
tdfs_cleanup() {
  local rc=$?
  set +e
  if [[ -n "$TDFS_MNT" ]] && is_mounted "$TDFS_MNT"; then
    log "cleanup: unmounting $TDFS_MNT"
    if ! do_unmount "$TDFS_MNT"; then
      fuse_abort "$TDFS_MNT"
      umount -l "$TDFS_MNT" 2>/dev/null || fusermount3 -uz "$TDFS_MNT" 2>/dev/null
    fi
  fi
  TDFS_MNT=""
  if [[ -n "$MASTER_PID" ]]; then
    if ! wait_master_exit 15; then
      warn "cleanup: master $MASTER_PID still running; sending SIGTERM"
      kill -TERM "$MASTER_PID" 2>/dev/null
      if ! wait_master_exit 10; then
        warn "cleanup: killing master $MASTER_PID"
        kill -KILL "$MASTER_PID" 2>/dev/null
        wait "$MASTER_PID" 2>/dev/null
      fi
    fi
    MASTER_PID=""
  fi
  tdfs_stop_slave
  if [[ -n "$TDFS_WORK" && -d "$TDFS_WORK" ]]; then
    if [[ "${KEEP_TMP:-0}" == 1 || ( $rc -ne 0 && "${KEEP_TMP_ON_FAILURE:-0}" == 1 ) ]]; then
      log "keeping $TDFS_WORK"
    else
      # never descend into a mountpoint that is still (lazily) there
      if grep -q " $TDFS_WORK/" /proc/mounts; then
        warn "cleanup: something is still mounted under $TDFS_WORK; not removing it"
      else
        rm -rf "$TDFS_WORK"
      fi
    fi
  fi
  return "$rc"
}

tdfs_install_trap() {
  trap 'tdfs_cleanup' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}
