#!/usr/bin/env bash
# One-box quick start: a master and a slave on this machine, some writes through the
# mount, and a look at the slave's copy.
#
# Usage: sudo scripts/demo.sh
#   Builds tdfs and tdfs-slave (release; TDFS_PROFILE=debug uses the debug build),
#   makes temp dirs, starts a slave on 127.0.0.1 (free port), starts the master
#   mounting a temp mountpoint, writes files/dirs/a symlink/a chmod through the mount,
#   shows that the slave's copy matches and what `tdfs status` says, then unmounts (the master drains and exits 0),
#   checks the whole replica once more and removes everything. Ctrl-C cleans up too.
#   Set KEEP_TMP=1 to keep the temp dirs; see scripts/lib.sh for other knobs.
set -euo pipefail
export TDFS_PROFILE="${TDFS_PROFILE:-release}"
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
  -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown argument: $1 (see --help)" ;;
esac

step() { printf '\n\033[1m### %s\033[0m\n' "$*"; }
[[ -t 1 ]] || step() { printf '\n### %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

require_root
require_fuse

step "1. Build"
tdfs_bins
echo "master: $TDFS_BIN"
echo "slave:  $TDFS_SLAVE_BIN"

step "2. Temporary directories"
tdfs_mkwork demo
tdfs_install_trap
BACKING="$TDFS_WORK/backing"   # the master's real data
MNT="$TDFS_WORK/mnt"           # the FUSE mount: write here
REPLICA="$TDFS_WORK/replica"   # the slave's mirror
mkdir -p "$BACKING" "$MNT" "$REPLICA"
echo "backing dir (master):  $BACKING"
echo "mountpoint:            $MNT"
echo "replica dir (slave):   $REPLICA"

step "3. Start the slave on 127.0.0.1 with a free port"
tdfs_start_slave "$REPLICA" "$TDFS_WORK/slave-state" "$TDFS_WORK/slave.log"
echo "slave log: $TDFS_WORK/slave.log"

step "4. Start the master: mount $MNT over $BACKING, streaming to 127.0.0.1:$SLAVE_PORT"
tdfs_start_master "$BACKING" "$MNT" "$TDFS_WORK/master-state" "$TDFS_WORK/master.log" "$SLAVE_PORT"
grep " $MNT " /proc/mounts

step "5. Write through the mount"
run mkdir -p "$MNT/docs/notes"
printf 'Hello from the tdfs master.\n' >"$MNT/docs/hello.txt"
echo "\$ printf 'Hello from the tdfs master.\\n' > $MNT/docs/hello.txt"
printf 'line %d\n' $(seq 1 1000) >"$MNT/docs/notes/lines.txt"
echo "\$ printf 'line %d\\n' \$(seq 1 1000) > $MNT/docs/notes/lines.txt"
run dd if=/dev/urandom of="$MNT/data.bin" bs=64k count=16 status=none
run ln -s docs/hello.txt "$MNT/hello-link"
run chmod 0600 "$MNT/docs/notes/lines.txt"
run ln "$MNT/docs/notes/lines.txt" "$MNT/docs/lines-hardlink.txt"
if command -v setfattr >/dev/null 2>&1; then
  run setfattr -n user.origin -v master "$MNT/docs/hello.txt"
fi
run chmod 0750 "$MNT/docs/notes"
run touch -d '2001-02-03 04:05:06.789' "$MNT/docs/hello.txt"
run mv "$MNT/data.bin" "$MNT/random.bin"
printf 'appended\n' >>"$MNT/docs/hello.txt"
echo "\$ printf 'appended\\n' >> $MNT/docs/hello.txt"
run touch -d '2001-02-03 04:05:06.789' "$MNT/docs/hello.txt"

step "6. Wait until the slave has applied everything (deadline ${TDFS_TIMEOUT}s)"
CAUGHT_UP=1
t0=$(now_ms)
deadline=$(( t0 + TDFS_TIMEOUT * 1000 ))
until python3 "$TDFS_SCRIPTS/treecmp.py" --no-root "$BACKING" "$REPLICA" >/dev/null 2>&1; do
  if (( $(now_ms) > deadline )); then
    CAUGHT_UP=0
    warn "the replica has not caught up while mounted; differences:"
    python3 "$TDFS_SCRIPTS/treecmp.py" --no-root "$BACKING" "$REPLICA" || true
    break
  fi
  sleep 0.1
done
[[ $CAUGHT_UP == 1 ]] && echo "replica identical to the backing dir after $(( $(now_ms) - t0 )) ms"

FILES=(docs/hello.txt docs/notes docs/notes/lines.txt docs/lines-hardlink.txt random.bin hello-link)
# show_tree LABEL DIR: what a person would look at (never fails: the final check decides)
show_tree() {
  local label="$1" dir="$2"
  echo "--- $label: ls -lR $dir"
  (cd "$dir" && ls -lR --time-style=+%F_%T.%N .) || true
  echo "--- $label: cat docs/hello.txt; readlink hello-link"
  cat "$dir/docs/hello.txt" || true
  readlink "$dir/hello-link" || true
  if command -v getfattr >/dev/null 2>&1; then
    echo "--- $label: getfattr -d docs/hello.txt"
    (cd "$dir" && getfattr -d docs/hello.txt) || true
  fi
  echo "--- $label: stat (mode, owner, size, mtime)"
  (cd "$dir" && stat -c '%-26n %A %h %U:%G %8s %y' "${FILES[@]}") || true
  echo "--- $label: sha256sum"
  (cd "$dir" && sha256sum random.bin docs/notes/lines.txt) || true
}

step "6b. Ask the running daemons: tdfs status and tdfs-slave status (control sockets)"
run "$TDFS_BIN" status --state-dir "$TDFS_WORK/master-state"
run "$TDFS_SLAVE_BIN" status --state-dir "$TDFS_WORK/slave-state"

step "7. Look: the master's view (through the mount) and the slave's copy"
show_tree master "$MNT"
if [[ $CAUGHT_UP == 1 ]]; then
  show_tree slave "$REPLICA"
else
  echo "--- slave: not caught up yet; shown again after the drain below"
fi

step "8. Unmount: the master drains (waits for the slave to ack everything) and exits 0"
tdfs_unmount_and_drain "$MNT"

step "9. Full comparison of backing dir and replica (type, size, bytes, mode, owner, mtime, xattrs, links)"
if [[ $CAUGHT_UP == 0 ]]; then
  show_tree "slave after drain" "$REPLICA"
fi
tdfs_treecmp "$BACKING" "$REPLICA"

step "10. Stop the slave and clean up"
tdfs_stop_slave || warn "slave exited non-zero on SIGTERM"
echo "demo finished OK (temp dirs are removed on exit unless KEEP_TMP=1)"
