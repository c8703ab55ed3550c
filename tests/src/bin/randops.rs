//! `randops`: a random operation generator for filesystem tests.
//!
//! Issues a seeded, reproducible sequence of every mutating operation a Linux filesystem
//! offers (and some reads that must not change anything) against a small namespace inside
//! DIR, including operations that fail. It knows nothing of tdfs: run it against a native
//! directory and against a mount with the same seed and the outcomes must agree; run several
//! at once against a mount and the replicas must end up identical to the backing tree.
//!
//! ```text
//! randops DIR SEED COUNT [--only K,K..] [--exclude K,K..] [--user UID] [--quiet]
//! randops --kinds
//! ```
//!
//! Prints one line per operation, `<index> <kind> <outcome> <paths...>` (outcome `ok` or
//! an errno name; the paths it drew, relative to DIR), and exits 0 unless the generator itself broke (bad arguments, a crash). Every
//! decision comes from the seed, never from what an earlier operation returned, so two
//! runs with one seed issue the same calls.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Every operation kind, in the order `--kinds` lists them.
const KINDS: &[&str] = &[
    "create",
    "create-excl",
    "open-trunc",
    "mkdir",
    "rmdir",
    "unlink",
    "mknod-fifo",
    "mknod-sock",
    "mknod-chr",
    "mknod-blk",
    "symlink",
    "link",
    "rename",
    "rename-noreplace",
    "rename-exchange",
    "rename-whiteout",
    "write",
    "pwritev",
    "write-append",
    "write-direct",
    "write-sync",
    "write-mmap",
    "truncate",
    "ftruncate",
    "fallocate",
    "fallocate-keep",
    "fallocate-punch",
    "fallocate-zero",
    "fallocate-zero-keep",
    "fallocate-collapse",
    "fallocate-insert",
    "copy-file-range",
    "splice",
    "sendfile",
    "fsync",
    "fdatasync",
    "fsync-dir",
    "chmod",
    "chown",
    "utimes",
    "utimes-now",
    "lutimes",
    "setxattr",
    "setxattr-create",
    "setxattr-replace",
    "removexattr",
    "chattr-append",
    "chattr-immutable",
    "chattr-noatime-nodump",
    "chattr-clear",
    "chattr-dir",
    "tmpfile",
    "tmpfile-link",
];

/// xorshift64*: small, fast and deterministic; quality is ample for picking operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

fn errno_name(e: i32) -> String {
    let name = match e {
        SPECIAL => "special",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTTY => "ENOTTY",
        libc::ENXIO => "ENXIO",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EDQUOT => "EDQUOT",
        _ => return format!("errno{e}"),
    };
    name.to_string()
}

fn outcome(r: Res) -> String {
    match r {
        Ok(()) => "ok".to_string(),
        Err(e) => errno_name(e),
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

type Res = Result<(), i32>;

fn chk(r: libc::c_int) -> Result<libc::c_int, i32> {
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r)
    }
}

fn chk_sz(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r as usize)
    }
}

/// An fd closed on drop.
struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closes an fd this struct owns.
        unsafe { libc::close(self.0) };
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in generated paths")
}

/// Outcome of an operation that declined a device, FIFO or socket.
const SPECIAL: i32 = -1;

/// Opens without ever blocking (a FIFO that another process put at the name since it was
/// checked would otherwise wait for a partner forever), and declines anything but a file or
/// directory.
fn xopen(p: &Path, flags: i32, mode: u32) -> Result<Fd, i32> {
    let cp = c(p);
    // SAFETY: valid C string.
    let fd = chk(unsafe {
        libc::open(
            cp.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NONBLOCK,
            mode,
        )
    })
    .map(Fd)?;
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and buffer.
    chk(unsafe { libc::fstat(fd.0, &mut st) })?;
    let t = st.st_mode & libc::S_IFMT;
    if t != libc::S_IFREG && t != libc::S_IFDIR {
        return Err(SPECIAL);
    }
    Ok(fd)
}

struct Gen {
    root: PathBuf,
    rng: Rng,
    /// The paths the current operation drew, for its output line.
    drawn: Vec<String>,
}

const DIRS: &[&str] = &["", "d0", "d1", "d0/e0", "d1/e1", "d0/e0/f0"];
const NAMES: &[&str] = &["a", "b", "c", "a", "b", "e0", "e1", "g"];

impl Gen {
    /// A path in the small namespace: a directory, then a name (dirs are names too).
    fn path(&mut self) -> PathBuf {
        let d = *self.rng.pick(DIRS);
        let n = *self.rng.pick(NAMES);
        let rel = if d.is_empty() {
            n.to_string()
        } else {
            format!("{d}/{n}")
        };
        self.drawn.push(rel.clone());
        self.root.join(rel)
    }

    fn dir(&mut self) -> PathBuf {
        let d = *self.rng.pick(DIRS);
        self.drawn
            .push(if d.is_empty() { ".".into() } else { d.into() });
        self.root.join(d)
    }

    fn offset(&mut self) -> i64 {
        match self.rng.below(4) {
            0 => 0,
            1 => self.rng.below(8192) as i64,
            2 => (self.rng.below(64) * 4096) as i64,
            _ => self.rng.below(1 << 20) as i64,
        }
    }

    fn len(&mut self) -> usize {
        match self.rng.below(4) {
            0 => 1 + self.rng.below(16) as usize,
            1 => 1 + self.rng.below(4096) as usize,
            2 => 4096 * (1 + self.rng.below(8) as usize),
            _ => 1 + self.rng.below(300_000) as usize,
        }
    }

    /// Operations that open a path for data never touch a device, FIFO or socket: opening
    /// one could block or reach a driver, and a nodev mount refuses what a plain directory
    /// allows. They report `special` instead (as both sides of a comparison do).
    fn data_target(&self, p: &Path) -> Res {
        // SAFETY: stat is plain data.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and buffer; follows links, as the open would.
        if unsafe { libc::stat(c(p).as_ptr(), &mut st) } == 0 {
            let t = st.st_mode & libc::S_IFMT;
            if t != libc::S_IFREG && t != libc::S_IFDIR {
                return Err(SPECIAL);
            }
        }
        Ok(())
    }

    fn write_fd(&mut self, fd: &Fd, off: i64) -> Res {
        let n = self.len();
        let data = self.rng.bytes(n);
        // SAFETY: data is readable for its length.
        chk_sz(unsafe { libc::pwrite(fd.0, data.as_ptr().cast(), data.len(), off) }).map(drop)
    }

    fn one(&mut self, kind: &str) -> Res {
        use libc::*;
        match kind {
            "create" => {
                let p = self.path();
                let mode = *self.rng.pick(&[0o644, 0o600, 0o4755, 0o2640, 0o777]);
                self.data_target(&p)?;
                xopen(&p, O_WRONLY | O_CREAT, mode).map(drop)
            }
            "create-excl" => {
                let p = self.path();
                xopen(&p, O_WRONLY | O_CREAT | O_EXCL, 0o640).map(drop)
            }
            "open-trunc" => {
                let p = self.path();
                self.data_target(&p)?;
                xopen(&p, O_WRONLY | O_TRUNC, 0).map(drop)
            }
            "mkdir" => {
                let p = self.path();
                let mode = *self.rng.pick(&[0o755, 0o700, 0o1777, 0o2775]);
                // SAFETY: valid C string.
                chk(unsafe { mkdir(c(&p).as_ptr(), mode) }).map(drop)
            }
            "rmdir" => {
                let p = self.path();
                // SAFETY: valid C string.
                chk(unsafe { rmdir(c(&p).as_ptr()) }).map(drop)
            }
            "unlink" => {
                let p = self.path();
                // SAFETY: valid C string.
                chk(unsafe { unlink(c(&p).as_ptr()) }).map(drop)
            }
            "mknod-fifo" | "mknod-sock" | "mknod-chr" | "mknod-blk" => {
                let p = self.path();
                let (t, dev) = match kind {
                    "mknod-fifo" => (S_IFIFO, 0),
                    "mknod-sock" => (S_IFSOCK, 0),
                    // /dev/null's numbers, and a block device in the range reserved for
                    // local use: harmless even if something opened them (nothing here does).
                    "mknod-chr" => (S_IFCHR, makedev(1, 3)),
                    _ => (S_IFBLK, makedev(242, 242)),
                };
                // SAFETY: valid C string.
                chk(unsafe { mknod(c(&p).as_ptr(), t | 0o640, dev) }).map(drop)
            }
            "symlink" => {
                let p = self.path();
                // Relative and without "..": a link resolves inside the tree (or nowhere),
                // whatever follows it, so no operation can reach beyond DIR.
                let target = *self.rng.pick(&["a", "b", "d0/e0", "e0/a", "nowhere", "g"]);
                let t = CString::new(target).expect("no NUL");
                // SAFETY: valid C strings.
                chk(unsafe { symlink(t.as_ptr(), c(&p).as_ptr()) }).map(drop)
            }
            "link" => {
                let a = self.path();
                let b = self.path();
                // SAFETY: valid C strings.
                chk(unsafe { link(c(&a).as_ptr(), c(&b).as_ptr()) }).map(drop)
            }
            "rename" | "rename-noreplace" | "rename-exchange" | "rename-whiteout" => {
                let a = self.path();
                let b = if self.rng.chance(20) {
                    self.dir()
                } else {
                    self.path()
                };
                let flags = match kind {
                    "rename" => 0,
                    "rename-noreplace" => RENAME_NOREPLACE,
                    "rename-exchange" => RENAME_EXCHANGE,
                    _ => RENAME_WHITEOUT,
                };
                // SAFETY: valid C strings.
                chk(unsafe { renameat2(AT_FDCWD, c(&a).as_ptr(), AT_FDCWD, c(&b).as_ptr(), flags) })
                    .map(drop)
            }
            "write" => {
                let p = self.path();
                self.data_target(&p)?;
                let fd = xopen(&p, O_WRONLY, 0)?;
                let off = self.offset();
                self.write_fd(&fd, off)
            }
            "pwritev" => {
                let p = self.path();
                self.data_target(&p)?;
                let fd = xopen(&p, O_RDWR, 0)?;
                let parts: Vec<Vec<u8>> = (0..3)
                    .map(|_| {
                        let n = 1 + self.rng.below(5000) as usize;
                        self.rng.bytes(n)
                    })
                    .collect();
                let iov: Vec<iovec> = parts
                    .iter()
                    .map(|b| iovec {
                        iov_base: b.as_ptr() as *mut c_void,
                        iov_len: b.len(),
                    })
                    .collect();
                let off = self.offset();
                // SAFETY: iovecs point into `parts`, alive for the call.
                chk_sz(unsafe { pwritev(fd.0, iov.as_ptr(), iov.len() as c_int, off) }).map(drop)
            }
            "write-append" => {
                let p = self.path();
                self.data_target(&p)?;
                let fd = xopen(&p, O_WRONLY | O_APPEND, 0)?;
                let n = self.len().min(20_000);
                let data = self.rng.bytes(n);
                // SAFETY: data readable for its length.
                chk_sz(unsafe { write(fd.0, data.as_ptr().cast(), data.len()) }).map(drop)
            }
            "write-direct" => {
                let p = self.path();
                let blocks = 1 + self.rng.below(16) as usize;
                let off = (self.rng.below(64) * 4096) as i64;
                let data = self.rng.bytes(blocks * 4096);
                self.data_target(&p)?;
                let fd = xopen(&p, O_WRONLY | O_DIRECT, 0)?;
                let mut buf: *mut c_void = std::ptr::null_mut();
                // SAFETY: posix_memalign writes an aligned allocation of the size asked.
                if unsafe { posix_memalign(&mut buf, 4096, data.len()) } != 0 {
                    return Err(ENOMEM);
                }
                // SAFETY: buf has room for data.len() bytes and does not overlap data.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.cast(), data.len()) };
                // SAFETY: buf readable for data.len() bytes.
                let r = chk_sz(unsafe { pwrite(fd.0, buf, data.len(), off) }).map(drop);
                // SAFETY: buf came from posix_memalign.
                unsafe { free(buf) };
                r
            }
            "write-sync" => {
                let p = self.path();
                let flag = *self.rng.pick(&[O_SYNC, O_DSYNC]);
                self.data_target(&p)?;
                let fd = xopen(&p, O_WRONLY | flag, 0)?;
                let off = self.offset();
                self.write_fd(&fd, off)
            }
            "write-mmap" => {
                let p = self.path();
                self.data_target(&p)?;
                let fd = xopen(&p, O_RDWR, 0)?;
                // SAFETY: stat is plain data; fstat fills it.
                let mut st: stat = unsafe { std::mem::zeroed() };
                // SAFETY: valid fd and buffer.
                chk(unsafe { fstat(fd.0, &mut st) })?;
                if st.st_mode & S_IFMT != S_IFREG || st.st_size == 0 {
                    return Err(EINVAL);
                }
                let len = (st.st_size as usize).min(256 * 1024);
                // SAFETY: maps `len` bytes of a regular file at least that long.
                let m = unsafe {
                    mmap(
                        std::ptr::null_mut(),
                        len,
                        PROT_READ | PROT_WRITE,
                        MAP_SHARED,
                        fd.0,
                        0,
                    )
                };
                if m == MAP_FAILED {
                    return Err(last_errno());
                }
                let at = self.rng.below(len as u64) as usize;
                let n = (1 + self.rng.below(8192) as usize).min(len - at);
                let data = self.rng.bytes(n);
                let sync = self.rng.chance(50);
                // The stores go through the mapping by read(2) from a pipe: the kernel copies
                // into the mapped pages exactly as a store would, but a page that another
                // process truncated away meanwhile fails the copy with EFAULT instead of
                // killing this process with SIGBUS.
                let mut pipefd = [0; 2];
                // SAFETY: writes two fds into the array.
                let r = chk(unsafe { pipe2(pipefd.as_mut_ptr(), O_CLOEXEC) }).and_then(|_| {
                    let (pr, pw) = (Fd(pipefd[0]), Fd(pipefd[1]));
                    // SAFETY: data readable for n bytes (under the pipe's 64 KiB).
                    chk_sz(unsafe { write(pw.0, data.as_ptr().cast(), n) })?;
                    // SAFETY: [at, at + n) lies inside the mapping.
                    chk_sz(unsafe { read(pr.0, m.cast::<u8>().add(at).cast(), n) })?;
                    // SAFETY: msync of our own mapping.
                    if sync {
                        chk(unsafe { msync(m, len, MS_SYNC) })?;
                    }
                    Ok(())
                });
                // SAFETY: unmaps exactly the mapping made above.
                unsafe { munmap(m, len) };
                r
            }
            "truncate" => {
                let p = self.path();
                let size = self.offset();
                self.data_target(&p)?;
                // SAFETY: valid C string.
                chk(unsafe { truncate(c(&p).as_ptr(), size) }).map(drop)
            }
            "ftruncate" => {
                let p = self.path();
                self.data_target(&p)?;
                let fd = xopen(&p, O_WRONLY, 0)?;
                let size = self.offset();
                // SAFETY: valid fd.
                chk(unsafe { ftruncate(fd.0, size) }).map(drop)
            }
            k if k.starts_with("fallocate") => {
                let p = self.path();
                self.data_target(&p)?;
                let fd = xopen(&p, O_RDWR, 0)?;
                let mode = match k {
                    "fallocate" => 0,
                    "fallocate-keep" => FALLOC_FL_KEEP_SIZE,
                    "fallocate-punch" => FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    "fallocate-zero" => FALLOC_FL_ZERO_RANGE,
                    "fallocate-zero-keep" => FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                    "fallocate-collapse" => FALLOC_FL_COLLAPSE_RANGE,
                    _ => FALLOC_FL_INSERT_RANGE,
                };
                let (off, len) = if mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE) != 0
                {
                    (
                        (self.rng.below(8) * 4096) as i64,
                        (4096 * (1 + self.rng.below(4))) as i64,
                    )
                } else {
                    (self.offset(), 1 + self.rng.below(200_000) as i64)
                };
                // SAFETY: valid fd.
                chk(unsafe { fallocate(fd.0, mode, off, len) }).map(drop)
            }
            "copy-file-range" => {
                let a = self.path();
                let b = self.path();
                self.data_target(&a)?;
                self.data_target(&b)?;
                let fa = xopen(&a, O_RDONLY, 0)?;
                let fb = xopen(&b, O_WRONLY, 0)?;
                let mut oa = self.offset();
                let mut ob = self.offset();
                let len = self.len();
                // SAFETY: valid fds and offset pointers.
                chk_sz(unsafe { copy_file_range(fa.0, &mut oa, fb.0, &mut ob, len, 0) }).map(drop)
            }
            "splice" => {
                let p = self.path();
                self.data_target(&p)?;
                let fd = xopen(&p, O_WRONLY, 0)?;
                let mut pipefd = [0; 2];
                // SAFETY: writes two fds into the array.
                chk(unsafe { pipe2(pipefd.as_mut_ptr(), O_CLOEXEC) })?;
                let (r, w) = (Fd(pipefd[0]), Fd(pipefd[1]));
                let n = 1 + self.rng.below(30_000) as usize;
                let data = self.rng.bytes(n);
                // SAFETY: data readable for its length (a pipe holds 64 KiB by default).
                chk_sz(unsafe { write(w.0, data.as_ptr().cast(), n) })?;
                let mut off = self.offset();
                // SAFETY: valid fds and offset pointer.
                chk_sz(unsafe { splice(r.0, std::ptr::null_mut(), fd.0, &mut off, n, 0) }).map(drop)
            }
            "sendfile" => {
                let a = self.path();
                let b = self.path();
                self.data_target(&a)?;
                self.data_target(&b)?;
                let fa = xopen(&a, O_RDONLY, 0)?;
                let fb = xopen(&b, O_WRONLY | O_APPEND, 0)?;
                let mut off = self.offset();
                let len = self.len();
                // SAFETY: valid fds and offset pointer.
                chk_sz(unsafe { sendfile(fb.0, fa.0, &mut off, len) }).map(drop)
            }
            "fsync" | "fdatasync" => {
                let p = self.path();
                self.data_target(&p)?;
                let fd = xopen(&p, O_RDONLY | O_NONBLOCK, 0)?;
                // SAFETY: valid fd.
                chk(unsafe {
                    if kind == "fsync" {
                        fsync(fd.0)
                    } else {
                        fdatasync(fd.0)
                    }
                })
                .map(drop)
            }
            "fsync-dir" => {
                let d = self.dir();
                self.data_target(&d)?;
                let fd = xopen(&d, O_RDONLY | O_DIRECTORY, 0)?;
                // SAFETY: valid fd.
                chk(unsafe { fsync(fd.0) }).map(drop)
            }
            "chmod" => {
                let p = self.path();
                let mode = *self
                    .rng
                    .pick(&[0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o000]);
                // SAFETY: valid C string.
                chk(unsafe { chmod(c(&p).as_ptr(), mode) }).map(drop)
            }
            "chown" => {
                let p = self.path();
                let uid = *self.rng.pick(&[0, 65534, u32::MAX]);
                let gid = *self.rng.pick(&[0, 65534, u32::MAX]);
                // SAFETY: valid C string.
                chk(unsafe { lchown(c(&p).as_ptr(), uid, gid) }).map(drop)
            }
            "utimes" | "utimes-now" | "lutimes" => {
                let p = self.path();
                let pick = |g: &mut Self| -> timespec {
                    match g.rng.below(5) {
                        0 => timespec {
                            tv_sec: 0,
                            tv_nsec: UTIME_OMIT,
                        },
                        1 => timespec {
                            tv_sec: -86_400 * 400,
                            tv_nsec: 5,
                        },
                        _ => timespec {
                            tv_sec: 1_000_000_000 + g.rng.below(1_000_000_000) as i64,
                            tv_nsec: g.rng.below(1_000_000_000) as i64,
                        },
                    }
                };
                let ts = if kind == "utimes-now" {
                    [
                        timespec {
                            tv_sec: 0,
                            tv_nsec: UTIME_NOW,
                        },
                        timespec {
                            tv_sec: 0,
                            tv_nsec: UTIME_NOW,
                        },
                    ]
                } else {
                    [pick(self), pick(self)]
                };
                let flags = if kind == "lutimes" {
                    AT_SYMLINK_NOFOLLOW
                } else {
                    0
                };
                // SAFETY: valid C string and a two-element array.
                chk(unsafe { utimensat(AT_FDCWD, c(&p).as_ptr(), ts.as_ptr(), flags) }).map(drop)
            }
            "setxattr" | "setxattr-create" | "setxattr-replace" => {
                let p = self.path();
                let name = *self.rng.pick(&["user.a", "user.b", "trusted.t"]);
                let n = self.rng.below(300) as usize;
                let v = self.rng.bytes(n);
                let flags = match kind {
                    "setxattr" => 0,
                    "setxattr-create" => XATTR_CREATE,
                    _ => XATTR_REPLACE,
                };
                let cn = CString::new(name).expect("no NUL");
                // SAFETY: valid C strings; value readable for its length.
                chk(unsafe {
                    lsetxattr(
                        c(&p).as_ptr(),
                        cn.as_ptr(),
                        v.as_ptr().cast(),
                        v.len(),
                        flags,
                    )
                })
                .map(drop)
            }
            "removexattr" => {
                let p = self.path();
                let name = *self.rng.pick(&["user.a", "user.b", "trusted.t"]);
                let cn = CString::new(name).expect("no NUL");
                // SAFETY: valid C strings.
                chk(unsafe { lremovexattr(c(&p).as_ptr(), cn.as_ptr()) }).map(drop)
            }
            k if k.starts_with("chattr") => {
                let p = if k == "chattr-dir" || (k == "chattr-clear" && self.rng.chance(50)) {
                    // Never the root: an immutable root would stop the rest of the run.
                    self.root.join(self.rng.pick(&DIRS[1..]))
                } else {
                    self.path()
                };
                self.data_target(&p)?;
                self.data_target(&p)?;
                let fd = xopen(&p, O_RDONLY | O_NONBLOCK | O_NOFOLLOW, 0)?;
                let mut cur: c_int = 0;
                // SAFETY: GETFLAGS writes one int.
                chk(unsafe { ioctl(fd.0, FS_IOC_GETFLAGS, &mut cur) })?;
                const IMM: c_int = 0x10;
                const APP: c_int = 0x20;
                const NODUMP: c_int = 0x40;
                const NOATIME: c_int = 0x80;
                let new = match k {
                    "chattr-append" => cur | APP,
                    "chattr-immutable" => cur | IMM,
                    "chattr-noatime-nodump" => cur ^ (NOATIME | NODUMP),
                    "chattr-dir" => cur ^ *self.rng.pick(&[NODUMP, APP, IMM, NOATIME]),
                    _ => cur & !(IMM | APP),
                };
                // SAFETY: SETFLAGS reads one int.
                chk(unsafe { ioctl(fd.0, FS_IOC_SETFLAGS, &new) }).map(drop)
            }
            "tmpfile" | "tmpfile-link" => {
                let d = self.dir();
                let fd = xopen(&d, O_TMPFILE | O_RDWR, 0o640)?;
                self.write_fd(&fd, 0)?;
                if kind == "tmpfile-link" {
                    let p = self.path();
                    let from = CString::new(format!("/proc/self/fd/{}", fd.0)).expect("no NUL");
                    // SAFETY: valid C strings.
                    chk(unsafe {
                        linkat(
                            AT_FDCWD,
                            from.as_ptr(),
                            AT_FDCWD,
                            c(&p).as_ptr(),
                            AT_SYMLINK_FOLLOW,
                        )
                    })?;
                }
                Ok(())
            }
            other => panic!("unknown kind {other}"),
        }
    }
}

/// How often each kind is drawn: the common ones more, the ones that lock a file up
/// (immutable) rarely.
fn weight(kind: &str) -> u64 {
    match kind {
        "write" | "create" => 8,
        "pwritev" | "write-append" | "write-direct" | "truncate" | "rename" | "mkdir"
        | "unlink" | "setxattr" | "utimes" | "chmod" => 4,
        "chattr-immutable" | "chattr-dir" | "chattr-append" => 1,
        "chattr-clear" => 4,
        _ => 2,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--kinds") {
        for k in KINDS {
            println!("{k}");
        }
        return;
    }
    let usage =
        "usage: randops DIR SEED COUNT [--only K,K..] [--exclude K,K..] [--user UID] [--quiet]";
    let (Some(dir), Some(seed), Some(count)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let seed: u64 = seed.parse().unwrap_or_else(|_| {
        eprintln!("bad SEED; {usage}");
        std::process::exit(2)
    });
    let count: u64 = count.parse().unwrap_or_else(|_| {
        eprintln!("bad COUNT; {usage}");
        std::process::exit(2)
    });
    let mut kinds: Vec<&str> = KINDS.to_vec();
    let mut quiet = false;
    let mut user: Option<u32> = None;
    let mut i = 4;
    while i < args.len() {
        let list = |i: usize| -> Vec<String> {
            args.get(i + 1)
                .map(|s| s.split(',').map(String::from).collect())
                .unwrap_or_default()
        };
        match args[i].as_str() {
            "--only" => {
                let only = list(i);
                for k in &only {
                    if !KINDS.contains(&k.as_str()) {
                        eprintln!("unknown kind {k}");
                        std::process::exit(2);
                    }
                }
                kinds.retain(|k| only.iter().any(|o| o == k));
                i += 2;
            }
            "--exclude" => {
                let ex = list(i);
                kinds.retain(|k| !ex.iter().any(|o| o == k));
                i += 2;
            }
            "--user" => {
                user = args.get(i + 1).and_then(|s| s.parse().ok());
                i += 2;
            }
            "--quiet" => {
                quiet = true;
                i += 1;
            }
            other => {
                eprintln!("unknown argument {other}; {usage}");
                std::process::exit(2);
            }
        }
    }
    if kinds.is_empty() {
        eprintln!("no kinds left to run");
        std::process::exit(2);
    }
    if let Some(uid) = user {
        // SAFETY: plain credential syscalls; group first, while still allowed.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                eprintln!(
                    "cannot become uid {uid}: {}",
                    std::io::Error::last_os_error()
                );
                std::process::exit(2);
            }
        }
    }
    // SAFETY: umask has no preconditions; a fixed one makes modes reproducible.
    unsafe { libc::umask(0o022) };
    let total: u64 = kinds.iter().map(|k| weight(k)).sum();
    // One generator picks the kinds; each operation draws its arguments from a generator of
    // its own, seeded by the first: an operation that fails early (and draws less) never
    // shifts what the ones after it do.
    let mut kinds_rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut g = Gen {
        root: PathBuf::from(dir),
        rng: Rng(1),
        drawn: Vec::new(),
    };
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    // A populated namespace first, so that most operations find something to act on.
    for d in &DIRS[1..] {
        let p = g.root.join(d);
        // SAFETY: valid C string.
        let r = chk(unsafe { libc::mkdir(c(&p).as_ptr(), 0o755) });
        if !quiet {
            let _ = writeln!(out, "setup mkdir {d} {}", outcome(r.map(drop)));
        }
        for name in ["a", "b", "c"] {
            let f = p.join(name);
            g.rng = Rng(kinds_rng.next() | 1);
            let r = xopen(&f, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644)
                .and_then(|fd| g.write_fd(&fd, 0));
            if !quiet {
                let _ = writeln!(out, "setup create {d}/{name} {}", outcome(r));
            }
        }
    }
    for n in 0..count {
        g.rng = Rng(kinds_rng.next() | 1);
        let mut x = kinds_rng.below(total);
        let mut kind = kinds[0];
        for k in &kinds {
            if x < weight(k) {
                kind = k;
                break;
            }
            x -= weight(k);
        }
        g.drawn.clear();
        let r = g.one(kind);
        if !quiet {
            let _ = writeln!(out, "{n} {kind} {} {}", outcome(r), g.drawn.join(" "));
        }
    }
}
