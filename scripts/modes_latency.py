#!/usr/bin/env python3
"""Per-op latency of each replication mode, side by side in one run (one box, loopback).

For native, tdfs with no slave, and tdfs with one local slave in each --sync mode (and
async with --fsync-local), measures:
  - 4 KiB create: open(O_CREAT) + write 4 KiB + close, per file;
  - small write + fsync: pwrite 100 bytes + fsync, per iteration.
Prints a markdown table of medians and p99 in microseconds. Needs root and /dev/fuse;
uses target/release binaries (build them first: cargo build --release).
Usage: scripts/modes_latency.py [--files N] [--fsyncs N]
"""
import argparse, os, re, shutil, signal, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def wait(cond, secs, what):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def mounted(p):
    with open("/proc/self/mounts") as f:
        return any(l.split()[1] == p for l in f)


class Setup:
    def __init__(self, base, name, slave, args):
        self.dir = os.path.join(base, name)
        os.makedirs(self.dir)
        self.backing, self.mnt = self.dir + "/b", self.dir + "/m"
        for d in ("b", "m", "s", "ss", "ms"):
            os.mkdir(os.path.join(self.dir, d))
        self.procs = []
        self.mlog = self.dir + "/master.log"
        cmd = [BIN + "/tdfs", "-m", self.backing, "--state-dir", self.dir + "/ms"]
        if slave:
            slog = self.dir + "/slave.log"
            sp = subprocess.Popen([BIN + "/tdfs-slave", "-m", self.dir + "/s", "-l", "127.0.0.1:0",
                                   "--state-dir", self.dir + "/ss"],
                                  stderr=open(slog, "w"), env=dict(os.environ, NO_COLOR="1"))
            self.procs.append(sp)
            port = []

            def listening():
                m = re.search(r"listening on [0-9.]+:(\d+)", open(slog).read())
                if m:
                    port.append(m.group(1))
                return bool(m)
            wait(listening, 20, "slave to listen")
            cmd += ["-c", "127.0.0.1:" + port[0]]
        cmd += args + [self.mnt]
        mp = subprocess.Popen(cmd, stderr=open(self.mlog, "w"), env=dict(os.environ, NO_COLOR="1"))
        self.master = mp
        wait(lambda: mounted(self.mnt), 20, "mount")
        if slave:
            wait(lambda: "slave is in sync" in open(self.mlog).read(), 30, "slave in sync")

    def close(self):
        subprocess.run(["umount", self.mnt])
        try:
            self.master.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.master.kill()
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def creates(d, n):
    data = b"x" * 4096
    lat = []
    os.makedirs(d + "/c", exist_ok=True)
    for i in range(n):
        t = time.perf_counter()
        fd = os.open(f"{d}/c/f{i}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
        lat.append((time.perf_counter() - t) * 1e6)
    return lat


def fsyncs(d, n):
    lat = []
    fd = os.open(d + "/fs", os.O_CREAT | os.O_WRONLY, 0o644)
    for i in range(n):
        t = time.perf_counter()
        os.pwrite(fd, b"y" * 100, (i * 100) % 65536)
        os.fsync(fd)
        lat.append((time.perf_counter() - t) * 1e6)
    os.close(fd)
    return lat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--fsyncs", type=int, default=300)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    base = tempfile.mkdtemp(prefix="tdfs-modes-")
    rows = []
    configs = [
        ("native (ext4)", None, None),
        ("tdfs, no slave", False, []),
        ("tdfs + 1 slave, async", True, []),
        ("tdfs + 1 slave, async, --fsync-local", True, ["--fsync-local"]),
        ("tdfs + 1 slave, received", True, ["--sync", "received"]),
        ("tdfs + 1 slave, applied", True, ["--sync", "applied"]),
    ]
    try:
        for i, (name, slave, args) in enumerate(configs):
            if slave is None:
                d = os.path.join(base, "native")
                os.makedirs(d)
                c, f = creates(d, a.files), fsyncs(d, a.fsyncs)
            else:
                s = Setup(base, f"s{i}", slave, args)
                try:
                    c, f = creates(s.mnt, a.files), fsyncs(s.mnt, a.fsyncs)
                finally:
                    s.close()
            rows.append((name, pct(c, .5), pct(c, .99), pct(f, .5), pct(f, .99)))
            print(f"  {name}: done", file=sys.stderr)
    finally:
        for l in open("/proc/self/mounts"):
            if base in l.split()[1]:
                subprocess.run(["umount", "-l", l.split()[1]])
        shutil.rmtree(base, ignore_errors=True)
    base_c, base_f = rows[2][1], rows[2][3]
    print(f"| setup | 4 KiB create p50 µs | p99 µs | vs async | write+fsync p50 µs | p99 µs | vs async |")
    print("|---|---|---|---|---|---|---|")
    for name, c50, c99, f50, f99 in rows:
        print(f"| {name} | {c50:.0f} | {c99:.0f} | {c50 / base_c:.2f}x | {f50:.0f} | {f99:.0f} | {f50 / base_f:.2f}x |")


if __name__ == "__main__":
    main()
