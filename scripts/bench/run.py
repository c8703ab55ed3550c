#!/usr/bin/env python3
"""tdfs benchmark: native vs tdfs (0/1/2 slaves, -z 0/1) vs bindfs vs libfuse passthrough_hp.

Usage (as root, from anywhere):

    scripts/bench/setup.sh            # once: fio, bindfs, passthrough_hp (built under /opt)
    scripts/bench/run.py [--quick] [--runs N] [--out FILE] [--targets a,b,...] [--sections ...]
                         [--meta-files N,...] [--variant NAME[@N]:DIR[:ARGS]]
                         [--no-hold-memory] [--prefault-gib N]

Every target is a directory the workloads run in: a fresh directory on the work filesystem
(native), a FUSE mount over a fresh backing directory (bindfs, passthrough_hp, tdfs). Targets
are interleaved run by run (run 1 on every target, then run 2, ...) so drift hits them alike;
every run mounts afresh and every workload uses a fresh subdirectory. The tables hold medians
over the runs and the speed relative to native.

The daemons (tdfs master and slaves, bindfs, passthrough_hp) run in their own sessions so a
Ctrl-C reaches only this script, which then unmounts everything it mounted, stops every
process it started and removes its work directory (try/finally plus signal handlers).
Readiness is always a condition polled with a deadline (slave logged "listening on", mount in
/proc/mounts, master logged "connected; streaming" for every slave), never a fixed sleep.

On a VM with free page reporting (Firecracker: /sys/module/page_reporting/parameters/
min_free_ms), freed guest memory goes back to the host and its next first touch is a host
fault, which makes page-cache-heavy rows vary several-fold and penalises targets that touch
more memory. So, by default, the run first sets min_free_ms and max_waiting_mib to the largest
values the kernel accepts (freed pages then stay in the guest for minutes), pre-touches
--prefault-gib GiB (default 8, at most half of MemAvailable) of anonymous memory and releases
it, and writes the saved values back at exit, error, Ctrl-C or SIGTERM; the notes say what it
did. --no-hold-memory skips all of that.

Needs: python3 (stdlib only), root, /dev/fuse, fusermount3, tar, git, cargo (unless
--no-build); fio, bindfs and passthrough_hp are optional (a missing one is skipped and noted).
"""

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MiB = 1 << 20
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Warm sequential reads per run (each one sample; see w_seqwrite).
WARM_PASSES = 5
# Small-file creates: the rate over this many first files is recorded too (see w_smallfiles).
CREATE_SPLIT = 10000
# Metadata section: warm passes per command (each one sample of the median), the targets
# it runs on by default, and the commands (see Bench.metadata).
META_WARM = 3
META_TARGETS = ("bindfs", "passthrough_hp", "tdfs-0", "tdfs-1")
META_CMDS = ("ls -lR", "find -newer", "stat", "git status", "du -s", "find -type f")
PTHP_DEFAULT = os.path.join(os.environ.get("TDFS_BENCH_OPT", "/opt/tdfs-bench"), "passthrough_hp")


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def warn(msg):
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Process, mount and cleanup bookkeeping
# ---------------------------------------------------------------------------------------

class Registry:
    """Everything this script started or mounted, so cleanup can undo it in any case."""

    def __init__(self):
        self.procs = []  # (name, Popen)
        self.mounts = []  # mountpoints
        self.knobs = []  # (path, value): kernel settings to write back at exit
        self.work = None

    def add_proc(self, name, p):
        self.procs.append((name, p))

    def add_mount(self, mnt):
        self.mounts.append(mnt)

    def forget_mount(self, mnt):
        if mnt in self.mounts:
            self.mounts.remove(mnt)

    def forget_proc(self, p):
        self.procs = [(n, q) for (n, q) in self.procs if q is not p]

    def add_knob(self, path, value):
        """Register PATH's saved VALUE before changing it, so an interruption between the
        save and the write still restores it (writing back an unchanged value is harmless)."""
        self.knobs.append((path, value))

    def cleanup(self, keep=False):
        try:
            self._cleanup(keep)
        finally:
            # Kernel settings last and whatever happened above: they outlive this script.
            self.restore_knobs()

    def restore_knobs(self):
        for path, value in reversed(self.knobs):
            try:
                now = read_knob(path)
                if now != value:
                    with open(path, "w") as f:
                        f.write(value)
                    log(f"cleanup: restored {path} to {value} (was {now})")
            except OSError as e:
                warn(f"cleanup: could not restore {path} to {value} ({e}); restore it by hand")
        self.knobs = []

    def _cleanup(self, keep):
        for mnt in reversed(list(self.mounts)):
            if is_mounted(mnt):
                log(f"cleanup: unmounting {mnt}")
                if not do_unmount(mnt):
                    fuse_abort(mnt)
                    subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
            self.forget_mount(mnt)
        for name, p in reversed(list(self.procs)):
            if p.poll() is None:
                # A master whose mount is gone exits on its own after draining; give it a
                # moment, then SIGTERM, then SIGKILL.
                try:
                    p.wait(timeout=10 if name.startswith("tdfs master") else 0.2)
                except subprocess.TimeoutExpired:
                    p.terminate()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        warn(f"cleanup: killing {name} (pid {p.pid})")
                        p.kill()
                        p.wait()
            self.forget_proc(p)
        if self.work and os.path.isdir(self.work):
            if keep:
                log(f"keeping {self.work}")
            elif any(m.startswith(self.work + "/") for m in mounted_points()):
                warn(f"cleanup: something is still mounted under {self.work}; not removing it")
            else:
                shutil.rmtree(self.work, ignore_errors=True)
            self.work = None


REG = Registry()


def mounted_points():
    with open("/proc/mounts") as f:
        return [line.split()[1].replace("\\040", " ") for line in f]


def is_mounted(d):
    return d in mounted_points()


def do_unmount(d):
    for cmd in (["fusermount3", "-u", d], ["umount", d]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            if subprocess.run(cmd, stderr=subprocess.DEVNULL, timeout=60).returncode == 0:
                return True
        except subprocess.TimeoutExpired:
            pass
    return not is_mounted(d)


def fuse_abort(d):
    """Abort the FUSE connection behind D (a hung server); same approach as scripts/lib.sh."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == d:
                minor = parts[2].split(":")[1]
                path = f"/sys/fs/fuse/connections/{minor}/abort"
                if os.path.exists(path):
                    warn(f"aborting FUSE connection {minor} for {d}")
                    with open(path, "w") as a:
                        a.write("1")
                return


def wait_for(cond, what, timeout, proc=None, logfile=None):
    """Poll COND until true; fail at the deadline or when PROC has died."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited with {proc.returncode}{tail(logfile)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout}s{tail(logfile)}")
        time.sleep(0.02)


def tail(logfile, n=25):
    if not logfile or not os.path.exists(logfile):
        return ""
    with open(logfile, errors="replace") as f:
        lines = f.readlines()[-n:]
    return "\n---- " + logfile + " ----\n" + "".join("    " + ANSI.sub("", x) for x in lines)


def raise_nofile():
    """Daemons get the highest open-file limit allowed: passthrough_hp keeps an O_PATH fd per
    inode the kernel remembers, and runs out near the hard limit (needs CAP_SYS_RESOURCE to
    raise it; silently left as is without)."""
    import resource
    try:
        with open("/proc/sys/fs/nr_open") as f:
            n = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (OSError, ValueError):
        pass


def spawn(name, argv, logfile):
    lf = open(logfile, "ab")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                         start_new_session=True, preexec_fn=raise_nofile)
    lf.close()
    REG.add_proc(name, p)
    return p


def stat_cpu(path):
    """(comm, utime+stime in seconds) from a /proc/<pid>[/task/<tid>]/stat file."""
    with open(path) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (s[s.index("(") + 1:s.rindex(")")],
            (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))


def proc_cpu(pid):
    """utime+stime of PID (all threads) in seconds."""
    return stat_cpu(f"/proc/{pid}/stat")[1]


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# VM memory: hold off free page reporting and pre-touch memory
# ---------------------------------------------------------------------------------------
#
# On a VM with free page reporting (Firecracker guests: /sys/module/page_reporting/parameters/
# with min_free_ms, max_waiting_mib, ...), memory the guest frees is handed back to the host,
# and the first touch of such a page again is a host fault. Page-cache-heavy rows then measure
# that, not the software: writing 1 GiB files in a row natively gave 4647, 774, 415, 4397,
# 4030 MiB/s, touching 12 GiB of fresh anonymous memory ran at ~0.4 GiB/s, and a target that
# touches more memory (tdfs with a slave writes every byte twice) is penalised for it. With
# min_free_ms at its largest accepted value (by its name and effect: how long a page must
# have stayed free before it is reported) and memory pre-touched once, the same writes gave 4561, 4585, 992, 3803, 3761.

PAGE_REPORTING = "/sys/module/page_reporting/parameters"
# Largest first: the kernel rejects values above its maximum (300000 is the largest this
# Firecracker kernel takes for min_free_ms; 3600000 is EINVAL).
MIN_FREE_MS = (300000, 120000, 60000, 30000, 10000)
PAGE = 4096


def read_knob(path):
    with open(path) as f:
        return f.read().strip()


def write_first_accepted(path, candidates):
    """Write the first of CANDIDATES that PATH accepts (read back to be sure); None if none."""
    for v in candidates:
        try:
            with open(path, "w") as f:
                f.write(str(v))
            if read_knob(path) == str(v):
                return str(v)
        except OSError:
            continue
    return None


def all_cpus():
    """Jiffies of all CPUs from /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v + [0] * (8 - len(v))


def cpu_times():
    """(total, steal) jiffies of all CPUs."""
    v = all_cpus()
    return sum(v), v[7]


def box_busy():
    """CPU seconds the whole box has been busy (user, nice, system, irq, softirq; not idle,
    iowait or steal)."""
    v = all_cpus()
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def pretouch(size):
    """Map SIZE bytes of anonymous memory, write one byte per page, release it; seconds.
    All of it is held until every page is touched, so the guest has to back SIZE bytes at
    once (touching and releasing piecewise would reuse the same few pages). Chunks keep a
    Ctrl-C prompt."""
    import mmap
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        chunk = 256 * MiB
        ones = b"\x01" * (chunk // PAGE)
        t0 = time.monotonic()
        for off in range(0, size, chunk):
            end = min(off + chunk, size)
            m[off:end:PAGE] = ones[:(end - off + PAGE - 1) // PAGE]
        return time.monotonic() - t0
    finally:
        m.close()


def hold_memory(a):
    """Hold off VM free page reporting for the run (the old values go to REG, which writes
    them back at exit, error, Ctrl-C or SIGTERM), then pre-touch memory. Returns the note."""
    if a.no_hold_memory:
        return ("VM free page reporting not held off and no memory pre-touched "
                "(--no-hold-memory); on a VM that returns freed memory to the host, "
                "page-cache-heavy rows can vary several-fold from run to run")
    mf = os.path.join(PAGE_REPORTING, "min_free_ms")
    mw = os.path.join(PAGE_REPORTING, "max_waiting_mib")
    why = None
    if os.geteuid() != 0:
        why = "not root"
    elif not os.path.exists(mf):
        why = f"no {mf} (no free page reporting to hold off on this machine)"
    if why:
        warn(f"memory hold skipped: {why}")
        # Without the hold, pages released after a pre-touch would be reported again at
        # once, so there is no point in touching them.
        return f"VM free page reporting not held off and no memory pre-touched: {why}"
    # max_waiting_mib: how much freed memory may wait unreported; at least all of the RAM
    ram_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MiB
    max_waiting = sorted({max(65536, ram_mib), 65536, 32768, 16384, 8192, 4096}, reverse=True)
    changes = []
    for path, candidates in ((mf, MIN_FREE_MS), (mw, max_waiting)):
        if not os.path.exists(path):
            continue
        old = read_knob(path)
        REG.add_knob(path, old)
        new = write_first_accepted(path, candidates)
        name = os.path.basename(path)
        if new is None:
            warn(f"memory hold: {path} took none of {', '.join(map(str, candidates))}; "
                 f"left at {old}")
            if path == mf:
                return (f"VM free page reporting not held off and no memory pre-touched: "
                        f"{mf} took none of {', '.join(map(str, candidates))}")
            changes.append(f"{name} left at {old}")
        elif new == old:
            changes.append(f"{name} already {old}")
        else:
            changes.append(f"{name} {old} → {new}")
    note = (f"VM free page reporting held off for the run ({', '.join(changes)}, "
            "restored after)")
    if a.prefault_gib <= 0:
        return note + "; no memory pre-touched (--prefault-gib 0)"
    # never more than half of what is available: the pre-touch must not push the page cache
    # or anything else out
    want = int(a.prefault_gib * (1 << 30)) // PAGE * PAGE
    size = min(want, mem_available() // 2 // PAGE * PAGE)
    capped = " (capped at half of MemAvailable)" if size < want else ""
    if size <= 0:
        return note + "; no memory pre-touched (MemAvailable too low)"
    gib = size / (1 << 30)
    log(f"pre-touching {gib:.3g} GiB of anonymous memory{capped}")
    secs = pretouch(size)
    note += (f"; pre-touched {gib:.3g} GiB{capped} in {secs:.1f} s ({gib / secs:.2f} GiB/s; "
             "slow when the pages had been returned to the host, each first touch being a "
             "host fault)")
    return note


# ---------------------------------------------------------------------------------------
# A TCP proxy that counts bytes (master -> slave is "up")
# ---------------------------------------------------------------------------------------

class CountingProxy:
    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.up = 0
        self.down = 0
        self.lock = threading.Lock()
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(8)
        self.port = self.ls.getsockname()[1]
        self.socks = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            for x in (c, s):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks += [c, s]
            threading.Thread(target=self._pump, args=(c, s, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, "down"), daemon=True).start()

    def _pump(self, a, b, direction):
        try:
            while True:
                data = a.recv(1 << 18)
                if not data:
                    break
                b.sendall(data)
                with self.lock:
                    if direction == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self):
        self.stopped = True
        for s in [self.ls] + self.socks:
            try:
                s.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------

class Target:
    name = ""
    desc = ""
    replicated = False

    def start(self, base):
        """Prepare and return the directory workloads run in."""
        raise NotImplementedError

    def stop(self):
        return {}

    # tdfs only
    def replica_roots(self):
        return []

    def backing(self):
        return None


class Native(Target):
    def __init__(self):
        self.name = "native"
        self.desc = "a fresh directory on the work filesystem"

    def start(self, base):
        d = os.path.join(base, "native")
        os.makedirs(d)
        return d


class SimpleFuse(Target):
    """bindfs or passthrough_hp over a fresh backing directory, run in the foreground."""

    def __init__(self, name, desc, argv_fn):
        self.name = name
        self.desc = desc
        self.argv_fn = argv_fn
        self.proc = None
        self.mnt = None
        self.src = None

    def start(self, base):
        src = os.path.join(base, "src")
        self.src = src
        self.mnt = os.path.join(base, "mnt")
        os.makedirs(src)
        os.makedirs(self.mnt)
        logf = os.path.join(base, "daemon.log")
        REG.add_mount(self.mnt)
        self.proc = spawn(self.name, self.argv_fn(src, self.mnt), logf)
        wait_for(lambda: is_mounted(self.mnt), f"{self.name} mount", 30, self.proc, logf)
        return self.mnt

    def stop(self):
        if self.mnt and is_mounted(self.mnt) and not do_unmount(self.mnt):
            raise BenchError(f"cannot unmount {self.mnt}")
        REG.forget_mount(self.mnt)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        REG.forget_proc(self.proc)
        return {}

    def backing(self):
        return self.src


class Tdfs(Target):
    def __init__(self, name, nslaves, z=0, proxy=False, extra=(), master=None, relays=0,
                 slave_extra=()):
        self.name = name
        # With relays: nslaves leaves split evenly among `relays` relaying slaves, which
        # are the master's only direct slaves.
        self.relays = relays
        self.nslaves = nslaves
        self.z = z
        self.proxy = proxy
        self.extra = list(extra)
        self.master_bin = master
        self.slave_extra = list(slave_extra)
        self.replicated = nslaves > 0
        self.desc = (f"tdfs, {nslaves} local slave{'s' if nslaves != 1 else ''}"
                     + (f", -z {z}" if nslaves else "") + ", async (default)")
        self.master = None
        self.slaves = []  # (proc, mirror, logfile)
        self.proxies = []

    def start(self, base):
        self.base = base
        self.back = os.path.join(base, "backing")
        self.mnt = os.path.join(base, "mnt")
        for d in (self.back, self.mnt):
            os.makedirs(d)
        self.slaves, self.proxies = [], []
        addrs = []
        leaves = []
        total = self.nslaves + self.relays
        for i in range(total):
            mirror = os.path.join(base, f"slave{i}", "mirror")
            state = os.path.join(base, f"slave{i}", "state")
            os.makedirs(mirror)
            logf = os.path.join(base, f"slave{i}.log")
            extra = []
            if self.relays and i >= self.nslaves:
                # A relay: its share of the leaves started above.
                r = i - self.nslaves
                per = self.nslaves // self.relays
                for a_ in leaves[r * per:(r + 1) * per]:
                    extra += ["-c", a_]
            p = spawn(f"tdfs slave {i}", [BINS["slave"], "-m", mirror, "-l", "127.0.0.1:0",
                                          "--state-dir", state] + extra + self.slave_extra,
                      logf)
            port = [None]

            def listening(logf=logf, port=port):
                with open(logf, errors="replace") as f:
                    m = re.search(r"listening on (\S+)", ANSI.sub("", f.read()))
                if m:
                    port[0] = int(m.group(1).rsplit(":", 1)[1])
                return m is not None
            wait_for(listening, f"slave {i} 'listening on'", 30, p, logf)
            self.slaves.append((p, mirror, logf))
            if self.relays and i < self.nslaves:
                leaves.append(f"127.0.0.1:{port[0]}")
                continue
            if self.proxy:
                px = CountingProxy(port[0])
                self.proxies.append(px)
                addrs.append(f"127.0.0.1:{px.port}")
            else:
                addrs.append(f"127.0.0.1:{port[0]}")
        argv = [self.master_bin or BINS["master"], "-m", self.back]
        for a in addrs:
            argv += ["-c", a]
        argv += ["-z", str(self.z), "--state-dir", os.path.join(base, "mstate")] + self.extra
        argv.append(self.mnt)
        self.mlog = os.path.join(base, "master.log")
        REG.add_mount(self.mnt)
        self.master = spawn("tdfs master", argv, self.mlog)
        wait_for(lambda: is_mounted(self.mnt), "tdfs mount", 30, self.master, self.mlog)

        def connected():
            # "slave is in sync" (masters with initial sync) or "connected; streaming"
            # (older masters), for every slave address
            with open(self.mlog, errors="replace") as f:
                lines = [ANSI.sub("", x) for x in f
                         if "slave is in sync" in x or "connected; streaming" in x]
            return all(any(a in x for x in lines) for a in addrs)
        wait_for(connected, "master connected to every slave", 60, self.master, self.mlog)
        return self.mnt

    def replica_roots(self):
        return [m for (_, m, _) in self.slaves]

    def backing(self):
        return self.back

    def lost(self):
        """A slave fell behind: marked out of sync (newer masters bring it back with an
        incremental sync; older ones needed a full resync)."""
        with open(self.mlog, errors="replace") as f:
            # the session's end at unmount logs "out of sync (disconnected)": not a lag
            return any("out of sync" in x and "(disconnected)" not in x for x in f)

    def gone(self):
        """A slave that will not converge without outside help (older masters)."""
        with open(self.mlog, errors="replace") as f:
            return "needs a full resync" in f.read()

    def stop(self):
        t0 = time.monotonic()
        if is_mounted(self.mnt) and not do_unmount(self.mnt):
            raise BenchError(f"cannot unmount {self.mnt}")
        REG.forget_mount(self.mnt)
        try:
            rc = self.master.wait(timeout=600)
        except subprocess.TimeoutExpired:
            raise BenchError(f"tdfs master did not exit after unmount{tail(self.mlog)}")
        drain = time.monotonic() - t0
        REG.forget_proc(self.master)
        lost = self.lost()
        for p, _, _ in self.slaves:
            p.terminate()
        for p, _, logf in self.slaves:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            REG.forget_proc(p)
        for px in self.proxies:
            px.stop()
        if rc != 0:
            warn(f"{self.name}: master exited {rc} after unmount{tail(self.mlog, 8)}")
        return {"drain_s": drain, "master_rc": rc, "lost": lost}


# ---------------------------------------------------------------------------------------
# Tree snapshots for "replica identical" (names + types + sizes + mtimes)
# ---------------------------------------------------------------------------------------

def snapshot(root):
    out = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel) if rel else root)
        except FileNotFoundError:
            return None
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                r = os.path.join(rel, e.name)
                isdir = e.is_dir(follow_symlinks=False)
                out[r] = (st.st_mode >> 12, 0 if isdir else st.st_size, st.st_mtime_ns)
                if isdir:
                    stack.append(r)
    return out


def wait_replicas(target, rel, timeout=300):
    """Seconds until every replica's REL equals the backing's REL (None on timeout, or at
    once when the master has marked a slave out of sync: that replica will not converge)."""
    if not target.replicated:
        return None
    t0 = time.monotonic()
    want = snapshot(os.path.join(target.backing(), rel))
    pending = list(target.replica_roots())
    next_lost_check = t0
    while pending:
        pending = [r for r in pending if snapshot(os.path.join(r, rel)) != want]
        if not pending:
            break
        now = time.monotonic()
        if now > next_lost_check:
            if target.gone():
                warn(f"{target.name}: a slave needs a full resync; not waiting for {rel}")
                return None
            next_lost_check = now + 0.2
        if now - t0 > timeout:
            warn(f"{target.name}: replicas of {rel} not identical after {timeout}s")
            return None
        time.sleep(0.005)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------

def write_file(path, size, buf, fsync=False):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        mv = memoryview(buf)
        while left > 0:
            chunk = mv[:min(len(buf), left)]
            while chunk:
                n = os.write(fd, chunk)
                chunk = chunk[n:]
            left -= min(len(buf), left)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path):
    buf = bytearray(MiB)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            total += n
    finally:
        os.close(fd)
    return total


def timed(fn, *a, **kw):
    t0 = time.monotonic()
    fn(*a, **kw)
    return time.monotonic() - t0


def thread_cpu(pid):
    """{thread name: utime+stime seconds} of PID's threads (same names summed)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name, sec = stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        out[name] = out.get(name, 0) + sec
    return out


def slaves_cpu(c0, c1):
    """CPU seconds all slaves spent between two `cpu_of` samples."""
    return sum(b - a for a, b in zip(c0[1], c1[1]))


def backing_twin(target, root, path):
    """PATH (under the mount ROOT) in the target's backing directory; None without one."""
    back = target.backing()
    return os.path.join(back, os.path.relpath(path, root)) if back else None


def cpu_of(target):
    """(daemon CPU seconds, [slave CPU seconds]) of a FUSE target; None for native."""
    if isinstance(target, Tdfs):
        return (proc_cpu(target.master.pid), [proc_cpu(p.pid) for p, _, _ in target.slaves])
    if isinstance(target, SimpleFuse) and target.proc:
        return (proc_cpu(target.proc.pid), [])
    return None


def fio_run(path, rw, size_mib, runtime):
    argv = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", "--bs=4k",
            f"--size={size_mib}M", "--ioengine=psync", "--invalidate=0", "--time_based",
            f"--runtime={runtime}", "--output-format=json", "--numjobs=1"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 300)
    if r.returncode != 0:
        raise BenchError(f"fio failed: {r.stderr.strip()[:500]}")
    j = json.loads(r.stdout[r.stdout.index("{"):])
    job = j["jobs"][0]
    return job["read" if rw == "randread" else "write"]["iops"]


def py_random_io(path, rw, size_mib, ops):
    fd = os.open(path, os.O_RDWR)
    blocks = size_mib * MiB // 4096
    rnd = random.Random(1)
    buf = os.urandom(4096)
    t0 = time.monotonic()
    try:
        for _ in range(ops):
            off = rnd.randrange(blocks) * 4096
            if rw == "randread":
                os.pread(fd, 4096, off)
            else:
                os.pwrite(fd, buf, off)
    finally:
        os.close(fd)
    return ops / (time.monotonic() - t0)


# ---------------------------------------------------------------------------------------
# Metadata trees: generated, deterministic, with a git repository
# ---------------------------------------------------------------------------------------

META_WORDS = ("alpha beta gamma delta return self import from def class if else for while "
              "with as try except raise lambda yield none true false int str list dict "
              "value index node tree path file data buffer offset length count").split()
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.org",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.org",
           "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}


def gen_tree(root, nfiles, seed=20):
    """A source-like tree of NFILES regular files under ROOT, the same for every seed: about
    20 files per directory, directories up to 6 deep, sizes log-normal around 1 KiB (text
    lines), a symlink per 400 files. Returns the relative paths of the files and links."""
    rnd = random.Random(seed)
    ndirs = max(1, nfiles // 20)
    dirs, depth = [""], {"": 0}
    for i in range(1, ndirs):
        # parents among the last few directories made: deep, bushy trees like real sources
        parent = rnd.choice([d for d in dirs[-8:] if depth[d] < 6] or [""])
        d = os.path.join(parent, f"d{i:05d}")
        dirs.append(d)
        depth[d] = depth[parent] + 1
    for d in dirs[1:]:
        os.mkdir(os.path.join(root, d))
    lines = [" ".join(rnd.choice(META_WORDS) for _ in range(rnd.randint(3, 12))) + "\n"
             for _ in range(512)]
    names = []
    for i in range(nfiles):
        d = dirs[rnd.randrange(len(dirs))]
        size = min(65536, int(rnd.lognormvariate(6.8, 1.1)))
        body, n = [], 0
        while n < size:
            line = lines[rnd.randrange(len(lines))]
            body.append(line)
            n += len(line)
        name = os.path.join(d, f"f{i:06d}" + rnd.choice((".py", ".c", ".h", ".txt", ".md", ".rs")))
        with open(os.path.join(root, name), "w") as f:
            f.write("".join(body))
        names.append(name)
        if i % 400 == 399:
            link = os.path.join(d, f"l{i:06d}")
            os.symlink(os.path.basename(name), os.path.join(root, link))
            names.append(link)
    return names


def make_meta_tree(work, nfiles):
    """A tarball of a generated tree of NFILES files with a git repository of it (committed,
    packed), made natively at bench time. Returns (tarball, relative paths of its files)."""
    root = os.path.join(work, f"meta-src-{nfiles}")
    os.makedirs(root)
    names = gen_tree(root, nfiles)
    env = dict(os.environ, **GIT_ENV)
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "tree"],
                ["gc", "-q"]):
        subprocess.run(["git", "-C", root, "-c", "gc.auto=0"] + cmd, check=True, env=env,
                       stdout=subprocess.DEVNULL)
    tarball = os.path.join(work, f"meta-{nfiles}.tar")
    subprocess.run(["tar", "-cf", tarball, "-C", root, "."], check=True)
    shutil.rmtree(root)
    return tarball, names


class Bench:
    def __init__(self, args):
        self.a = args
        self.res = {}  # target -> metric -> [values]
        self.notes = []
        self.dropped_note = False
        self.buf = os.urandom(MiB) if not args.zero_data else bytes(MiB)
        self.can_drop = True
        self.meta_trees = {}  # files -> (tarball, paths)
        self.meta_targets = []

    def rec(self, tname, metric, value):
        if value is not None:
            self.res.setdefault(tname, {}).setdefault(metric, []).append(value)

    def fresh(self, root, name):
        d = os.path.join(root, name)
        os.mkdir(d)
        return d

    def settle(self, target, root, rel, metric):
        """After a workload: wait until replicas of REL are identical; record the time."""
        if target.replicated:
            self.rec(target.name, "catchup:" + metric, wait_replicas(target, rel))
            if target.lost():
                self.rec(target.name, "lost", 1)

    # -- the workloads; each on a fresh subdirectory of ROOT -------------------------------

    def w_seqwrite(self, t, root, run):
        a = self.a
        size = a.size_mib * MiB
        for fs in (False, True):
            key = "seqwrite_fsync" if fs else "seqwrite"
            d = self.fresh(root, f"{key}-{run}")
            os.sync()
            c0 = cpu_of(t)
            th0 = thread_cpu(t.master.pid) if isinstance(t, Tdfs) else {}
            b0 = box_busy()
            t0 = time.monotonic()
            write_file(os.path.join(d, "big"), size, self.buf, fsync=fs)
            el = time.monotonic() - t0
            b1 = box_busy()
            c1 = cpu_of(t)
            if th0:
                # Raw numbers only (the .json): where the master's CPU went, by thread.
                th1 = thread_cpu(t.master.pid)
                for name, v in th1.items():
                    self.rec(t.name, f"threads_{key}:{name}", v - th0.get(name, 0))
            self.rec(t.name, key, size / MiB / el)
            gib = size / (1 << 30)
            if fs:
                # The whole box: the writer, the daemon and the kernel's threads. A
                # writeback-caching daemon (passthrough_hp) leaves the copy into the page
                # cache to the writer and the flushing to kernel threads, so its own CPU
                # is not the cost of a GiB through it. A replica's cost is not the master's
                # either (on its own machine in use): the slave processes' CPU is taken out
                # (what the kernel does for them, e.g. their writeback, stays in).
                slaves = slaves_cpu(c0, c1) if c0 is not None else 0
                self.rec(t.name, "cpu_box_per_gib", (b1 - b0 - slaves) / gib)
            if fs and c0 is not None:
                # Write + fsync: a writeback-caching daemon (passthrough_hp) has done all its
                # work by then, so this compares daemons fairly.
                self.rec(t.name, "cpu_daemon_per_gib", (c1[0] - c0[0]) / gib)
            self.settle(t, root, os.path.basename(d), key)
            if c0 is not None and t.replicated and not fs:
                c2 = cpu_of(t)
                self.rec(t.name, "cpu_master_per_gib", (c1[0] - c0[0]) / gib)
                self.rec(t.name, "cpu_slave_per_gib", slaves_cpu(c0, c2) / len(c0[1]) / gib)
            if fs:
                # read the fsynced file back: cold, then warm
                p = os.path.join(d, "big")
                if drop_caches():
                    self.rec(t.name, "seqread_cold", size / MiB / timed(read_file, p))
                else:
                    self.can_drop = False
                    read_file(p)
                # A warm pass takes ~50 ms at native speed, where this VM's jitter is ±15%:
                # WARM_PASSES passes, each one sample of the median. On FUSE targets each
                # pass is paired, as random reads are: the backing file read just before and
                # just after, so that the ratio is free of the box's drift.
                bp = backing_twin(t, root, p)
                for _ in range(WARM_PASSES):
                    before = timed(read_file, bp) if bp else None
                    el = timed(read_file, p)
                    self.rec(t.name, "seqread_warm", size / MiB / el)
                    if bp:
                        after = timed(read_file, bp)
                        self.rec(t.name, "seqread_warm_paired", (before + after) / 2 / el)
            # leave no GiB files behind (a single unlink is cheap)
            os.unlink(os.path.join(d, "big"))
            self.settle(t, root, os.path.basename(d), "unlink")

    def w_random(self, t, root, run):
        a = self.a
        d = self.fresh(root, f"random-{run}")
        p = os.path.join(d, "rnd")
        write_file(p, a.rand_mib * MiB, self.buf)
        self.settle(t, root, os.path.basename(d), "layout")
        read_file(p)  # warm
        os.sync()
        def rand_io(path, rw, share=1.0):
            if shutil.which("fio") and not a.no_fio:
                return fio_run(path, rw, a.rand_mib, max(1, round(a.fio_runtime * share)))
            return py_random_io(path, rw, a.rand_mib, max(1, int(a.py_ops * share)))

        bp = backing_twin(t, root, p)
        for rw in ("randread", "randwrite"):
            if rw == "randread" and bp is not None:
                # Paired: the same file, read straight from the backing directory just
                # before and just after (half as long each), so that the ratio is free of
                # the box's drift over the minutes between this target and native.
                before = rand_io(bp, rw, 0.5)
                iops = rand_io(p, rw)
                after = rand_io(bp, rw, 0.5)
                self.rec(t.name, "randread_paired", iops / ((before + after) / 2))
            else:
                iops = rand_io(p, rw)
            self.rec(t.name, rw, iops)
        self.settle(t, root, os.path.basename(d), "randwrite")
        os.unlink(p)

    def w_smallfiles(self, t, root, run):
        n = self.a.files
        d = self.fresh(root, f"small-{run}")
        data = self.buf[:4096]
        per_dir = 1000
        paths = []
        for i in range(n):
            paths.append(os.path.join(d, f"d{i // per_dir:03d}", f"f{i:06d}"))
        # passthrough_hp holds an fd per inode and fails (EMFILE/EBADF) near the open-file
        # limit (20,000 here); the rate over the first CREATE_SPLIT files is recorded on the
        # way, so the create goal compares every target on the same count.
        split = self.a.create_split
        self.before_creates()
        t0 = time.monotonic()
        for i, p in enumerate(paths):
            if i % per_dir == 0:
                os.mkdir(os.path.dirname(p))
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
            if i + 1 == split:
                self.rec(t.name, "create_first", split / (time.monotonic() - t0))
        self.rec(t.name, "create", n / (time.monotonic() - t0))
        self.settle(t, root, os.path.basename(d), "create")
        t0 = time.monotonic()
        for p in paths:
            os.stat(p)
        self.rec(t.name, "stat", n / (time.monotonic() - t0))
        t0 = time.monotonic()
        for p in paths:
            os.unlink(p)
        self.rec(t.name, "delete", n / (time.monotonic() - t0))
        self.settle(t, root, os.path.basename(d), "delete")

    def w_untar(self, t, root, run):
        d = self.fresh(root, f"untar-{run}")
        self.before_creates(self.tarball)
        t0 = time.monotonic()
        r = subprocess.run(["tar", "-xf", self.tarball, "-C", d], stderr=subprocess.PIPE,
                           text=True, errors="replace")
        if self.check(t, r, "tar -xf"):
            self.rec(t.name, "untar", time.monotonic() - t0)
        self.settle(t, root, os.path.basename(d), "untar")

    def w_clone(self, t, root, run):
        dest = os.path.join(root, f"clone-{run}")
        self.before_creates(os.path.join(REPO, ".git"))
        t0 = time.monotonic()
        r = subprocess.run(["git", "clone", "-q", "--no-hardlinks", REPO, dest],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           errors="replace")
        if self.check(t, r, "git clone"):
            self.rec(t.name, "clone", time.monotonic() - t0)
        self.settle(t, root, os.path.basename(dest), "clone")

    # -- metadata (issue #20) ------------------------------------------------------------------

    def meta_cmd(self, name, d, paths, ref):
        """A callable that runs metadata command NAME in directory D; output discarded."""
        env = dict(os.environ, LC_ALL="C", GIT_OPTIONAL_LOCKS="0", **GIT_ENV)
        argv = {
            "ls -lR": ["ls", "-lR", "--color=never", "."],
            "find -newer": ["find", ".", "-newer", ref],
            "git status": ["git", "status"],
            "du -s": ["du", "-s", "."],
            "find -type f": ["find", ".", "-type", "f"],
        }.get(name)
        if argv is None:  # stat of every file and link: lstat in this process
            full = [os.path.join(d, p) for p in paths]

            def run():
                for p in full:
                    os.lstat(p)
            return run

        def run():
            r = subprocess.run(argv, cwd=d, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, errors="replace")
            if r.returncode != 0:
                raise BenchError(f"`{name}` exited {r.returncode}: {r.stderr.strip()[:300]}")
        return run

    def metadata(self, run):
        """Per tree size: a native reference copy of the tree (in the work directory), then
        per target the tree extracted through the mount (replicas waited for), an untimed
        `git status` that refreshes the index for that mount, and each command cold (caches
        dropped: the first pass after mount, for the kernel's caches and the daemon's) and
        warm (META_WARM passes right after). Every pass on a target sits between two passes
        of the same command on the reference copy, cold or warm alike: its ratio to their
        mean is free of the box's drift over the minutes between targets."""
        a = self.a
        for n in a.meta_files:
            if n not in self.meta_trees:
                log(f"generating the {n:,}-file metadata tree")
                self.meta_trees[n] = make_meta_tree(self.work, n)
            tarball, paths = self.meta_trees[n]
            native = self.fresh(self.work, f"meta-native-{n}-{run}")
            self.before_creates(tarball)
            t0 = time.monotonic()
            subprocess.run(["tar", "-xf", tarball, "-C", native], check=True)
            self.rec("native", f"meta:{n}:extract", time.monotonic() - t0)
            self.git_refresh(native)
            for t in self.meta_targets:
                base = os.path.join(self.work, f"meta{n}-{t.name}-{run}")
                os.makedirs(base)
                log(f"run {run}: metadata, {n:,} files, {t.name}")
                root = t.start(base)
                try:
                    self.meta_target(t, root, n, tarball, paths, native)
                except (OSError, subprocess.SubprocessError, BenchError) as e:
                    note = f"{t.name} run {run}: metadata ({n:,} files) failed: {e}"
                    warn(note)
                    self.notes.append(note)
                t.stop()

    @staticmethod
    def git_refresh(d):
        """The index records each file's inode number and ctime: refresh it for the tree as
        seen here (this may write the index), so that the timed runs only stat."""
        env = dict(os.environ, LC_ALL="C", **GIT_ENV)
        subprocess.run(["git", "status"], cwd=d, env=env, stdout=subprocess.DEVNULL, check=True)

    def meta_target(self, t, root, n, tarball, paths, native):
        d = self.fresh(root, "tree")
        self.before_creates(tarball)
        t0 = time.monotonic()
        subprocess.run(["tar", "-xf", tarball, "-C", d], check=True)
        self.rec(t.name, f"meta:{n}:extract", time.monotonic() - t0)
        self.settle(t, root, "tree", f"meta-extract-{n}")
        self.git_refresh(d)
        self.settle(t, root, "tree", f"meta-refresh-{n}")
        middle = paths[len(paths) // 2]
        for name in META_CMDS:
            run = self.meta_cmd(name, d, paths, os.path.join(d, middle))
            ref = self.meta_cmd(name, native, paths, os.path.join(native, middle))
            phases = [("cold", drop_caches)] if self.can_drop else []
            phases += [("warm", lambda: True)] * META_WARM
            for phase, prepare in phases:
                if not prepare():
                    self.can_drop = False
                    continue
                before = timed(ref)
                prepare()
                el = timed(run)
                prepare()
                after = timed(ref)
                key = f"meta:{n}:{name}:{phase}"
                self.rec(t.name, key, el)
                self.rec(t.name, key + ":paired", el / ((before + after) / 2))
                self.rec("native", key, before)
                self.rec("native", key, after)
                if phase == "cold":
                    run()  # the drop before `after` emptied its caches again

    def before_creates(self, *warm):
        """Sync, drop caches, then read `warm` (inputs of the workload) back into the cache.

        On ext4 without a journal (this machine's /tmp), inode allocation skips every inode
        deleted in the last 60 s (300 s while its inode-table block is dirty) whose table block
        is still cached (`recently_deleted` in ialloc.c), scanning bitmap and table for each
        create. After earlier workloads deleted thousands of files, a create-heavy workload then
        measures that scan (perf: find_inode_bit/recently_deleted on top), and a target that
        creates every file twice (tdfs with a local slave) pays it twice. Dropping the cached
        table blocks ends the scan, for every target alike."""
        # drop_caches() syncs first, whether or not the drop itself is allowed
        if drop_caches() and not self.dropped_note:
            self.dropped_note = True
            self.notes.append("Before each file-creating workload (untar, clone, small "
                              "files): sync and drop caches, then re-read its input — "
                              "see `before_creates` (ext4 without a journal scans past "
                              "recently deleted inodes while their table blocks are "
                              "cached).")
        for w in warm:
            paths = [w] if os.path.isfile(w) else [
                os.path.join(dp, fn) for dp, _, fns in os.walk(w) for fn in fns]
            for p in paths:
                try:
                    read_file(p)
                except OSError:
                    pass

    @staticmethod
    def trash(base):
        """Delete only the big files a finished target left (cheap single unlinks); trees of
        small files stay until the final cleanup, because creating many files right after
        deleting many is slow on some filesystems (ext4 without journal, discard) and would
        bias whichever target comes next."""
        for dp, _, fns in os.walk(base):
            for fn in fns:
                p = os.path.join(dp, fn)
                try:
                    if os.lstat(p).st_size > MiB:
                        os.unlink(p)
                except OSError:
                    pass

    def check(self, t, r, what):
        """A failing command yields no time; the notes say why."""
        if r.returncode == 0:
            return True
        if True:
            lines = r.stderr.strip().splitlines()
            note = (f"{t.name}: `{what}` exited {r.returncode} ({len(lines)} error lines; first: "
                    f"`{lines[0].strip() if lines else ''}`); no time listed")
            if not any(n.startswith(note.split(" (")[0]) for n in self.notes):
                self.notes.append(note)
            warn(note)
        return False

    # small files last: a target that fails there (passthrough_hp: EMFILE) would otherwise
    # take the workloads after it down with it
    WORKLOADS = ("seqwrite", "random", "untar", "clone", "smallfiles")

    def run_target(self, t, run):
        base = os.path.join(self.work, f"{t.name}-{run}")
        os.makedirs(base)
        log(f"run {run}: {t.name}")
        root = t.start(base)
        # On an exception (Ctrl-C included) the registry's cleanup unmounts and stops it.
        for w in self.WORKLOADS:
            if w in self.a.skip:
                continue
            try:
                getattr(self, "w_" + w)(t, root, run)
            except (OSError, subprocess.SubprocessError, BenchError) as e:
                note = f"{t.name} run {run}: workload {w} failed: {e}"
                warn(note)
                self.notes.append(note)
        info = t.stop()
        if info.get("drain_s") is not None and t.replicated:
            self.rec(t.name, "drain", info["drain_s"])
        if info.get("master_rc"):
            self.notes.append(f"{t.name} run {run}: master exited {info['master_rc']} after unmount")
        if info.get("lost"):
            self.notes.append(f"{t.name} run {run}: a slave fell behind and the master marked it "
                              "out of sync (writers stop waiting for it; it is brought back by a "
                              "sync — catch-up times include that)")
        self.trash(base)

    # -- replication metrics (tdfs, 1 slave) --------------------------------------------------

    def repl_lag(self, run):
        a = self.a
        t = Tdfs("tdfs-1", 1)
        base = os.path.join(self.work, f"lag-{run}")
        os.makedirs(base)
        root = t.start(base)
        lags, missing, achieved = self.lag_run(t, root, t.replica_roots()[0])
        self.lag_samples.extend(lags)
        self.rec("repl", "lag_rate", achieved)
        if missing:
            self.notes.append(f"lag run {run}: {missing} files never became visible on the slave")

        # burst: 1,000 files as fast as possible, then time until the replica is identical
        rel = "burst"
        d = os.path.join(root, rel)
        os.mkdir(d)
        wait_replicas(t, rel)
        data = self.buf[:4096]
        t0 = time.monotonic()
        for i in range(a.burst):
            fd = os.open(os.path.join(d, f"b{i:05d}"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, data)
            os.close(fd)
        t1 = time.monotonic()
        self.rec("repl", "burst_write", a.burst / (t1 - t0))
        self.rec("repl", "burst_catchup", wait_replicas(t, rel))
        t.stop()
        self.trash(base)

    def lag_run(self, t, root, replica, rel="lag"):
        """Files written at --lag-rate for --lag-secs; for each, ms from its close on the
        mount to its full content on REPLICA. Returns (lags, files never seen, achieved
        rate)."""
        a = self.a
        n = int(a.lag_rate * a.lag_secs)
        os.mkdir(os.path.join(root, rel))
        wait_replicas(t, rel)
        mirror = os.path.join(replica, rel)
        contents = [(b"%08d" % i) + self.buf[8:4096] for i in range(n)]
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        poller = ctx.Process(target=lag_poller, args=(child, mirror, contents, 120))
        poller.start()
        try:
            parent.recv()  # poller ready
            closes = []
            t0 = time.monotonic()
            for i in range(n):
                due = t0 + i / a.lag_rate
                while True:
                    now = time.monotonic()
                    if now >= due:
                        break
                    time.sleep(min(due - now, 0.01))
                fd = os.open(os.path.join(root, rel, f"f{i:06d}"),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, contents[i])
                os.close(fd)
                closes.append(time.monotonic())
            achieved = n / (time.monotonic() - t0)
            seen = parent.recv()
            poller.join(timeout=30)
        finally:
            if poller.is_alive():
                poller.kill()
            poller.join()
        lags = [(s_ - c) * 1000 for s_, c in zip(seen, closes) if s_ is not None]
        missing = sum(1 for s_ in seen if s_ is None)
        return lags, missing, achieved

    def relays(self, run):
        """Issue 19: the master's cost with 2 direct slaves, 8 direct slaves, and 2 relays
        feeding 3 leaves each (8 replicas); lag at a leaf behind a relay vs a direct slave."""
        a = self.a
        size = a.scale_mib * MiB
        for name, n, r in (("direct2", 2, 0), ("direct8", 8, 0), ("relays2x3", 6, 2)):
            t = Tdfs(f"relays-{name}", n, relays=r, extra=a.relays_master_args.split())
            base = os.path.join(self.work, f"relays-{name}-{run}")
            log(f"run {run}: relays, {name}")
            root, el, (c0, _), (c1, _) = self.big_write(t, base, size)
            gib = size / (1 << 30)
            self.rec("relays", f"master_{name}", size / MiB / el)
            self.rec("relays", f"cpu_master_{name}", (c1[0] - c0[0]) / gib)
            c = wait_replicas(t, "w")
            if c is not None:
                self.rec("relays", f"repl_{name}", size / MiB / (el + c))
            # The lag is the relay hop's, not the disk's: the big file is removed (its dirty
            # pages, one copy per replica, then need no writeback) and what is left flushed
            # before files are timed. Otherwise the lag run shares the disk with the
            # writeback of 9 copies in the relay case and of 3 in the direct-2 case.
            os.unlink(os.path.join(root, "w", "big"))
            wait_replicas(t, "w")
            os.sync()
            # slaves[0] is a leaf behind a relay in the relay case, a direct slave otherwise.
            lags, missing, _ = self.lag_run(t, root, t.slaves[0][1])
            self.relay_lags.setdefault(name, []).extend(lags)
            if missing:
                self.notes.append(f"relays {name} run {run}: {missing} files never arrived")
            if t.lost():
                self.notes.append(f"relays {name} run {run}: a slave was marked out of sync")
            t.stop()
            self.trash(base)

    def repl_wire(self, run):
        """Bytes master->slave through a counting proxy, -z 0 vs -z 1."""
        a = self.a
        for z in (0, 1):
            t = Tdfs(f"wire-z{z}", 1, z=z, proxy=True)
            base = os.path.join(self.work, f"wire{z}-{run}")
            os.makedirs(base)
            root = t.start(base)
            px = t.proxies[0]
            d = self.fresh(root, "src")
            wait_replicas(t, "src")
            u0 = px.up
            subprocess.run(["tar", "-xf", self.tarball, "-C", d], check=True)
            wait_replicas(t, "src")
            self.rec("repl", f"wire_src_z{z}", px.up - u0)
            d = self.fresh(root, "rnd")
            wait_replicas(t, "rnd")
            u0 = px.up
            write_file(os.path.join(d, "big"), a.wire_mib * MiB, self.buf)
            wait_replicas(t, "rnd")
            self.rec("repl", f"wire_rnd_z{z}", px.up - u0)
            t.stop()
            self.trash(base)

    def big_write(self, t, base, size):
        """Starts T in BASE (a new directory) and, once its replicas hold the fresh `w`,
        writes SIZE bytes to w/big. Returns the mount root, the write's seconds, and
        (cpu_of, box_busy) just before and just after it."""
        os.makedirs(base)
        root = t.start(base)
        d = self.fresh(root, "w")
        wait_replicas(t, "w")
        os.sync()
        before = (cpu_of(t), box_busy())
        t0 = time.monotonic()
        write_file(os.path.join(d, "big"), size, self.buf)
        el = time.monotonic() - t0
        return root, el, before, (cpu_of(t), box_busy())

    def scale(self, run):
        a = self.a
        size = a.scale_mib * MiB
        for n in a.scale_slaves:
            t = Tdfs(f"scale-{n}", n)
            base = os.path.join(self.work, f"scale{n}-{run}")
            log(f"run {run}: scale, {n} slave(s)")
            _, el, (c0, b0), (c1, b1) = self.big_write(t, base, size)
            gib = size / (1 << 30)
            self.rec("scale", f"master_{n}", size / MiB / el)
            self.rec("scale", f"cpu_master_{n}", (c1[0] - c0[0]) / gib)
            # How busy both cores were while the master wrote: near 100% means the row is
            # bound by this box's CPU, which master, slaves and writer share.
            self.rec("scale", f"busy_{n}", (b1 - b0) / (el * os.cpu_count()) * 100)
            if n:
                c = wait_replicas(t, "w")
                c2 = cpu_of(t)
                self.rec("scale", f"cpu_slaves_{n}", slaves_cpu(c0, c2) / gib)
                if c is not None:
                    self.rec("scale", f"repl_{n}", size / MiB / (el + c))
                if t.lost():
                    self.rec("scale", f"lost_{n}", 1)
            info = t.stop()
            if info.get("lost"):
                self.notes.append(f"scale {n} slaves run {run}: a slave was marked out of sync")
            self.trash(base)
        snd, rcv = tcp_floor(self.buf, a.scale_mib, self.work)
        self.rec("scale", "tcp_send", snd)
        self.rec("scale", "tcp_recv", rcv)


    def security(self, run):
        """A 1 GiB write with one slave under each frame protection, side by side: none,
        shared secret (every frame MAC'd), secret + --encrypt, TLS (with the secret: tdfs
        then adds no MAC of its own)."""
        a = self.a
        size = a.sec_mib * MiB
        keys = os.path.join(self.work, "keys")
        if not os.path.isdir(keys):
            os.makedirs(keys)
            make_secret_and_certs(keys)
        secret = ["--secret-file", os.path.join(keys, "secret")]
        tls = os.path.exists(os.path.join(keys, "ca.pem"))

        def certs(who):
            return ["--tls-cert", os.path.join(keys, f"{who}.pem"),
                    "--tls-key", os.path.join(keys, f"{who}.key"),
                    "--tls-ca", os.path.join(keys, "ca.pem")]
        modes = [("none", [], []), ("mac", secret, secret),
                 ("encrypt", secret + ["--encrypt"], secret + ["--encrypt"])]
        if tls:
            modes.append(("tls", secret + certs("master"), secret + certs("slave")))
        elif run == 1:
            self.notes.append("security: no openssl, TLS row skipped")
        # Interleaved in a different order each run, so the box's drift hits every mode.
        order = modes[run % len(modes):] + modes[:run % len(modes)]
        for mode, margs, sargs in order:
            t = Tdfs(f"sec-{mode}", 1, extra=margs, slave_extra=sargs)
            base = os.path.join(self.work, f"sec-{mode}-{run}")
            os.makedirs(base)
            log(f"run {run}: security, {mode}")
            root = t.start(base)
            d = self.fresh(root, "w")
            wait_replicas(t, "w")
            os.sync()
            c0, b0 = cpu_of(t), box_busy()
            t0 = time.monotonic()
            write_file(os.path.join(d, "big"), size, self.buf)
            el = time.monotonic() - t0
            c = wait_replicas(t, "w")
            c1, b1 = cpu_of(t), box_busy()
            gib = size / (1 << 30)
            self.rec("sec", f"write_{mode}", size / MiB / el)
            if c is not None:
                self.rec("sec", f"repl_{mode}", size / MiB / (el + c))
            self.rec("sec", f"cpu_master_{mode}", (c1[0] - c0[0]) / gib)
            self.rec("sec", f"cpu_slave_{mode}", slaves_cpu(c0, c1) / gib)
            self.rec("sec", f"busy_{mode}", (b1 - b0) / ((el + (c or 0)) * os.cpu_count()) * 100)
            with open(t.mlog, errors="replace") as f:
                text = ANSI.sub("", f.read())
            if mode != "none" and "failed authentication" in text:
                self.notes.append(f"security {mode} run {run}: a frame failed authentication")
            t.stop()
            self.trash(base)


def make_secret_and_certs(d):
    """A shared secret, and (with openssl) a CA with a certificate for the master and one
    for the slave (127.0.0.1 as subjectAltName)."""
    p = os.path.join(d, "secret")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32).hex().encode())
    os.close(fd)
    if not shutil.which("openssl"):
        return

    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, cwd=d,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=tdfs bench CA")
    ext = os.path.join(d, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    for who in ("master", "slave"):
        ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        ossl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{who}.pem", "-days", "2", "-extfile", ext)
        os.chmod(os.path.join(d, f"{who}.key"), 0o600)


TCP_SINK = r"""
import os, resource, socket, sys
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
buf = memoryview(bytearray(1 << 20))
n = 0
# From here on: the interpreter's start-up is not the stream's cost.
r0 = resource.getrusage(resource.RUSAGE_SELF)
while True:
    k = c.recv_into(buf)
    if not k:
        break
    n += k
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(n, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, flush=True)
"""

TCP_SOURCE = r"""
import resource, socket, sys
port, mib = int(sys.argv[1]), int(sys.argv[2])
buf = open(sys.argv[3], "rb").read()
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
r0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(mib):
    s.sendall(buf)
s.shutdown(socket.SHUT_WR)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, flush=True)
s.recv(1)
"""


def tcp_floor(buf, mib, work):
    """CPU seconds per GiB of a bare loopback TCP stream: (sender, receiver). What any
    replicating master pays per slave on this box before doing anything of its own."""
    blk = os.path.join(work, "tcp-floor-block")
    with open(blk, "wb") as f:
        f.write(buf)
    sink = subprocess.Popen([sys.executable, "-c", TCP_SINK], stdout=subprocess.PIPE, text=True)
    try:
        line = sink.stdout.readline()
        if not line.strip().isdigit():
            raise BenchError("tcp floor: the receiver did not start")
        port = int(line)
        src = subprocess.run([sys.executable, "-c", TCP_SOURCE, str(port), str(mib), blk],
                             capture_output=True, text=True, timeout=300)
        if src.returncode != 0:
            raise BenchError(f"tcp floor sender failed: {src.stderr.strip()[:300]}")
        got, rcpu = sink.stdout.readline().split()
        if int(got) != mib * MiB:
            raise BenchError(f"tcp floor: {got} bytes received of {mib * MiB}")
        gib = mib / 1024
        return float(src.stdout) / gib, float(rcpu) / gib
    finally:
        sink.kill()
        sink.wait()
        os.unlink(blk)


def lag_poller(conn, mirror, contents, timeout):
    """Busy-polls the slave's copies in order (slaves apply in the master's total order, so
    a file not yet complete means later ones are not either); 0.1 ms naps keep it from
    starving the daemons on a small machine."""
    n = len(contents)
    seen = [None] * n
    conn.send("ready")
    i = 0
    deadline = time.monotonic() + timeout
    while i < n and time.monotonic() < deadline:
        p = os.path.join(mirror, f"f{i:06d}")
        try:
            if os.stat(p).st_size == len(contents[i]):
                with open(p, "rb") as f:
                    if f.read() == contents[i]:
                        seen[i] = time.monotonic()
                        i += 1
                        continue
        except FileNotFoundError:
            pass
        time.sleep(0.0001)
    conn.send(seen)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def med(v):
    return statistics.median(v) if v else None


def fmt(x, unit=""):
    if x is None:
        return "–"
    if unit == "s":
        return f"{x:.2f}" if x < 100 else f"{x:.0f}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def pct(v, q):
    v = sorted(v)
    if not v:
        return None
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def report(b, targets, skipped, env):
    a = b.a
    R = b.res
    out = []
    P = out.append
    P(f"# tdfs benchmark — {env['date']}\n")
    P(f"Command: `{env['cmd']}`  ")
    P(f"Machine: {env['machine']}  ")
    P(f"tdfs: {env['rev']} (release build); medians of {a.runs} run(s); data "
      f"{'zeros' if a.zero_data else 'incompressible (one random 1 MiB buffer reused per block)'}.\n")
    P("Targets:\n")
    for t in targets:
        P(f"- **{t.name}**: {t.desc}")
    for name, why in skipped:
        P(f"- **{name}**: skipped — {why}")
    P("")
    names = [t.name for t in targets]
    rows = [
        ("seqwrite", f"seq write {a.size_mib} MiB, 1 MiB blocks", "MiB/s", True),
        ("seqwrite_fsync", f"seq write {a.size_mib} MiB + fsync", "MiB/s", True),
        ("seqread_cold", f"seq read {a.size_mib} MiB, cold", "MiB/s", True),
        ("seqread_warm", f"seq read {a.size_mib} MiB, warm", "MiB/s", True),
        ("randread", f"4 KiB random read, {a.rand_mib} MiB file (warm)", "IOPS", True),
        ("randwrite", f"4 KiB random write, {a.rand_mib} MiB file", "IOPS", True),
        ("create", f"create {a.files:,} × 4 KiB files", "files/s", True),
        ("create_first", f"… the first {a.create_split:,} of them", "files/s", True),
        ("stat", f"stat {a.files:,} files", "files/s", True),
        ("delete", f"delete {a.files:,} files", "files/s", True),
        ("untar", f"untar {b.tar_files:,} files ({b.tar_mib:.0f} MiB)", "s", False),
        ("clone", "git clone --no-hardlinks (this repo)", "s", False),
    ]
    P(f"## Workloads (median; in parentheses: speed relative to native, >1 = faster)\n")
    P("| workload | unit | " + " | ".join(names) + " |")
    P("|---|---|" + "---|" * len(names))
    for key, label, unit, higher in rows:
        nat = med(R.get("native", {}).get(key, []))
        cells = []
        for n in names:
            v = med(R.get(n, {}).get(key, []))
            c = fmt(v, unit)
            if v is not None and nat and n != "native":
                rel = v / nat if higher else nat / v
                c += f" ({rel:.2f}×)"
            cells.append(c)
        P(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    P("| daemon CPU per GiB, seq write + fsync (lower is better) | s/GiB | " + " | ".join(
        "–" if n == "native" else fmt(med(R.get(n, {}).get("cpu_daemon_per_gib", [])))
        for n in names) + " |")
    P("| CPU per GiB, seq write + fsync, whole box (writer, daemon, kernel threads; not the "
      "slave processes) | s/GiB | " + " | ".join(
          fmt(med(R.get(n, {}).get("cpu_box_per_gib", []))) for n in names) + " |")
    for key, what in (("seqread_warm_paired", "seq read warm"),
                      ("randread_paired", "4 KiB random read")):
        paired = [med(R.get(n, {}).get(key, [])) for n in names]
        if any(v is not None for v in paired):
            P(f"| {what}, paired: through the mount / the same file read directly just "
              "before and after | × | " + " | ".join(
                  "–" if v is None else f"{v:.2f}×" for v in paired) + " |")
    P("")
    if not b.can_drop:
        P("Cold reads: could not write /proc/sys/vm/drop_caches; cold numbers are missing.\n")

    reps = [t for t in targets if t.replicated]
    if reps:
        P("## Replication catch-up (tdfs; seconds from the end of a workload until every "
          "replica's tree is identical — names, types, sizes, mtimes)\n")
        rn = [t.name for t in reps]
        P("| after | " + " | ".join(rn) + " |")
        P("|---|" + "---|" * len(rn))
        for key, label in (("seqwrite", "seq write"), ("seqwrite_fsync", "seq write + fsync"),
                           ("randwrite", "random write"), ("create", "create files"),
                           ("delete", "delete files"), ("untar", "untar"), ("clone", "git clone")):
            P(f"| {label} | " + " | ".join(fmt(med(R.get(n, {}).get("catchup:" + key, [])), "s")
                                         for n in rn) + " |")
        P("| unmount → master drained and exited | "
          + " | ".join(fmt(med(R.get(n, {}).get("drain", [])), "s") for n in rn) + " |")
        P("")
        P("| CPU seconds per GiB written (seq write, no fsync) | " + " | ".join(rn) + " |")
        P("|---|" + "---|" * len(rn))
        P("| master (all threads, during the write) | "
          + " | ".join(fmt(med(R.get(n, {}).get("cpu_master_per_gib", []))) for n in rn) + " |")
        P("| slave (mean per slave, write + catch-up) | "
          + " | ".join(fmt(med(R.get(n, {}).get("cpu_slave_per_gib", []))) for n in rn) + " |")
        P("")

    rp = R.get("repl", {})
    if rp:
        P("## Replication (tdfs, 1 local slave, -z 0 unless noted)\n")
        P("| metric | value |")
        P("|---|---|")
        if b.lag_samples:
            s = b.lag_samples
            P(f"| close() on master → content visible on slave, 4 KiB files at "
              f"{a.lag_rate}/s for {a.lag_secs} s (achieved {fmt(med(rp.get('lag_rate', [])))} /s; "
              f"{len(s)} samples) | p50 {pct(s, .5):.2f} ms, p99 {pct(s, .99):.2f} ms, "
              f"max {max(s):.2f} ms |")
        if rp.get("burst_catchup"):
            P(f"| burst of {a.burst:,} × 4 KiB files (written at "
              f"{fmt(med(rp.get('burst_write', [])))} files/s): end of burst → replica identical "
              f"| {fmt(med(rp['burst_catchup']) * 1000)} ms |")
        for kind, label in (("src", f"untar of {b.tar_files:,} source files "
                                    f"({b.tar_bytes / MiB:.1f} MiB of file data)"),
                            ("rnd", f"{a.wire_mib} MiB of incompressible data")):
            z0 = med(rp.get(f"wire_{kind}_z0", []))
            z1 = med(rp.get(f"wire_{kind}_z1", []))
            if z0 and z1:
                payload = b.tar_bytes if kind == "src" else a.wire_mib * MiB
                P(f"| bytes master→slave, {label} | -z 0: {z0 / MiB:.1f} MiB "
                  f"({z0 / payload:.2f}× data), -z 1: {z1 / MiB:.1f} MiB ({z1 / payload:.2f}× data); "
                  f"-z 1 / -z 0 = {z1 / z0:.2f} |")
        P("")

    sc = R.get("scale", {})
    if sc:
        P(f"## Scale: master seq write {a.scale_mib} MiB with N local slaves (median)\n")
        P("| slaves | master MiB/s | vs 0 slaves | cost per added slave (vs previous row) | "
          "replicated MiB/s (until every replica identical) | master CPU s/GiB | "
          "slaves' CPU s/GiB (all, write + catch-up) | box busy while the master wrote | "
          "slave marked out of sync |")
        P("|---|---|---|---|---|---|---|---|---|")
        base = med(sc.get("master_0", []))
        prev_n, prev = None, None
        for n in a.scale_slaves:
            v = med(sc.get(f"master_{n}", []))
            if v is None:
                continue
            vs0 = f"{(v / base - 1) * 100:+.0f}%" if base and n else "–"
            per = "–"
            if prev is not None and n != prev_n:
                per = f"{(1 - v / prev) / (n - prev_n) * 100:.1f}%"
            lost = len(sc.get(f"lost_{n}", []))
            busy = med(sc.get(f"busy_{n}", []))
            P(f"| {n} | {fmt(v)} | {vs0} | {per} | {fmt(med(sc.get(f'repl_{n}', [])))} | "
              f"{fmt(med(sc.get(f'cpu_master_{n}', [])))} | "
              f"{fmt(med(sc.get(f'cpu_slaves_{n}', [])))} | "
              f"{'–' if busy is None else f'{busy:.0f}%'} | "
              f"{f'{lost} of {a.runs} runs' if lost else 'no'} |")
            prev_n, prev = n, v
        P("")
        snd, rcv = med(sc.get("tcp_send", [])), med(sc.get("tcp_recv", []))
        if snd is not None:
            P(f"A bare loopback TCP stream of {a.scale_mib} MiB (1 MiB sends, no filesystem) "
              f"costs its sender {snd:.2f} and its receiver {rcv:.2f} CPU s/GiB on this box: "
              "the least any master pays per slave, and any slave per GiB, before writing a "
              "byte. Every row shares the same cores (`box busy`).\n")

    se = R.get("sec", {})
    if se:
        P(f"## Frame protection: seq write {a.sec_mib} MiB with one local slave (median)\n")
        P("| frames | master write MiB/s | vs none | replicated MiB/s (until identical) | "
          "vs none | master CPU s/GiB | slave CPU s/GiB | box busy |")
        P("|---|---|---|---|---|---|---|---|")
        w0, r0 = med(se.get("write_none", [])), med(se.get("repl_none", []))
        names = {"none": "plain (no secret)", "mac": "secret: MAC (AEGIS-256X2) on every frame",
                 "encrypt": "secret + --encrypt (AEGIS-256X2)",
                 "tls": "TLS (+ secret; no tdfs MAC inside)"}
        for mode in ("none", "mac", "encrypt", "tls"):
            w = med(se.get(f"write_{mode}", []))
            if w is None:
                continue
            r = med(se.get(f"repl_{mode}", []))
            busy = med(se.get(f"busy_{mode}", []))
            vs = (lambda v, b0: "–" if mode == "none" or not v or not b0
                  else f"{(v / b0 - 1) * 100:+.1f}%")
            P(f"| {names[mode]} | {fmt(w)} | {vs(w, w0)} | {fmt(r)} | {vs(r, r0)} | "
              f"{fmt(med(se.get(f'cpu_master_{mode}', [])))} | "
              f"{fmt(med(se.get(f'cpu_slave_{mode}', [])))} | "
              f"{'–' if busy is None else f'{busy:.0f}%'} |")
        P("")
        P("Goals (issue #21): the MAC costs at most 10% of the throughput of `none`; "
          "encryption at most what TLS costs. The modes run interleaved, in a rotated order "
          "each run; CPU is the daemon process alone.\n")
        wm, we, wt = (med(se.get(f"write_{m}", [])) for m in ("mac", "encrypt", "tls"))
        rows = []
        if w0 and wm:
            cost = (1 - wm / w0) * 100
            rows.append(("MAC: master write throughput given up", f"{cost:.1f}%", "≤ 10%",
                         "yes" if cost <= 10 else "**no**"))
        if w0 and we and wt:
            rows.append(("--encrypt vs TLS: write throughput", f"{we / wt:.2f}×", "≥ 1.0×",
                         "yes" if we >= wt else "**no**"))
        if rows:
            P("| goal | measured | wanted | met |")
            P("|---|---|---|---|")
            for r in rows:
                P("| " + " | ".join(r) + " |")
            P("")

    meta_report(b, P)
    relay_report(b, P)
    goals(b, [t.name for t in targets], P)
    P("## Notes\n")
    P("- Everything shares one machine: a local slave writes the same data to the same disk "
      "and page cache, on the same cores, as the master and the workload. Writes without "
      "fsync land in the page cache (the 1 GiB file fits in RAM many times), so they measure "
      "the data path, not the disk; `sync` runs (untimed) before each workload so dirty pages "
      "of the previous one are not flushed inside it.")
    P("- Cold reads: `sync; echo 3 > /proc/sys/vm/drop_caches` before the read; it also drops "
      "the backing file's cache under a FUSE target. Warm: the same file read again at once, "
      f"{WARM_PASSES} times in a row, each pass one sample of the median. On FUSE targets "
      "each warm pass is paired: the backing file is read just before and just after it, "
      "and the paired row divides the mount's speed by their mean.")
    P("- CPU per GiB: the daemon row counts the daemon process only; the whole-box row counts "
      "every CPU's busy time (/proc/stat) during write + fsync, minus the slave processes' "
      "own CPU. passthrough_hp's writeback cache moves the copy into the page cache to the "
      "writer and the flush to kernel threads, which its daemon row does not see.")
    P("- tdfs is asynchronous: its write numbers are the master's speed; the catch-up table "
      "shows how far the replicas were behind when the workload ended.")
    if not shutil.which("fio") or a.no_fio:
        P(f"- Random I/O: python os.pread/os.pwrite loop of {a.py_ops:,} ops (fio not used).")
    else:
        P(f"- Random I/O: fio, psync engine, 1 job, 4 KiB, {a.fio_runtime} s time-based, "
          "--invalidate=0 on a file just read in full (warm). On FUSE targets the paired "
          "row reads the same file from the backing directory for half as long just before "
          "and just after the mount's run and divides by their mean: the box drifts over the "
          "minutes between targets, and this ratio is free of that drift.")
    for n in b.notes:
        P(f"- {n}")
    return "\n".join(out) + "\n"


def fmt3(x):
    return "–" if x is None else f"{x:.3f}"


def relay_report(b, P):
    a, R = b.a, b.res
    rl = R.get("relays", {})
    if not rl:
        return
    P(f"## Relays (issue #19): master seq write {a.scale_mib} MiB, 8 or 2 replicas (median)\n")
    P("Lag: files written at a steady rate, ms from close on the mount to full content on "
      "the replica (a direct slave; behind a relay, a leaf)."
      + (f" Master flags: `{a.relays_master_args}`." if a.relays_master_args else "") + "\n")
    P("| setup | replicas | master MiB/s | master CPU s/GiB | replicated MiB/s (all identical) "
      "| lag p50 ms | lag p99 ms |")
    P("|---|---|---|---|---|---|---|")
    rows = (("direct2", "2 direct slaves", 2), ("direct8", "8 direct slaves", 8),
            ("relays2x3", "2 relays x 3 leaves", 8))
    for key, desc, n in rows:
        lags = b.relay_lags.get(key, [])
        P(f"| {desc} | {n} | {fmt(med(rl.get(f'master_{key}', [])))} | "
          f"{fmt(med(rl.get(f'cpu_master_{key}', [])))} | "
          f"{fmt(med(rl.get(f'repl_{key}', [])))} | "
          f"{fmt(pct(lags, 0.5)) if lags else '–'} | {fmt(pct(lags, 0.99)) if lags else '–'} |")
    c2, cr = med(rl.get("cpu_master_direct2", [])), med(rl.get("cpu_master_relays2x3", []))
    lags = {k: b.relay_lags.get(k, []) for k in ("direct2", "direct8", "relays2x3")}
    P("")
    if c2 and cr:
        P(f"- Goal: master CPU/GiB with 2 relays x 3 leaves within 10% of 2 direct slaves: "
          f"{cr / c2:.2f}x {'met' if cr <= c2 * 1.1 else '**not met**'}")
    lr = lags["relays2x3"]
    # A leaf's lag against a direct slave's under the same load (8 replicas sharing this
    # box's two cores), and against the 2-replica setup, whose slaves have the cores almost
    # to themselves.
    for key, what in (("direct8", "a direct slave's with as many replicas (8)"),
                      ("direct2", "a direct slave's with 2 replicas")):
        if lags[key] and lr:
            pd, pr = pct(lags[key], 0.99), pct(lr, 0.99)
            P(f"- Goal: leaf lag p99 at most 2x {what}: {pr:.2f} vs {pd:.2f} ms = "
              f"{pr / pd:.2f}x {'met' if pr <= 2 * pd else '**not met**'}")
    P("- Lag runs start with the big file removed and the tree synced, so they time the "
      "replication path, not the writeback of 512 MiB per replica.")
    P("")


def meta_report(b, P):
    """Metadata tables: seconds per command (median) and, in parentheses, the time relative
    to native measured in the same run (lower is better; 1.50× = half again as long)."""
    R, a = b.res, b.a
    names = [t.name for t in b.meta_targets]
    if not names or not any(k.startswith("meta:") for n in names for k in R.get(n, {})):
        return
    P("## Metadata (issue #20): seconds (median), and time relative to native (lower is "
      "better)\n")
    P(f"Trees generated at bench time ({', '.join(f'{n:,}' for n in a.meta_files)} files, "
      "about 20 per directory, a git repository of each), extracted through the mount, and "
      "natively as the reference. **cold**: the first pass after `sync; echo 3 > "
      "/proc/sys/vm/drop_caches` (the kernel's dentries, inodes and page cache of the mount "
      f"and of the backing directory emptied); **warm**: {META_WARM} passes right after it. "
      "Paired: each pass through a mount sits between two passes of the same command, cold "
      "or warm alike, on the native copy, and the ratio (in parentheses, median) is to "
      "their mean: free of the box's drift between targets. `stat`: lstat of every file "
      "and symlink from Python; `git status` with GIT_OPTIONAL_LOCKS=0 (it never writes the "
      "index).\n")
    for phase in ("warm", "cold"):
        P(f"### {phase}\n")
        P("| files | command | native | " + " | ".join(names) + " |")
        P("|---|---|---|" + "---|" * len(names))
        for n in a.meta_files:
            for cmd in META_CMDS:
                key = f"meta:{n}:{cmd}:{phase}"
                cells = [fmt3(med(R.get("native", {}).get(key, [])))]
                for t in names:
                    v = med(R.get(t, {}).get(key, []))
                    c = fmt3(v)
                    r = med(R.get(t, {}).get(key + ":paired", []))
                    if v is not None and r is not None:
                        c += f" ({r:.2f}×)"
                    cells.append(c)
                P(f"| {n:,} | `{cmd}` | " + " | ".join(cells) + " |")
        P("")
    P("| files | extracting the tree (tar -x), seconds | native | " + " | ".join(names) + " |")
    P("|---|---|---|" + "---|" * len(names))
    for n in a.meta_files:
        P(f"| {n:,} | | " + " | ".join(fmt(med(R.get(t, {}).get(f"meta:{n}:extract", [])), "s")
                                    for t in ["native"] + names) + " |")
    P("")


def goals(b, names, P):
    """The issue's goals, as ratios measured in this run (a row is left out when a target it
    needs did not run)."""
    R, a = b.res, b.a

    def m(n, k):
        return med(R.get(n, {}).get(k, []))

    rows = []

    def ratio(label, num, den, need, lower_is_better=False):
        if num is None or den is None or not den:
            return
        r = num / den
        ok = r <= need if lower_is_better else r >= need
        rows.append((label, f"{r:.2f}×", f"{'≤' if lower_is_better else '≥'} {need}×",
                     "yes" if ok else "**no**"))

    for t in ("tdfs-0", "tdfs-1"):
        if t not in names:
            continue
        for k, what in (("seqread_cold", "seq read cold"), ("seqread_warm", "seq read warm"),
                        ("randread", "4 KiB random read")):
            ratio(f"{what}, {t} / native", m(t, k), m("native", k), 0.9)
        ratio(f"seq read warm, {t} / the same file read directly (paired)",
              m(t, "seqread_warm_paired"), 1.0, 0.9)
        ratio(f"4 KiB random read, {t} / the same file read directly (paired)",
              m(t, "randread_paired"), 1.0, 0.9)
    ratio("seq write, tdfs-0 / passthrough_hp", m("tdfs-0", "seqwrite"),
          m("passthrough_hp", "seqwrite"), 1.0)
    ratio("seq write, tdfs-1 / passthrough_hp", m("tdfs-1", "seqwrite"),
          m("passthrough_hp", "seqwrite"), 0.8)
    ratio("untar time, tdfs-1 / passthrough_hp", m("tdfs-1", "untar"),
          m("passthrough_hp", "untar"), 1.0, lower_is_better=True)
    ratio(f"create files/s (first {a.create_split:,}), tdfs-1 / passthrough_hp",
          m("tdfs-1", "create_first"), m("passthrough_hp", "create_first"), 1.0)
    ratio("daemon CPU per GiB (write + fsync), tdfs-1 master / passthrough_hp",
          m("tdfs-1", "cpu_daemon_per_gib"), m("passthrough_hp", "cpu_daemon_per_gib"), 1.5,
          lower_is_better=True)
    ratio("CPU per GiB (write + fsync), whole box minus the slave process, tdfs-1 / "
          "passthrough_hp", m("tdfs-1", "cpu_box_per_gib"), m("passthrough_hp", "cpu_box_per_gib"),
          1.5, lower_is_better=True)
    if b.lag_samples:
        s = b.lag_samples
        rows.append(("replication lag p50", f"{pct(s, .5):.2f} ms", "≤ 1 ms",
                     "yes" if pct(s, .5) <= 1 else "**no**"))
        rows.append(("replication lag p99", f"{pct(s, .99):.2f} ms", "≤ 5 ms",
                     "yes" if pct(s, .99) <= 5 else "**no**"))
    burst = med(R.get("repl", {}).get("burst_catchup", []))
    if burst is not None:
        rows.append(("end of burst → replicas identical", f"{burst * 1000:.0f} ms", "≤ 100 ms",
                     "yes" if burst <= 0.1 else "**no**"))
    sc = R.get("scale", {})
    base = med(sc.get("master_0", []))
    for n in a.scale_slaves:
        v = med(sc.get(f"master_{n}", []))
        if n and base and v and n <= 4:
            per = (1 - v / base) / n * 100
            rows.append((f"master throughput cost per slave, {n} slave(s)", f"{per:.0f}%",
                         "≤ 10%", "yes" if per <= 10 else "**no**"))
    # Issue #20 (the metadata goals per command are in their own table, see meta_goals):
    # creating and deleting files at least half as fast as native with one slave.
    for k, what in (("create", "create"), ("delete", "delete")):
        ratio(f"{what} {a.files:,} files/s, tdfs-1 / native", m("tdfs-1", k), m("native", k), 0.5)
    if rows:
        P("## Goals (issues #5 and #20), measured in this run\n")
        P("| goal | measured | wanted | met |")
        P("|---|---|---|---|")
        for r in rows:
            P("| " + " | ".join(r) + " |")
        P("")
    meta_goals(b, names, P)


def meta_goals(b, names, P):
    """Issue #20's metadata goals per tree and command, as time ratios measured in this run:
    warm within 1.5× native, cold within 3× native and ahead of (below 1× of)
    passthrough_hp and bindfs."""
    R, a = b.res, b.a

    def m(n, k):
        return med(R.get(n, {}).get(k, []))

    tds = [t for t in ("tdfs-0", "tdfs-1") if t in names]
    others = [o for o in ("passthrough_hp", "bindfs") if o in names]
    cols = ([(t, "warm", "native", 1.5) for t in tds] + [(t, "cold", "native", 3.0) for t in tds]
            + [(t, "cold", o, 1.0) for t in tds for o in others])
    if not tds or not any(m(tds[0], f"meta:{n}:{c}:warm") for n in a.meta_files
                          for c in META_CMDS):
        return

    def paired(t, key):
        # each target's ratio to the native copy, measured around its own passes
        return 1.0 if t == "native" else m(t, key + ":paired")
    P("## Metadata goals (issue #20): time relative to the reference, measured in this run\n")
    P("| files | command | " + " | ".join(f"{t} {ph} / {ref} (≤ {need}×)"
                                          for t, ph, ref, need in cols) + " |")
    P("|---|---|" + "---|" * len(cols))
    met = total = 0
    for n in a.meta_files:
        for cmd in META_CMDS:
            cells = []
            for t, ph, ref, need in cols:
                key = f"meta:{n}:{cmd}:{ph}"
                v, r = paired(t, key), paired(ref, key)
                if v is None or not r:
                    cells.append("–")
                    continue
                ok = v / r <= need
                met, total = met + ok, total + 1
                cells.append(f"{v / r:.2f}×" + ("" if ok else " **no**"))
            P(f"| {n:,} | `{cmd}` | " + " | ".join(cells) + " |")
    P(f"\n{met} of {total} met.\n")


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------

BINS = {}


def make_tarball(work, nfiles, src="/usr/include"):
    """A tarball of the first NFILES regular files under SRC (sorted), made at bench time."""
    files = []
    for dp, dns, fns in os.walk(src):
        dns.sort()
        for fn in sorted(fns):
            p = os.path.join(dp, fn)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append(p)
    files.sort()
    files = files[:nfiles]
    path = os.path.join(work, "source.tar")
    total = 0
    with tarfile.open(path, "w") as tf:
        for p in files:
            tf.add(p, arcname=os.path.relpath(p, os.path.dirname(src)), recursive=False)
            total += os.path.getsize(p)
    return path, len(files), total


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per target (median; default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke version: 64 MiB, 2,000 files, 1 run, short fio, fewer scale points")
    ap.add_argument("--out", help="markdown file for the tables (default /tmp/tdfs-bench-<time>.md; "
                                  "raw numbers go next to it as .json)")
    ap.add_argument("--targets", help="comma-separated subset of: native,bindfs,passthrough_hp,"
                                      "passthrough_hp-nocache,tdfs-0,tdfs-1,tdfs-1-z1,tdfs-2")
    ap.add_argument("--sections", default="workloads,repl,scale,metadata,relays,security",
                    help="comma-separated subset of workloads,repl,scale,metadata,relays,security")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[@N]:DIR[:ARGS]",
                    help="another tdfs target with N local slaves (default 0), tdfs-N-NAME: "
                         "the master in DIR (empty: the one built) with extra flags ARGS, to "
                         "compare settings or builds side by side; repeatable")
    ap.add_argument("--meta-files",
                    help="tree sizes of the metadata section (default 5000,100000; "
                         "--quick: 2000)")
    ap.add_argument("--relays-master-args", default="",
                    help="extra master flags in the relays section (e.g. '--queue-size 1024': "
                         "a relay starved of CPU by its leaves on this one box then never "
                         "makes the master spill, isolating the cost of fan-out itself)")
    ap.add_argument("--sec-mib", type=int, default=1024,
                    help="size of the write in the security section (MiB)")
    ap.add_argument("--skip", default="", help="workloads to skip: seqwrite,random,smallfiles,untar,clone")
    ap.add_argument("--size-mib", type=int, help="sequential write/read size (default 1024)")
    ap.add_argument("--rand-mib", type=int, help="random I/O file size (default 256)")
    ap.add_argument("--files", type=int, help="small files (default 20000)")
    ap.add_argument("--tar-files", type=int, help="files in the source tarball (default 3000)")
    ap.add_argument("--scale-mib", type=int, help="scale write size (default 512)")
    ap.add_argument("--scale-slaves", help="slave counts for the scale table (default 0,1,2,4,8)")
    ap.add_argument("--fio-runtime", type=int, help="seconds per fio job (default 8)")
    ap.add_argument("--zero-data", action="store_true", help="write zeros instead of random data")
    ap.add_argument("--no-fio", action="store_true", help="python random I/O loop instead of fio")
    ap.add_argument("--py-ops", type=int, default=20000, help="ops of the python random I/O loop")
    ap.add_argument("--passthrough-hp", default=PTHP_DEFAULT, help="passthrough_hp binary")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--bin-dir", help="directory with tdfs and tdfs-slave (implies --no-build)")
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"),
                    help="where the fresh work directory is made (default $TMPDIR or /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-hold-memory", action="store_true",
                    help="do not hold off VM free page reporting nor pre-touch memory (by "
                         "default, where /sys/module/page_reporting/parameters/min_free_ms "
                         "exists, the run sets it and max_waiting_mib to their largest "
                         "accepted values, restoring them at exit, and pre-touches memory)")
    ap.add_argument("--prefault-gib", type=float, default=8, metavar="N",
                    help="GiB of anonymous memory touched once before the run while free page "
                         "reporting is held off (default 8; never more than half of "
                         "MemAvailable; 0: none)")
    a = ap.parse_args()
    q = a.quick
    a.size_mib = a.size_mib or (64 if q else 1024)
    a.rand_mib = a.rand_mib or (32 if q else 256)
    a.files = a.files or (2000 if q else 20000)
    a.create_split = min(CREATE_SPLIT, a.files)
    a.tar_files = a.tar_files or (500 if q else 3000)
    a.scale_mib = a.scale_mib or (64 if q else 512)
    a.scale_slaves = [int(x) for x in (a.scale_slaves or ("0,1,2" if q else "0,1,2,4,8")).split(",")]
    a.fio_runtime = a.fio_runtime or (2 if q else 8)
    if q and "--runs" not in sys.argv:
        a.runs = 1
    a.lag_rate = 500
    a.lag_secs = 2 if q else 5
    a.burst = 1000
    a.wire_mib = 16 if q else 128
    a.skip = set(x for x in a.skip.split(",") if x)
    a.sections = set(a.sections.split(","))
    a.meta_files = [int(x) for x in (a.meta_files or ("2000" if q else "5000,100000")).split(",")]
    return a


def variant_name(spec):
    """tdfs-N-NAME for a --variant NAME[@N]:..."""
    name, _, slaves = spec.partition(":")[0].partition("@")
    return f"tdfs-{int(slaves or 0)}-{name}"


def build_targets(a):
    pthp = a.passthrough_hp
    all_t = [Native()]
    skipped = []
    if shutil.which("bindfs"):
        all_t.append(SimpleFuse("bindfs", "bindfs --multithreaded -o big_writes (fuse2), foreground",
                                lambda s, m: ["bindfs", "-f", "--multithreaded", "-o", "big_writes",
                                              s, m]))
    else:
        skipped.append(("bindfs", "not installed (scripts/bench/setup.sh or apt-get install bindfs)"))
    if os.access(pthp, os.X_OK):
        all_t.append(SimpleFuse("passthrough_hp", "libfuse example/passthrough_hp, default options "
                                "(writeback cache, keep_cache, 1-day attr/entry timeouts, splice)",
                                lambda s, m: [pthp, "--foreground", s, m]))
        all_t.append(SimpleFuse("passthrough_hp-nocache", "passthrough_hp --nocache (no writeback "
                                "cache, no keep_cache, zero timeouts; closer to tdfs' settings)",
                                lambda s, m: [pthp, "--foreground", "--nocache", s, m]))
    else:
        skipped.append(("passthrough_hp", f"{pthp} not built (run scripts/bench/setup.sh)"))
    all_t += [Tdfs("tdfs-0", 0), Tdfs("tdfs-1", 1, 0), Tdfs("tdfs-1-z1", 1, 1), Tdfs("tdfs-2", 2)]
    for v in a.variant:
        # NAME[@SLAVES]:DIR[:ARGS]: a master built elsewhere (DIR/tdfs; empty: this one)
        # and/or with other flags, beside the others in the same run.
        name, _, rest = v.partition(":")
        name, _, slaves = name.partition("@")
        bindir, _, args = rest.partition(":")
        n = int(slaves or 0)
        t = Tdfs(variant_name(v), n, extra=shlex.split(args),
                 master=os.path.join(bindir, "tdfs") if bindir else None)
        t.desc = (f"tdfs, {n} local slave{'s' if n != 1 else ''}, master "
                  f"{t.master_bin or 'as built'} {args}").rstrip()
        all_t.append(t)
    if a.targets:
        want = a.targets.split(",")
        unknown = set(want) - {t.name for t in all_t} - {n for n, _ in skipped}
        if unknown:
            raise SystemExit(f"unknown targets: {','.join(sorted(unknown))}")
        variants = {variant_name(v) for v in a.variant}
        all_t = [t for t in all_t if t.name in want or t.name in variants]
        skipped = [(n, w) for n, w in skipped if n in want]
    return all_t, skipped


def main():
    a = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE mounts with allow_other, drop_caches)")
    if not os.path.exists("/dev/fuse"):
        raise SystemExit("/dev/fuse is missing")
    if a.bin_dir:
        bindir = a.bin_dir
    else:
        bindir = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")),
                              "release")
        if not a.no_build:
            log("cargo build --release -p tdfs -p tdfs-slave")
            subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "tdfs", "-p",
                            "tdfs-slave"], cwd=REPO, check=True)
    BINS["master"] = os.path.join(bindir, "tdfs")
    BINS["slave"] = os.path.join(bindir, "tdfs-slave")
    for b in BINS.values():
        if not os.access(b, os.X_OK):
            raise SystemExit(f"missing binary {b}")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = a.out or os.path.join("/tmp", f"tdfs-bench-{stamp}.md")

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    targets, skipped = build_targets(a)
    b = Bench(a)
    # Metadata runs on the targets the issue compares (all of them with --targets).
    # (Native is measured around each of them: see Bench.metadata.)
    variants = {variant_name(v) for v in a.variant}
    b.meta_targets = [t for t in targets if t.name != "native" and (
        a.targets or t.name in META_TARGETS or t.name in variants)]
    b.lag_samples = []
    b.relay_lags = {}
    REG.work = tempfile.mkdtemp(prefix="tdfs-bench.", dir=a.workdir)
    os.chmod(REG.work, 0o755)
    b.work = REG.work
    ok = False
    try:
        # First, inside the try: the registry writes the saved settings back in any case.
        note = hold_memory(a)
        log(note)
        b.notes.append(note)
        b.tarball, b.tar_files, b.tar_bytes = make_tarball(REG.work, a.tar_files)
        b.tar_mib = b.tar_bytes / MiB
        log(f"source tarball: {b.tar_files} files, {b.tar_mib:.1f} MiB from /usr/include")
        t_start = time.monotonic()
        cpu0 = cpu_times()
        for run in range(1, a.runs + 1):
            if "workloads" in a.sections:
                for t in targets:
                    b.run_target(t, run)
            if "repl" in a.sections:
                log(f"run {run}: replication metrics")
                b.repl_lag(run)
                b.repl_wire(run)
            if "scale" in a.sections:
                b.scale(run)
            if "metadata" in a.sections:
                b.metadata(run)
            if "relays" in a.sections:
                b.relays(run)
            if "security" in a.sections:
                b.security(run)
        cpu1 = cpu_times()
        stolen = (cpu1[1] - cpu0[1]) / max(1, cpu1[0] - cpu0[0]) * 100
        rev = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip()
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
        fstype = next((l.split()[2] for l in open("/proc/mounts")
                       if l.split()[1] == subprocess.run(["findmnt", "-no", "TARGET", "-T", a.workdir],
                                                         capture_output=True, text=True).stdout.strip()),
                      "?")
        env = {
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cmd": " ".join(["scripts/bench/run.py"] + sys.argv[1:]),
            "machine": f"{platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs, "
                       f"{mem:.0f} GiB RAM, work dir on {fstype} ({a.workdir}); "
                       f"{stolen:.1f}% of CPU time stolen by the hypervisor during the run "
                       "(more than a few % makes single rows noisy)",
            "rev": rev or "?",
        }
        text = report(b, targets, skipped, env)
        text += f"\nTotal time: {(time.monotonic() - t_start) / 60:.1f} min.\n"
        with open(out, "w") as f:
            f.write(text)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({"results": b.res, "lag_ms": b.lag_samples, "notes": b.notes,
                       "env": env}, f, indent=1)
        print(text)
        log(f"tables written to {out} (raw numbers: {os.path.splitext(out)[0]}.json)")
        ok = True
    except KeyboardInterrupt as e:
        warn(f"interrupted ({e}); cleaning up")
    except (BenchError, subprocess.CalledProcessError) as e:
        warn(f"benchmark failed: {e}; cleaning up")
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        REG.cleanup(keep=a.keep)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_DFL)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
