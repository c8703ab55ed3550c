#!/usr/bin/env python3
"""Master memory and CPU with a frozen slave, side by side in one run (one box, loopback).

Issue #3's goal, kept by issue #16: writing 2 GiB while the only slave is frozen (SIGSTOP)
keeps the master's peak RSS under 256 MiB, and spilling to the journal must not cost the
master much CPU. For each --queue-size given (default: the built-in default and 256), once with the slave
frozen and once with a slave that keeps up (the CPU reference):
  - starts a slave and a master on fresh temp dirs; freezes the slave;
  - writes SIZE MiB through the mount with dd (1 MiB blocks, conv=fsync off);
  - reads the master's peak RSS (VmHWM) and CPU (utime+stime) while it writes;
  - thaws the slave, waits until it has applied everything, and compares the trees' bytes.
Prints a markdown table. Needs root and /dev/fuse; uses target/release binaries.
Usage: scripts/frozen_rss.py [--size MIB] [--queue-size MIB ...]
"""
import argparse, json, os, re, shutil, signal, subprocess, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
TICK = os.sysconf("SC_CLK_TCK")


def wait(cond, secs, what):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def mounted(p):
    with open("/proc/self/mounts") as f:
        return any(l.split()[1] == p for l in f)


def cpu_secs(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def hwm_mib(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmHWM:"):
            return int(l.split()[1]) / 1024
    return 0.0


def status(state):
    out = subprocess.run([BIN + "/tdfs", "status", "--json", "--state-dir", state],
                         capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def run(base, name, size_mib, queue, freeze):
    d = os.path.join(base, name)
    for sub in ("b", "m", "s", "ss", "ms"):
        os.makedirs(os.path.join(d, sub))
    env = dict(os.environ, NO_COLOR="1")
    slog = d + "/slave.log"
    sp = subprocess.Popen([BIN + "/tdfs-slave", "-m", d + "/s", "-l", "127.0.0.1:0",
                           "--state-dir", d + "/ss"], stderr=open(slog, "w"), env=env)
    port = []

    def listening():
        m = re.search(r"listening on [0-9.]+:(\d+)", open(slog).read())
        if m:
            port.append(m.group(1))
        return bool(m)
    wait(listening, 20, "slave to listen")
    mlog = d + "/master.log"
    cmd = [BIN + "/tdfs", "-m", d + "/b", "--state-dir", d + "/ms", "-c", "127.0.0.1:" + port[0]]
    if queue is not None:
        cmd += ["--queue-size", str(queue)]
    mp = subprocess.Popen(cmd + [d + "/m"], stderr=open(mlog, "w"), env=env)
    try:
        wait(lambda: mounted(d + "/m"), 20, "mount")
        wait(lambda: "slave is in sync" in open(mlog).read(), 30, "slave in sync")
        if freeze:
            sp.send_signal(signal.SIGSTOP)
        cpu0 = cpu_secs(mp.pid)
        t0 = time.monotonic()
        subprocess.run(["dd", "if=/dev/zero", f"of={d}/m/big", "bs=1M", f"count={size_mib}"],
                       check=True, capture_output=True)
        secs = time.monotonic() - t0
        cpu = cpu_secs(mp.pid) - cpu0
        peak = hwm_mib(mp.pid)
        st = status(d + "/ms") or {}
        journal = st.get("journal_bytes", 0) / 2**20
        if freeze:
            sp.send_signal(signal.SIGCONT)
        t1 = time.monotonic()

        def caught_up():
            s = status(d + "/ms")
            return s and all(x["state"] == "streaming" and x["applied"] >= s["last_seq"]
                             for x in s["slaves"])
        wait(caught_up, 600, "slave to catch up")
        catchup = time.monotonic() - t1
        same = os.path.getsize(d + "/s/big") == os.path.getsize(d + "/b/big")
        return dict(peak=peak, cpu_per_gib=cpu / (size_mib / 1024), mib_s=size_mib / secs,
                    journal=journal, catchup=catchup, same=same)
    finally:
        if freeze:
            try:
                sp.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
        subprocess.run(["umount", d + "/m"])
        try:
            mp.wait(timeout=300)
        except subprocess.TimeoutExpired:
            mp.kill()
        sp.send_signal(signal.SIGTERM)
        try:
            sp.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sp.kill()
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048, help="MiB written (default 2048)")
    ap.add_argument("--queue-size", type=int, action="append",
                    help="--queue-size values to compare (default: the built-in default and 256)")
    a = ap.parse_args()
    queues = a.queue_size or [None, 256]
    base = tempfile.mkdtemp(prefix="tdfs-frozen-", dir="/tmp")
    rows = []
    try:
        for q in queues:
            label = "default" if q is None else str(q)
            rows.append((f"frozen slave, --queue-size {label}", run(base, f"f{label}", a.size, q, True)))
            rows.append((f"slave keeping up, --queue-size {label}", run(base, f"l{label}", a.size, q, False)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{a.size} MiB written with dd bs=1M through the mount\n")
    print("| setup | master peak RSS MiB | master CPU s/GiB | write MiB/s | journal MiB | slave caught up s | identical |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['peak']:.0f} | {r['cpu_per_gib']:.2f} | {r['mib_s']:.0f} | "
              f"{r['journal']:.0f} | {r['catchup']:.1f} | {'yes' if r['same'] else 'NO'} |")


if __name__ == "__main__":
    main()
