#!/usr/bin/env bash
# Soak: the random operation tests (tests/tests/parity.rs) over and over with fresh seeds,
# longer runs and more rounds than CI, until the time is up or one fails. Each run is the
# real thing: a mount with two slaves (one compressed), four `randops` processes at once
# (one as nobody), replicas compared on every attribute; and the native parity check
# (one seed run on a plain directory and through the mount, outcomes compared op by op).
#
# Usage: scripts/randops_soak.sh [--minutes M] [--count OPS] [--rounds R] [--seed S]
#   --minutes M   how long to keep going (default 30)
#   --count OPS   operations per process per round (default 6000)
#   --rounds R    rounds per run (default 5)
#   --seed S      first base seed (default: from the clock); each run adds 1000
# A failure prints its seed; replay it with
#   TDFS_RANDOPS_SEED=S cargo test -p tdfs-tests --test parity
# Needs root and /dev/fuse. Logs of a failed run are kept (TDFS_KEEP=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MINUTES=30
COUNT=6000
ROUNDS=5
SEED=$(( $(date +%s%N) % 1000000007 ))
while [[ $# -gt 0 ]]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift ;;
    --count) COUNT="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --seed) SEED="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

end=$(( $(date +%s) + MINUTES * 60 ))
runs=0
cargo build --quiet --workspace --tests
while (( $(date +%s) < end )); do
  runs=$((runs + 1))
  log=$(mktemp /tmp/tdfs-soak.XXXXXX)
  echo "run $runs: base seed $SEED ($ROUNDS rounds x 4 processes x $COUNT ops)"
  if ! TDFS_KEEP=1 TDFS_RANDOPS_SEED="$SEED" TDFS_RANDOPS_COUNT="$COUNT" \
      TDFS_RANDOPS_ROUNDS="$ROUNDS" TDFS_PARITY_SEEDS="$ROUNDS" \
      cargo test --quiet -p tdfs-tests --test parity -- random_operations native_parity \
      >"$log" 2>&1; then
    echo "FAILED with base seed $SEED; output in $log (temp dirs kept, see 'leaving' lines)"
    grep -E "panicked|differ|^  " "$log" | head -20
    exit 1
  fi
  # Passed: drop what TDFS_KEEP kept (a test may leave immutable files; lift them first).
  grep -o 'leaving /tmp/[^ ]*' "$log" | awk '{print $2}' | while read -r d; do
    chattr -R -i -a "$d" >/dev/null 2>&1 || true
    rm -rf "$d"
  done
  rm -f "$log"
  SEED=$((SEED + 1000))
done
echo "soak passed: $runs runs in $MINUTES minutes"
