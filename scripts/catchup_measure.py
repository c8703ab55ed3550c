#!/usr/bin/env python3
"""Measures catch-up on one box (release binaries; run as root):
  1. initial sync of a 1 GB / 10,000-file tree to an empty slave, and what a second sync
     (a master with a new identity, same slave) moves;
  2. catch-up after a 1-minute slave outage while a writer keeps writing.
Usage: scripts/catchup_measure.py [--files 10000] [--mb 1024] [--outage 60]"""
import argparse, os, re, shutil, signal, subprocess, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
ENV = dict(os.environ, NO_COLOR="1")


def wait(cond, secs, what):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def mounted(p):
    return any(l.split()[1] == p for l in open("/proc/self/mounts"))


def start_slave(d, port=0):
    log = d + f"/slave-{time.monotonic_ns()}.log"
    p = subprocess.Popen([BIN + "/tdfs-slave", "-m", d + "/s", "-l", f"127.0.0.1:{port}",
                          "--state-dir", d + "/ss"], stderr=open(log, "w"), env=ENV)
    m = []
    wait(lambda: m.append(re.search(r"listening on [0-9.]+:(\d+)", open(log).read())) or m[-1], 20, "slave")
    return p, int(m[-1].group(1))


def start_master(d, port, state, log):
    p = subprocess.Popen([BIN + "/tdfs", "-m", d + "/b", "-c", f"127.0.0.1:{port}", "--state-dir", state, d + "/m"],
                         stderr=open(log, "w"), env=ENV)
    wait(lambda: mounted(d + "/m"), 20, "mount")
    return p


def stop_master(d, p):
    subprocess.run(["umount", d + "/m"])
    p.wait(timeout=600)


def sync_line(log):
    m = re.findall(r"sync complete in ([0-9.]+)s.*?bytes=(\d+)", open(log).read())
    return m[-1] if m else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--outage", type=int, default=60)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="tdfs-catchup-")
    for x in ("b", "m", "s", "ss", "ms1", "ms2"):
        os.mkdir(f"{d}/{x}")
    try:
        size = a.mb * 1024 * 1024 // a.files
        chunk = os.urandom(size)
        for i in range(a.files):
            sub = f"{d}/b/d{i // 100}"
            os.makedirs(sub, exist_ok=True)
            with open(f"{sub}/f{i}", "wb") as f:
                f.write(chunk[i % 97:] + chunk[:i % 97])
        subprocess.run(["sync"])
        slave, port = start_slave(d)
        t = time.monotonic()
        m = start_master(d, port, d + "/ms1", d + "/m1.log")
        wait(lambda: sync_line(d + "/m1.log"), 1800, "initial sync")
        secs, nbytes = sync_line(d + "/m1.log")
        print(f"initial sync of {a.files} files / {a.mb} MiB: {float(secs):.1f} s (master's own count), "
              f"{int(nbytes) / 1048576:.0f} MiB copied; wall {time.monotonic() - t:.1f} s from master start")
        stop_master(d, m)
        m = start_master(d, port, d + "/ms2", d + "/m2.log")
        wait(lambda: sync_line(d + "/m2.log"), 1800, "second sync")
        secs, nbytes = sync_line(d + "/m2.log")
        print(f"second sync (new master identity, same slave): {float(secs):.1f} s, {int(nbytes)} bytes copied")
        # Outage under writes.
        slave.send_signal(signal.SIGTERM)
        slave.wait(timeout=60)
        stop = threading.Event()
        written = [0]

        def writer():
            i = 0
            while not stop.is_set():
                with open(f"{d}/m/w{i % 2000}", "wb") as f:
                    f.write(os.urandom(64 * 1024))
                written[0] += 64 * 1024
                i += 1
                time.sleep(0.002)
        w = threading.Thread(target=writer)
        w.start()
        time.sleep(a.outage)
        slave, _ = start_slave(d, port)
        t = time.monotonic()
        stop.set()
        w.join()
        before = open(d + "/m2.log").read().count("connected; streaming") + open(d + "/m2.log").read().count("sync complete")

        def caught_up():
            out = subprocess.run([BIN + "/tdfs", "verify", "-q", "-m", d + "/b", "-c", f"127.0.0.1:{port}"],
                                 capture_output=True, env=ENV)
            return out.returncode == 0
        wait(caught_up, 1800, "catch-up")
        print(f"outage of {a.outage} s with {written[0] / 1048576:.0f} MiB written meanwhile: identical "
              f"{time.monotonic() - t:.1f} s after the slave came back (checked with tdfs verify)")
        log = open(d + "/m2.log").read()
        print("  (replayed from the journal)" if "sync starting" not in log.split("sync complete")[-1] else "  (resynced)")
        stop_master(d, m)
        slave.send_signal(signal.SIGTERM)
        slave.wait(timeout=60)
    finally:
        if mounted(d + "/m"):
            subprocess.run(["umount", "-l", d + "/m"])
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
