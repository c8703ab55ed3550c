#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for FUZZ_SECS each (default 60) when a nightly
# toolchain is there; installs cargo-fuzz if missing. Without nightly (or when cargo-fuzz
# cannot be installed) it says so and exits 0: the same harnesses run on stable as property
# tests in `cargo test -p tdfs-protocol fuzzing`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECS="${FUZZ_SECS:-60}"
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "SKIPPED fuzzing: no nightly toolchain (the stable property tests in tdfs_protocol::fuzzing ran instead)"
  exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz || cargo install cargo-fuzz || {
    echo "SKIPPED fuzzing: cannot install cargo-fuzz"
    exit 0
  }
fi
cd fuzz
for t in frame_parse op_decode_batch; do
  echo "fuzzing $t for ${SECS}s"
  cargo +nightly fuzz run "$t" -- -max_total_time="$SECS"
done
