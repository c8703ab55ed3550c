//! Everything a native filesystem accepts works through the mount and lands identically on
//! the replicas: direct I/O, whiteouts, inode flags, O_DSYNC writes, operations that fail
//! after changing something; then the random operation generator (`randops`) run
//! concurrently against the mount (replicas compared on every attribute), and the same
//! sequence run on a native directory and on the mount (outcomes compared op by op).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tdfs_tests::util::{
    assert_errno, inode_flags, pseudo_random, rename2, set_inode_flags, temp_dir, wait_until,
};
use tdfs_tests::{Cluster, ClusterOpts, SlaveOpts};

const FS_APPEND_FL: u32 = 0x20;
const FS_IMMUTABLE_FL: u32 = 0x10;
const FS_NODUMP_FL: u32 = 0x40;
const FS_NOATIME_FL: u32 = 0x80;

/// A page-aligned buffer, as O_DIRECT wants.
struct Aligned(*mut u8, usize);

impl Aligned {
    fn new(data: &[u8]) -> Self {
        let mut p: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: posix_memalign writes an aligned allocation of the size asked.
        assert_eq!(unsafe { libc::posix_memalign(&mut p, 4096, data.len()) }, 0);
        // SAFETY: fresh allocation of data.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast(), data.len()) };
        Aligned(p.cast(), data.len())
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated by posix_memalign.
        unsafe { libc::free(self.0.cast()) };
    }
}

#[test]
fn direct_io_writes_land_on_replicas() {
    let mut c = Cluster::single("odirect");
    // What `dd oflag=direct bs=4096 count=2` does, then a write at an aligned offset of an
    // existing file, through both a write-only and a read-write open.
    let a = pseudo_random(1, 8192);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(c.at("direct"))
        .unwrap();
    let buf = Aligned::new(&a);
    // SAFETY: buf readable for its length.
    let n = unsafe { libc::pwrite(f.as_raw_fd(), buf.0.cast(), buf.1, 0) };
    assert_eq!(
        n,
        8192,
        "O_DIRECT pwrite: {}",
        std::io::Error::last_os_error()
    );
    drop(f);
    let b = pseudo_random(2, 4096);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(c.at("direct"))
        .unwrap();
    let buf = Aligned::new(&b);
    // SAFETY: as above.
    let n = unsafe { libc::pwrite(f.as_raw_fd(), buf.0.cast(), buf.1, 4096) };
    assert_eq!(n, 4096, "O_DIRECT pwrite, read-write open");
    drop(f);
    let mut want = a.clone();
    want[4096..].copy_from_slice(&b);
    c.finish();
    for r in c.roots() {
        assert_eq!(fs::read(r.join("direct")).unwrap(), want, "{}", r.display());
    }
}

#[test]
fn rename_whiteout_leaves_a_whiteout_everywhere() {
    let mut c = Cluster::single("whiteout");
    fs::create_dir(c.at("d")).unwrap();
    fs::write(c.at("d/upper"), b"u").unwrap();
    rename2(&c.at("d/upper"), &c.at("d/moved"), libc::RENAME_WHITEOUT).expect("RENAME_WHITEOUT");
    let m = fs::symlink_metadata(c.at("d/upper")).unwrap();
    assert!(
        m.file_type().is_char_device(),
        "a whiteout is a char device"
    );
    assert_eq!(m.rdev(), 0, "a whiteout is device 0:0");
    c.finish();
    for r in c.roots() {
        let m = fs::symlink_metadata(r.join("d/upper")).unwrap();
        assert!(
            m.file_type().is_char_device() && m.rdev() == 0,
            "{}",
            r.display()
        );
        assert_eq!(fs::read(r.join("d/moved")).unwrap(), b"u");
    }
}

#[test]
fn inode_flags_are_replicated_and_enforced() {
    let mut c = Cluster::single("chattr");
    fs::write(c.at("log"), b"line 1\n").unwrap();
    set_inode_flags(&c.at("log"), FS_APPEND_FL).expect("chattr +a through the mount");
    assert_eq!(
        inode_flags(&c.at("log")).unwrap().0,
        FS_APPEND_FL,
        "lsattr through the mount"
    );
    // Append-only: appends work (and replicate, times and all), overwrites do not.
    OpenOptions::new()
        .append(true)
        .open(c.at("log"))
        .unwrap()
        .write_all(b"line 2\n")
        .unwrap();
    assert_errno(
        OpenOptions::new().write(true).open(c.at("log")),
        libc::EPERM,
        "open for overwrite of an append-only file",
    );
    assert_errno(
        fs::remove_file(c.at("log")),
        libc::EPERM,
        "unlink append-only",
    );
    fs::write(c.at("frozen"), b"keep").unwrap();
    set_inode_flags(&c.at("frozen"), FS_IMMUTABLE_FL).unwrap();
    assert_errno(
        fs::write(c.at("frozen"), b"x"),
        libc::EPERM,
        "write immutable",
    );
    assert_errno(
        fs::rename(c.at("frozen"), c.at("thawed")),
        libc::EPERM,
        "rename immutable",
    );
    fs::write(c.at("quiet"), b"q").unwrap();
    set_inode_flags(&c.at("quiet"), FS_NOATIME_FL | FS_NODUMP_FL).unwrap();
    // A directory: append-only lets entries in but not out.
    fs::create_dir(c.at("spool")).unwrap();
    fs::write(c.at("spool/old"), b"o").unwrap();
    set_inode_flags(&c.at("spool"), FS_APPEND_FL).unwrap();
    fs::write(c.at("spool/new"), b"n").unwrap();
    assert_errno(
        fs::remove_file(c.at("spool/old")),
        libc::EPERM,
        "unlink in +a dir",
    );
    c.wait_replicas(Duration::from_secs(30));
    for (name, want) in [
        ("log", FS_APPEND_FL),
        ("frozen", FS_IMMUTABLE_FL),
        ("quiet", FS_NOATIME_FL | FS_NODUMP_FL),
        ("spool", FS_APPEND_FL),
    ] {
        assert_eq!(
            inode_flags(&c.replica(0).join(name)).unwrap().0,
            want,
            "{name} on the replica"
        );
    }
    // Lifting the flags replicates too, and then the changes they blocked do.
    set_inode_flags(&c.at("frozen"), 0).unwrap();
    fs::write(c.at("frozen"), b"thawed").unwrap();
    set_inode_flags(&c.at("spool"), 0).unwrap();
    fs::remove_file(c.at("spool/old")).unwrap();
    c.finish();
    assert_eq!(
        fs::read(c.replica(0).join("log")).unwrap(),
        b"line 1\nline 2\n"
    );
    assert_eq!(fs::read(c.replica(0).join("frozen")).unwrap(), b"thawed");
}

#[test]
fn inode_flags_survive_a_sync() {
    // The slave is away while flags are set (and a flagged tree is removed on the master
    // that the replica still holds): the catch-up sync must get through the replica's
    // immutable and append-only inodes, and leave the master's flags.
    let mut c = Cluster::start(
        "chattr-sync",
        ClusterOpts {
            populate: Some(|b: &Path| {
                fs::create_dir_all(b.join("gone/sub")).unwrap();
                fs::write(b.join("gone/sub/f"), b"f").unwrap();
            }),
            ..Default::default()
        },
    );
    c.wait_replicas(Duration::from_secs(30));
    // Lock the tree on the replica the way the master will have (by hand: the replica
    // does not know yet).
    set_inode_flags(&c.replica(0).join("gone/sub/f"), FS_IMMUTABLE_FL).unwrap();
    set_inode_flags(&c.replica(0).join("gone/sub"), FS_APPEND_FL).unwrap();
    c.slaves[0].stop();
    fs::remove_file(c.at("gone/sub/f")).unwrap();
    fs::remove_dir(c.at("gone/sub")).unwrap();
    fs::remove_dir(c.at("gone")).unwrap();
    fs::create_dir(c.at("locked")).unwrap();
    fs::write(c.at("locked/inside"), pseudo_random(3, 100_000)).unwrap();
    set_inode_flags(&c.at("locked/inside"), FS_IMMUTABLE_FL).unwrap();
    set_inode_flags(&c.at("locked"), FS_IMMUTABLE_FL).unwrap();
    fs::write(c.at("app"), b"a").unwrap();
    set_inode_flags(&c.at("app"), FS_APPEND_FL | FS_NODUMP_FL).unwrap();
    c.slaves[0].restart();
    c.wait_replicas(Duration::from_secs(60));
    c.finish();
}

fn small_tmpfs(dir: &Path) {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tdfs-test-backing"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs on {}", dir.display());
}

#[test]
fn failed_write_that_moved_times_is_mirrored() {
    // tmpfs (like ext4) moves a file's mtime before it finds the disk full: the write
    // fails, the backing file's times changed, and the replica must follow.
    let mut c = Cluster::start(
        "full-master",
        ClusterOpts {
            backing_setup: Some(small_tmpfs),
            ..Default::default()
        },
    );
    fs::write(c.at("victim"), b"v").unwrap();
    let mut filler = fs::File::create(c.at("filler")).unwrap();
    let chunk = pseudo_random(4, 64 * 1024);
    loop {
        match filler.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the backing tmpfs: {e}"),
        }
    }
    drop(filler);
    c.wait_replicas(Duration::from_secs(30));
    let before = fs::metadata(c.backing.join("victim")).unwrap().mtime_nsec();
    let mut failures = 0;
    let f = OpenOptions::new().write(true).open(c.at("victim")).unwrap();
    // Enough tries that the clock moves between two of them whatever its granularity.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::metadata(c.backing.join("victim")).unwrap().mtime_nsec() == before
        && Instant::now() < deadline
    {
        let big = pseudo_random(5, 1 << 20);
        // SAFETY: big readable for its length.
        let n = unsafe { libc::pwrite(f.as_raw_fd(), big.as_ptr().cast(), big.len(), 8192) };
        if n < 0 {
            failures += 1;
        }
    }
    drop(f);
    assert!(failures > 0, "no write failed on the full backing tmpfs");
    assert_ne!(
        fs::metadata(c.backing.join("victim")).unwrap().mtime_nsec(),
        before,
        "the failed writes did not move the backing file's mtime: the test proves nothing"
    );
    c.finish();
}

#[test]
fn o_dsync_write_is_a_barrier_on_a_direct_open() {
    // With the only slave frozen, a plain write returns at once; an O_DSYNC write (on the
    // write-only, direct-I/O open most writers use) waits for the slave, up to
    // --sync-timeout, like fsync.
    let mut c = Cluster::start(
        "dsync",
        ClusterOpts {
            extra_master_args: vec!["--sync-timeout".into(), "2".into()],
            ..Default::default()
        },
    );
    fs::write(c.at("warm"), b"w").unwrap();
    c.wait_replicas(Duration::from_secs(30));
    wait_until(Duration::from_secs(10), || {
        Command::new(tdfs_tests::bin("tdfs"))
            .args(["status", "--state-dir"])
            .arg(&c.master_state)
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("streaming"))
    });
    c.slaves[0].freeze();
    let t = Instant::now();
    fs::write(c.at("plain"), b"p").unwrap();
    let plain = t.elapsed();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .open(c.at("dsync"))
        .unwrap();
    let t = Instant::now();
    f.write_all(b"durable").unwrap();
    let dsync = t.elapsed();
    drop(f);
    c.slaves[0].thaw();
    assert!(
        plain < Duration::from_millis(1500),
        "a plain write waited {plain:?} for a frozen slave"
    );
    assert!(
        dsync >= Duration::from_millis(1900),
        "an O_DSYNC write returned after {dsync:?}, before the slave could have made it durable"
    );
    c.finish();
}

/// The kinds the mount refuses on purpose, each with its reason (also in the README).
const EXCEPTIONS: &[(&str, &str)] = &[
    (
        "fallocate-collapse",
        "the kernel's FUSE fallocate passes only keep-size, punch-hole and zero-range",
    ),
    (
        "fallocate-insert",
        "the kernel's FUSE fallocate passes only keep-size, punch-hole and zero-range",
    ),
    ("tmpfile", "fuser 0.18 has no TMPFILE operation"),
    ("tmpfile-link", "fuser 0.18 has no TMPFILE operation"),
];

/// One exception kind, done where it should work: in a fresh directory `dir`.
fn try_exception(dir: &Path, kind: &str) -> std::io::Result<()> {
    fs::create_dir(dir)?;
    match kind {
        "fallocate-collapse" | "fallocate-insert" => {
            let f = fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join("f"))?;
            f.set_len(64 * 1024)?;
            let mode = if kind == "fallocate-collapse" {
                libc::FALLOC_FL_COLLAPSE_RANGE
            } else {
                libc::FALLOC_FL_INSERT_RANGE
            };
            // SAFETY: plain syscall on a live fd.
            tdfs_tests::util::check(unsafe { libc::fallocate(f.as_raw_fd(), mode, 4096, 4096) })
                .map(drop)
        }
        _ => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .open(dir)?;
            (&f).write_all(b"t")?;
            if kind == "tmpfile-link" {
                let from = std::ffi::CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))
                    .expect("no NUL");
                let to = tdfs_tests::util::cstr(&dir.join("linked"));
                // SAFETY: valid C strings.
                tdfs_tests::util::check(unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        from.as_ptr(),
                        libc::AT_FDCWD,
                        to.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                })?;
            }
            Ok(())
        }
    }
}

fn randops() -> &'static str {
    env!("CARGO_BIN_EXE_randops")
}

/// Runs `randops DIR SEED COUNT ARGS...`; its per-operation lines. Bounded: a run still
/// going after 10 minutes is stuck in the mount, and fails the test.
fn run_randops(dir: &Path, seed: u64, count: u64, args: &[&str]) -> Vec<String> {
    let mut child = Command::new(randops())
        .arg(dir)
        .arg(seed.to_string())
        .arg(count.to_string())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running randops");
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).map(|_| s)
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "randops {} {seed} still running after 10 minutes",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "randops {} {seed} failed", dir.display());
    reader
        .join()
        .unwrap()
        .expect("randops output")
        .lines()
        .map(String::from)
        .collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seed for this run: `TDFS_RANDOPS_SEED`, or one from the clock (printed, so that a
/// failure replays).
fn base_seed() -> u64 {
    std::env::var("TDFS_RANDOPS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        })
}

#[test]
fn random_operations_leave_identical_replicas() {
    let seed = base_seed();
    let rounds = env_u64("TDFS_RANDOPS_ROUNDS", 2);
    let count = env_u64("TDFS_RANDOPS_COUNT", 2500);
    eprintln!(
        "random operations: base seed {seed} ({rounds} rounds of 4 processes x {count} ops; \
         replay with TDFS_RANDOPS_SEED={seed})"
    );
    let mut c = Cluster::start(
        "randops",
        ClusterOpts {
            slaves: vec![
                SlaveOpts::default(),
                SlaveOpts {
                    compress: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    );
    let exclude = EXCEPTIONS.iter().map(|e| e.0).collect::<Vec<_>>().join(",");
    for round in 0..rounds {
        let dir = c.at(&format!("r{round}"));
        fs::create_dir(&dir).unwrap();
        // Three processes as root, one as nobody (mostly refused: permission failures
        // must leave the replicas alone too), all in one namespace at once.
        let kids: Vec<_> = (0..4u64)
            .map(|i| {
                let s = seed.wrapping_add(round * 10 + i);
                let mut cmd = Command::new(randops());
                cmd.arg(&dir)
                    .arg(s.to_string())
                    .arg(count.to_string())
                    .args(["--quiet", "--exclude", &exclude]);
                if i == 3 {
                    cmd.args(["--user", "65534"]);
                }
                (s, cmd.spawn().expect("spawn randops"))
            })
            .collect();
        // Bounded: a generator still running after this long is stuck in the mount.
        let deadline = Instant::now() + Duration::from_secs(600);
        for (s, mut k) in kids {
            let st = loop {
                if let Some(st) = k.try_wait().unwrap() {
                    break st;
                }
                if Instant::now() > deadline {
                    let _ = k.kill();
                    panic!(
                        "randops seed {s} still running after 10 minutes (base seed {seed}): \
                         an operation hangs in the mount\n{}",
                        c.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(st.success(), "randops seed {s} failed (base seed {seed})");
        }
        if let Err(e) =
            tdfs_tests::try_wait_identical(&c.backing, c.replica(0), Duration::from_secs(60))
        {
            panic!("round {round} (base seed {seed}): {e}\n{}", c.logs());
        }
    }
    // finish() compares every replica on every attribute, flags included.
    c.finish();
    eprintln!("random operations: base seed {seed} passed");
}

/// Outcome counts of one kind: (ok, failed).
type Tally = BTreeMap<String, (u64, u64, u64, u64)>;

/// Which failure-and-failure errno differences are expected: when two errors apply, the
/// kernel checks a FUSE inode's immutable/append-only flags only in the daemon (it does not
/// know them), so it reports the other error first.
fn errno_order_only(kind: &str, native: &str, tdfs: &str) -> bool {
    native == "EPERM"
        && matches!(tdfs, "ENOTDIR" | "EISDIR")
        && matches!(
            kind,
            "rmdir"
                | "unlink"
                | "rename"
                | "rename-whiteout"
                | "rename-exchange"
                | "rename-noreplace"
        )
}

#[test]
fn native_parity() {
    let seed = base_seed();
    let count = env_u64("TDFS_RANDOPS_COUNT", 2500);
    let seeds = env_u64("TDFS_PARITY_SEEDS", 3);
    eprintln!("native parity: base seed {seed} ({seeds} seeds x {count} ops; replay with TDFS_RANDOPS_SEED={seed})");
    let mut c = Cluster::single("parity");
    let native = temp_dir("parity-native");
    let exclude = EXCEPTIONS.iter().map(|e| e.0).collect::<Vec<_>>().join(",");
    let mut tally = Tally::new();
    let mut problems = Vec::new();
    let compare = |a: &[String], b: &[String], tally: &mut Tally, problems: &mut Vec<String>| {
        assert_eq!(
            a.len(),
            b.len(),
            "the two runs issued different numbers of operations"
        );
        for (x, y) in a.iter().zip(b) {
            let xs: Vec<&str> = x.split(' ').collect();
            let ys: Vec<&str> = y.split(' ').collect();
            if xs[0] == "setup" {
                continue;
            }
            let (kind, n, t) = (xs[1], xs[2], ys[2]);
            let e = tally.entry(kind.to_string()).or_default();
            if n == "ok" {
                e.0 += 1
            } else {
                e.1 += 1
            }
            if t == "ok" {
                e.2 += 1
            } else {
                e.3 += 1
            }
            if n != t && !errno_order_only(kind, n, t) {
                problems.push(format!("op {}: {kind}: native {n}, tdfs {t}", xs[0]));
            }
        }
    };
    for i in 0..seeds {
        let s = seed.wrapping_add(i);
        let nd = native.path().join(format!("s{i}"));
        let md = c.at(&format!("s{i}"));
        fs::create_dir(&nd).unwrap();
        fs::create_dir(&md).unwrap();
        let a = run_randops(&nd, s, count, &["--exclude", &exclude]);
        let b = run_randops(&md, s, count, &["--exclude", &exclude]);
        compare(&a, &b, &mut tally, &mut problems);
    }
    // The exceptions, each tried where it must work: natively they do, through the mount
    // they fail as documented.
    let mut exc = Vec::new();
    for (kind, why) in EXCEPTIONS {
        let n = try_exception(&native.path().join(format!("x-{kind}")), kind);
        let m = try_exception(&c.at(&format!("x-{kind}")), kind);
        let e = tally.entry(format!("{kind} (exception)")).or_default();
        if n.is_ok() {
            e.0 += 1
        } else {
            e.1 += 1
        }
        if m.is_ok() {
            e.2 += 1
        } else {
            e.3 += 1
        }
        exc.push((kind, why, n, m));
    }
    let mut table = String::from(
        "| kind | native ok | native err | tdfs ok | tdfs err |\n|---|---|---|---|---|\n",
    );
    for (k, (a, b, x, y)) in &tally {
        table.push_str(&format!("| {k} | {a} | {b} | {x} | {y} |\n"));
    }
    eprintln!("{table}");
    assert!(
        problems.is_empty(),
        "{} outcome(s) differ between native and tdfs (base seed {seed}):\n{}\n{table}",
        problems.len(),
        problems
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (kind, why, native, tdfs) in exc {
        if let Err(e) = native {
            panic!("{kind} failed natively ({e}): the exception test proves nothing");
        }
        match tdfs {
            Ok(()) => panic!(
                "{kind} now works through the mount: it is no longer an exception ({why}); \
                 update EXCEPTIONS and the README"
            ),
            Err(e) => assert_eq!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP),
                "{kind} through the mount: {e}"
            ),
        }
    }
    // Every kind outside the exceptions succeeded natively at least once and through tdfs
    // as often as natively.
    for (k, (a, _, x, _)) in &tally {
        if k.ends_with("(exception)") {
            continue;
        }
        assert_eq!(a, x, "{k}: {a} successes natively, {x} through tdfs");
    }
    c.finish();
}
