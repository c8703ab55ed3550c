//! Small helpers: locating binaries, preconditions, polling, syscall wrappers.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Directory holding the `tdfs` and `tdfs-slave` binaries: `$TDFS_BIN_DIR`, or the cargo
/// target profile dir of the running test executable (`target/<profile>/deps/<test>` →
/// `target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TDFS_BIN_DIR") {
        return PathBuf::from(d);
    }
    build_daemons();
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a parent dir");
    match deps.parent() {
        Some(p) if deps.file_name().is_some_and(|n| n == "deps") => p.to_path_buf(),
        _ => deps.to_path_buf(),
    }
}

/// Builds `tdfs` and `tdfs-slave` once per test process, so `cargo test --workspace` never
/// runs stale daemons (cargo builds a package's binaries only for that package's own
/// integration tests, and these tests live in another package).
fn build_daemons() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let Some(cargo) = std::env::var_os("CARGO") else {
            return; // not run by cargo: rely on what is built
        };
        let exe = std::env::current_exe().expect("current_exe");
        let release = exe.components().any(|c| c.as_os_str() == "release");
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(["build", "--quiet", "-p", "tdfs", "-p", "tdfs-slave"]);
        // Cargo runs a test with the variables it sets for the test's own crate
        // (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, OUT_DIR, ...). Build scripts that rerun when
        // those change (ring's does) would see this crate's values and rebuild, and the next
        // plain `cargo test` would rebuild them back: about 26 s each way here.
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(set_for_a_crate) {
                cmd.env_remove(k);
            }
        }
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build for the daemons");
        assert!(st.success(), "cargo build of tdfs and tdfs-slave failed");
    });
}

/// Whether cargo sets `var` for the crate it compiles or runs (not for cargo itself).
fn set_for_a_crate(var: &str) -> bool {
    var.starts_with("CARGO_PKG_")
        || var.starts_with("CARGO_BIN_")
        || matches!(
            var,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// Path of a workspace binary; panics with instructions when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.is_file() {
        panic!(
            "binary {} not found: run `cargo build --workspace` first (same profile as the \
             tests), or point TDFS_BIN_DIR at the directory holding `tdfs` and `tdfs-slave`",
            p.display()
        );
    }
    p
}

/// Fails the test (loudly) unless we are root and /dev/fuse exists: mount tests must never
/// pass without a mount.
pub fn require_root_and_fuse() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!("tdfs end-to-end tests must run as root (euid is {euid}): they mount FUSE");
    }
    if !Path::new("/dev/fuse").exists() {
        panic!("/dev/fuse is missing: load the fuse module (modprobe fuse) to run the tests");
    }
}

/// A fresh temp dir under /tmp named `tdfs-test-<what>-XXXXXX`.
pub fn temp_dir(what: &str) -> TempDir {
    TempDir(Some(
        tempfile::Builder::new()
            .prefix(&format!("tdfs-test-{what}-"))
            .tempdir_in("/tmp")
            .expect("create temp dir under /tmp"),
    ))
}

/// A temp dir removed on drop, even where a test left immutable or append-only inodes in it
/// (their flags are cleared first; a plain `tempfile::TempDir` would leave them behind).
pub struct TempDir(Option<tempfile::TempDir>);

impl TempDir {
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("temp dir present").path()
    }

    /// Keeps the directory (for `TDFS_KEEP`) and returns its path.
    pub fn keep(mut self) -> PathBuf {
        self.0.take().expect("temp dir present").keep()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            clear_guard_flags(t.path());
        }
    }
}

/// Clears the immutable and append-only flags of everything beneath `root` (not crossing
/// into other filesystems, never following symlinks).
pub fn clear_guard_flags(root: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(root) else {
        return;
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != top.dev() || !(m.is_dir() || m.is_file()) {
            continue;
        }
        if let Ok((flags, _)) = inode_flags(&p) {
            if flags & GUARD_FLAGS != 0 {
                let _ = set_inode_flags(&p, flags & !GUARD_FLAGS);
            }
        }
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
}

/// Immutable and append-only.
pub const GUARD_FLAGS: u32 = tdfs_protocol::op::GUARD_FLAGS;

fn open_for_flags(p: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOATIME)
        .open(p)
}

/// The replicated inode flags (`lsattr`) and project id of a regular file or directory.
pub fn inode_flags(p: &Path) -> io::Result<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let f = open_for_flags(p)?;
    let mut v: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through a valid pointer.
    check(unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut v) })?;
    let mut x = [0u32; 7];
    // SAFETY: FS_IOC_FSGETXATTR writes a 28-byte struct fsxattr into `x`.
    let projid = match check(unsafe { libc::ioctl(f.as_raw_fd(), 0x801c_581f, x.as_mut_ptr()) }) {
        Ok(_) => x[3],
        Err(_) => 0,
    };
    Ok((v as u32 & tdfs_protocol::op::REPLICATED_FLAGS, projid))
}

/// Sets every inode flag of a regular file or directory (`chattr =...`).
pub fn set_inode_flags(p: &Path, flags: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = open_for_flags(p)?;
    let v = flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int through a valid pointer.
    check(unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &v) })?;
    Ok(())
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
/// Waits until `log()` (a daemon's log, read afresh each time) contains `needle`; panics
/// with that log, naming it `what`, if it does not within `timeout`.
pub fn wait_log(what: &str, timeout: Duration, log: impl Fn() -> String, needle: &str) {
    assert!(
        wait_until(timeout, || log().contains(needle)),
        "{what} log never said {needle:?} within {timeout:?}; log:\n{}",
        log()
    );
}

pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `max` bytes of a (log) file, lossily decoded.
pub fn tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            String::from_utf8_lossy(&b[start..]).into_owned()
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// Converts a libc return value into an io::Result.
pub fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `mountpoint` is currently a fuse mount in /proc/self/mountinfo.
pub fn is_fuse_mounted(mountpoint: &Path) -> bool {
    mount_fstype(mountpoint).is_some_and(|t| t.starts_with("fuse"))
}

/// File system type of the (topmost) mount at exactly `mountpoint`, if any.
pub fn mount_fstype(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 {
            continue;
        }
        if unescape_mountinfo(fields[4]) != want {
            continue;
        }
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if let Some(t) = fields.get(sep + 1) {
            found = Some((*t).to_string());
        }
    }
    found
}

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Lazy-unmounts `path` (MNT_DETACH); errors are ignored (used from Drop).
pub fn lazy_unmount(path: &Path) {
    let c = cstr(path);
    // SAFETY: valid NUL-terminated path.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}

/// Sets atime and mtime of `path` (not following symlinks), as `(seconds, nanoseconds)`;
/// a nanosecond value of `UTIME_NOW` or `UTIME_OMIT` means what it does to utimensat(2).
pub fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let c = cstr(path);
    // SAFETY: valid path and a two-element timespec array.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// `lsetxattr(path, name, value, flags)`.
pub fn set_xattr(path: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let c = cstr(path);
    let n = CString::new(name).expect("xattr name");
    // SAFETY: valid pointers and lengths.
    check(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// `lremovexattr(path, name)`.
pub fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    let c = cstr(path);
    let n = CString::new(name).expect("xattr name");
    // SAFETY: valid pointers.
    check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

/// `lgetxattr(path, name)`; Ok(None) when the attribute does not exist.
pub fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let c = cstr(path);
    let n = CString::new(name).expect("xattr name");
    loop {
        // SAFETY: size query with a null buffer.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENODATA) {
                return Ok(None);
            }
            return Err(e);
        }
        let mut buf = vec![0u8; len as usize];
        // SAFETY: buffer of buf.len() bytes.
        let got =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            if e.raw_os_error() == Some(libc::ENODATA) {
                return Ok(None);
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(Some(buf));
    }
}

/// All xattr names of `path` (not following symlinks).
pub fn list_xattrs(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let c = cstr(path);
    loop {
        // SAFETY: size query with a null buffer.
        let len = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(Vec::new());
            }
            return Err(e);
        }
        let mut buf = vec![0u8; len as usize];
        // SAFETY: buffer of buf.len() bytes.
        let got = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| n.to_vec())
            .collect());
    }
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)`.
pub fn rename2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let f = cstr(from);
    let t = cstr(to);
    // SAFETY: valid paths.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags as libc::c_uint,
        )
    })
}

/// `mknod(path, mode, dev)`.
pub fn mknod(path: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let c = cstr(path);
    // SAFETY: valid path.
    check(unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, dev as libc::dev_t) })
}

/// `lchown(path, uid, gid)`.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// Asserts an io::Result failed with `errno`.
pub fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, errno: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected errno {errno}, got success {v:?}"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: expected errno {errno}, got {e}"
        ),
    }
}

/// Deterministic pseudo-random bytes (xorshift), for incompressible payloads.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs a command, panicking with its output unless it exits 0; returns stdout.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sorted names in a directory (panics with the path on error).
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A shared mapping of the first `len` bytes of a file: stores through a read-write one
/// reach the file without a write(2), and a read-only one shows what the file holds now.
/// Unmapped by [`SharedMap::unmap`], or on drop when a test fails while it is mapped.
pub struct SharedMap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl SharedMap {
    /// Read-write: `file` must be open for reading and writing.
    pub fn new(file: &std::fs::File, len: usize) -> SharedMap {
        Self::map(file, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Read-only, for watching a file change under the mapping ([`SharedMap::byte`]).
    pub fn new_read_only(file: &std::fs::File, len: usize) -> SharedMap {
        Self::map(file, len, libc::PROT_READ)
    }

    fn map(file: &std::fs::File, len: usize, prot: libc::c_int) -> SharedMap {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address); `file` is open
        // for the call, and the mapping keeps its own reference to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        SharedMap { ptr, len }
    }

    /// The byte at `i` as the file holds it now. A volatile read: other writers change the
    /// memory under the mapping, so no Rust reference may be held over it.
    pub fn byte(&self, i: usize) -> u8 {
        assert!(
            i < self.len && !self.ptr.is_null(),
            "byte {i} outside the mapping"
        );
        // SAFETY: `i` is inside the live `len`-byte mapping, which is at least readable.
        unsafe { self.ptr.cast::<u8>().add(i).read_volatile() }
    }

    /// Read-write mappings only (see [`SharedMap::new`]).
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and lives as long as
        // `self`; `&mut self` makes this the only slice over it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), self.len) }
    }

    /// msync(MS_SYNC): the stores so far are written back to the file.
    pub fn sync(&self) {
        // SAFETY: `ptr` and `len` are the mapping made in `new`.
        let r = unsafe { libc::msync(self.ptr, self.len, libc::MS_SYNC) };
        assert_eq!(r, 0, "msync: {}", io::Error::last_os_error());
    }

    pub fn unmap(mut self) {
        let r = self.release();
        assert_eq!(r, 0, "munmap: {}", io::Error::last_os_error());
    }

    /// munmap's result (0 when already unmapped); the null pointer marks it done.
    fn release(&mut self) -> libc::c_int {
        if self.ptr.is_null() {
            return 0;
        }
        // SAFETY: `ptr` and `len` are the mapping made in `new`, not yet unmapped; no slice
        // over it outlives this call (`bytes` borrows `self`), and it is not used again.
        let r = unsafe { libc::munmap(self.ptr, self.len) };
        self.ptr = std::ptr::null_mut();
        r
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether process `pid` has a handler installed for `sig` (the `SigCgt` mask in
/// `/proc/<pid>/status`): a daemon that announces itself before this holds dies of the
/// default action when stopped right after.
pub fn catches_signal(pid: u32, sig: libc::c_int) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .expect("SigCgt line");
    let mask = u64::from_str_radix(mask.trim(), 16).expect("SigCgt is hex");
    mask & (1 << (sig - 1)) != 0
}

/// Port of the "metrics at http://ADDR:PORT/metrics" log line.
pub fn metrics_port(log: &str) -> Option<u16> {
    let i = log.find("metrics at http://")?;
    let rest = &log[i + "metrics at http://".len()..];
    let hostport = rest.split('/').next()?;
    hostport.rsplit(':').next()?.parse().ok()
}

pub fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    use std::io::{Read, Write};
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `bin(name)` run under `prefix` (e.g. `nsenter --net=/run/netns/NS`; empty: directly).
pub fn command_under(prefix: &[String], name: &str) -> std::process::Command {
    match prefix.split_first() {
        None => std::process::Command::new(bin(name)),
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(bin(name));
            c
        }
    }
}

/// The stash a replica made: its directory under STATE/stash and the manifest lines by
/// path (action, type).
pub fn read_stash(state: &Path) -> (PathBuf, std::collections::BTreeMap<String, String>) {
    let root = state.join("stash");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("no stash under {}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let dir = dirs.pop().expect("a stash directory");
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.tsv")).expect("MANIFEST.tsv");
    let mut lines = std::collections::BTreeMap::new();
    for l in manifest.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() >= 8 {
            lines.insert(f[7].to_string(), f[0].to_string());
        }
    }
    (dir, lines)
}

/// Whether `path` (relative) is covered by the manifest: itself or a directory above it.
pub fn stashed(manifest: &std::collections::BTreeMap<String, String>, path: &str) -> bool {
    let mut p = path.to_string();
    loop {
        if manifest.contains_key(&p) {
            return true;
        }
        match p.rfind('/') {
            Some(i) => p.truncate(i),
            None => return false,
        }
    }
}
