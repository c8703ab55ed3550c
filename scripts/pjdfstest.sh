#!/usr/bin/env bash
# Run the pjdfstest POSIX conformance suite natively (baseline) and through a tdfs mount
# with a local slave, and fail if any case that passes natively fails through tdfs.
#
# Usage: scripts/pjdfstest.sh [--native|--tdfs|--both] [--all-features] [-- PATTERN...]
#   --native        only the baseline run on a plain directory
#   --tdfs          only the run through tdfs (then every FAILED case is a failure)
#   --both          both, and compare them (the default)
#   --all-features  also enable utimensat, utime_now and rename_ctime (more cases run;
#                   the default enables posix_fallocate only)
#   PATTERN...      pjdfstest test-name filters (e.g. chmod rename::)
#
# After the tdfs run it unmounts, waits for the master to drain and exit 0, and checks
# that the slave's replica equals the backing directory (treecmp).
# Needs root, /dev/fuse, pjdfstest (cargo install pjdfstest; installed here if missing)
# and the users/groups nobody:nogroup and tests:tests (created here if missing).
# Environment: see scripts/lib.sh; also PJDFSTEST_TIMEOUT (seconds per run, default 900),
# PJDFSTEST_NAPTIME (default 0.02), PJDFSTEST_RESULTS=DIR (copy the config, logs and
# per-case results "NAME STATUS" there).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODE=both
ALL_FEATURES=0
PATTERNS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --native) MODE=native ;;
    --tdfs) MODE=tdfs ;;
    --both) MODE=both ;;
    --all-features) ALL_FEATURES=1 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; PATTERNS=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done
PJDFSTEST_TIMEOUT="${PJDFSTEST_TIMEOUT:-900}"
PJDFSTEST_NAPTIME="${PJDFSTEST_NAPTIME:-0.02}"

require_root
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v pjdfstest >/dev/null 2>&1; then
  log "pjdfstest not found; cargo install pjdfstest"
  cargo install --locked pjdfstest || cargo install pjdfstest
fi
getent group nogroup >/dev/null || groupadd -g 65534 nogroup
getent group tests >/dev/null || groupadd tests
id -u tests >/dev/null 2>&1 ||
  useradd -g tests -M -d / -s /usr/sbin/nologin -c "pjdfstest dummy user" tests

tdfs_mkwork pjdfstest
tdfs_install_trap

CONF="$TDFS_WORK/pjdfstest.toml"
{
  echo '[features]'
  echo 'posix_fallocate = {}'
  if [[ "$ALL_FEATURES" == 1 ]]; then
    echo 'utimensat = {}'
    echo 'utime_now = {}'
    echo 'rename_ctime = {}'
  fi
  echo
  echo '[settings]'
  echo "naptime = $PJDFSTEST_NAPTIME"
  echo 'allow_remount = false'
  echo
  echo '[dummy_auth]'
  echo 'entries = ['
  echo '  ["nobody", "nogroup"],'
  echo '  ["tests", "tests"],'
  echo ']'
} >"$CONF"

# run_pjdfstest LABEL DIR: run the suite in DIR; writes $TDFS_WORK/LABEL.log and
# $TDFS_WORK/LABEL.results ("name status" per case; status ok|FAILED|skipped|...).
run_pjdfstest() {
  local label="$1" dir="$2"
  local out="$TDFS_WORK/$label.log" res="$TDFS_WORK/$label.results" rc=0
  log "running pjdfstest ($label) in $dir"
  (cd "$dir" && NO_COLOR=1 timeout --foreground --kill-after=10 "$PJDFSTEST_TIMEOUT" \
      pjdfstest -c "$CONF" -p "$dir" "${PATTERNS[@]}") >"$out" 2>&1 || rc=$?
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    tail -n 20 "$out" >&2
    die "pjdfstest ($label) timed out after ${PJDFSTEST_TIMEOUT}s"
  fi
  sed 's/\x1b\[[0-9;]*m//g' "$out" |
    sed -n -E 's/^([A-Za-z0-9_:]+) +(ok|FAILED|skipped|PASSED UNEXPECTEDLY|failed as expected)$/\1 \2/p' |
    LC_ALL=C sort -k1,1 >"$res"
  if ! grep -q '^Summary:' "$out" || [[ ! -s "$res" ]]; then
    tail -n 30 "$out" >&2
    die "pjdfstest ($label) did not complete (exit $rc); log: $out"
  fi
  local pass fail skip total
  pass=$(grep -c ' ok$' "$res" || true)
  fail=$(grep -c -E ' (FAILED|PASSED UNEXPECTEDLY)$' "$res" || true)
  skip=$(grep -c ' skipped$' "$res" || true)
  total=$(wc -l <"$res")
  printf '%-7s %d cases: ok %d, FAILED %d, skipped %d\n' "$label" "$total" "$pass" "$fail" "$skip" \
    >"$TDFS_WORK/$label.counts"
  if [[ $fail -gt 0 ]]; then
    echo "failed cases ($label):" >&2
    awk '$2 != "ok" && $2 != "skipped" {print "    " $0}' "$res" >&2
    # the messages pjdfstest printed for them
    sed 's/\x1b\[[0-9;]*m//g' "$out" | grep -A3 -E ' FAILED$' | grep -v -E '^ +[0-9]+: |^Backtrace:' |
      head -n 80 | sed 's/^/    /' >&2 || true
  fi
  cat "$TDFS_WORK/$label.counts"
}

STATUS=0

if [[ "$MODE" != tdfs ]]; then
  mkdir -p "$TDFS_WORK/native"
  run_pjdfstest native "$TDFS_WORK/native"
fi

if [[ "$MODE" != native ]]; then
  require_fuse
  tdfs_bins
  tdfs_start_slave "$TDFS_WORK/replica" "$TDFS_WORK/slave-state" "$TDFS_WORK/slave.log"
  tdfs_start_master "$TDFS_WORK/backing" "$TDFS_WORK/mnt" "$TDFS_WORK/master-state" \
    "$TDFS_WORK/master.log" "$SLAVE_PORT"
  run_pjdfstest tdfs "$TDFS_WORK/mnt"
  if ! proc_alive "$MASTER_PID"; then
    show_log master "$MASTER_LOG"
    die "the master died during the pjdfstest run"
  fi
  tdfs_unmount_and_drain "$TDFS_WORK/mnt"
  if ! tdfs_treecmp "$TDFS_WORK/backing" "$TDFS_WORK/replica"; then
    echo "FAIL: the replica differs from the backing directory after pjdfstest" >&2
    STATUS=1
  fi
  tdfs_stop_slave || warn "slave exited non-zero on SIGTERM"
fi

if [[ -n "${PJDFSTEST_RESULTS:-}" ]]; then
  mkdir -p "$PJDFSTEST_RESULTS"
  cp "$CONF" "$TDFS_WORK"/*.log "$TDFS_WORK"/*.results "$TDFS_WORK"/*.counts "$PJDFSTEST_RESULTS"/ 2>/dev/null || true
  log "per-case results and logs copied to $PJDFSTEST_RESULTS"
fi

echo
echo "==================== pjdfstest summary ===================="
[[ -f "$TDFS_WORK/native.counts" ]] && cat "$TDFS_WORK/native.counts"
[[ -f "$TDFS_WORK/tdfs.counts" ]] && cat "$TDFS_WORK/tdfs.counts"

if [[ "$MODE" == both ]]; then
  # cases that pass natively but not through tdfs
  REGRESS="$(LC_ALL=C join "$TDFS_WORK/native.results" "$TDFS_WORK/tdfs.results" |
    awk '$2 == "ok" && $3 != "ok" && $3 != "skipped" {print $1 " (" $3 $4 ")"}')"
  NEWSKIP="$(LC_ALL=C join "$TDFS_WORK/native.results" "$TDFS_WORK/tdfs.results" |
    awk '$2 == "ok" && $3 == "skipped" {print $1}')"
  if [[ -n "$NEWSKIP" ]]; then
    warn "cases passing natively but skipped through tdfs:"
    printf '    %s\n' $NEWSKIP >&2
  fi
  if [[ -n "$REGRESS" ]]; then
    echo "FAIL: $(printf '%s\n' "$REGRESS" | wc -l) case(s) pass natively but fail through tdfs:"
    printf '%s\n' "$REGRESS" | sed 's/^/    /'
    STATUS=1
  else
    echo "OK: every case that passes natively also passes through tdfs"
  fi
elif [[ "$MODE" == tdfs ]]; then
  if grep -q -E ' (FAILED|PASSED UNEXPECTEDLY)$' "$TDFS_WORK/tdfs.results"; then
    echo "FAIL: pjdfstest cases failed through tdfs"
    STATUS=1
  fi
else
  if grep -q -E ' (FAILED|PASSED UNEXPECTEDLY)$' "$TDFS_WORK/native.results"; then
    echo "note: pjdfstest cases fail natively on this machine (baseline only, not an error)"
  fi
fi
[[ $STATUS -eq 0 ]] && echo "pjdfstest: PASS" || echo "pjdfstest: FAIL"
exit "$STATUS"
