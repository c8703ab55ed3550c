//! The applier: turns one replicated op into syscalls beneath the root.
//!
//! Every op describes a mutation as it already happened on the master, so the slave does not
//! second-guess it: it reproduces the resulting names, contents, ownership, modes and
//! timestamps. Paths are resolved with [`crate::confine`], and the final component is always
//! acted on with a `*at` call that does not follow it, so a replicated symlink can never
//! redirect a write outside the root.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use tdfs_protocol::op::{RENAME_EXCHANGE, RENAME_NOREPLACE};
use tdfs_protocol::{Attr, NodeKind, Op, OpKind, Times, Touch, WirePath};

use crate::confine::{self, check, cstr, lstat_at, openat, Target};

/// Most write fds kept open between ops; bounded so a master touching many files cannot
/// exhaust the fd limit.
const WRITE_CACHE_MAX: usize = 64;

/// Chunk size of the read/write fallback of `copy_file_range`.
const COPY_CHUNK: usize = 1 << 20;

pub struct Applier {
    root: OwnedFd,
    /// While a diverged tree is synced: what each op would overwrite is stashed first.
    pub stash: Option<crate::stash::Stash>,
    /// Files opened for writing, keyed by path. Only valid while no namespace op ran since
    /// they were opened, which is why [`Applier::apply`] clears it on those ops.
    cache: HashMap<WirePath, OwnedFd>,
}

fn errno(e: libc::c_int) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| errno(libc::EFBIG))
}

fn is_type(st: &libc::stat, t: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == t
}

fn chown_at(dir: BorrowedFd<'_>, name: &CString, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; AT_SYMLINK_NOFOLLOW keeps a final symlink unfollowed.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// chmod of a non-symlink entry without following a final symlink. `fchmodat` has no
/// working NOFOLLOW flag, so this uses `fchmodat2` (Linux 6.6) or, before that, an `O_PATH`
/// fd re-opened through `/proc/self/fd`, which names the object itself.
fn chmod_at(dir: BorrowedFd<'_>, name: &CString, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; the flag makes the kernel refuse rather than follow
    // a symlink.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS) => {}
        // Symlink permissions are fixed on Linux; the master's op cannot have changed them.
        Some(libc::EOPNOTSUPP) => return Ok(()),
        _ => return Err(e),
    }
    let (proc, fd) = confine::proc_path(dir, name)?;
    if is_type(&confine::fstat(fd.as_fd())?, libc::S_IFLNK) {
        return Ok(());
    }
    // SAFETY: `proc` is NUL-terminated; it is a magic link to the object `fd` refers to.
    check(unsafe { libc::chmod(proc.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

/// Removes `name` unless it is a directory, so that a create-like op can take its place.
fn unlink_nondir(dir: BorrowedFd<'_>, name: &CString) -> io::Result<()> {
    let st = lstat_at(dir, name)?;
    if is_type(&st, libc::S_IFDIR) {
        return Err(errno(libc::EISDIR));
    }
    // SAFETY: `name` is NUL-terminated; unlinkat never follows the final component.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })?;
    Ok(())
}

/// Removes `name` in `dir` and, for a directory, everything beneath it; never follows a
/// symlink (each level is opened with O_NOFOLLOW relative to its parent's fd).
fn remove_tree_at(dir: BorrowedFd<'_>, name: &CString) -> io::Result<()> {
    let st = lstat_at(dir, name)?;
    let is_dir = is_type(&st, libc::S_IFDIR);
    if is_dir {
        let d = openat(
            dir,
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )?;
        for child in tdfs_replication::inspect::read_names(d.as_fd())? {
            remove_tree_at(d.as_fd(), &cstr(&child)?)?;
        }
    }
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `name` is NUL-terminated; unlinkat never follows the final component.
    let unlink = || check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) });
    match unlink() {
        // An immutable or append-only entry (or directory holding it) cannot be removed:
        // the whole tree goes, so its guards go first.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let mut lifted: Vec<Lifted> =
                unguard_at(dir, name.as_bytes(), &st)?.into_iter().collect();
            lifted.extend(unguard_fd(openat(
                dir,
                c".",
                libc::O_RDONLY | libc::O_DIRECTORY,
            )?)?);
            if lifted.is_empty() {
                return Err(e);
            }
            let r = unlink();
            // The directory stays: its guards come back.
            for l in lifted.into_iter().filter(|l| l.ino != st.st_ino) {
                l.restore();
            }
            r?;
        }
        r => {
            r?;
        }
    }
    Ok(())
}

/// An inode whose immutable/append-only flags were lifted for a moment.
struct Lifted {
    fd: OwnedFd,
    ino: u64,
    flags: u32,
}

impl Lifted {
    fn restore(self) {
        if let Err(e) = tdfs_replication::flags::set_raw(self.fd.as_fd(), self.flags) {
            tracing::warn!("could not restore inode flags {:#x}: {e}", self.flags);
        }
    }
}

/// Lifts the guard flags of an open file or directory, if it has any.
fn unguard_fd(fd: OwnedFd) -> io::Result<Option<Lifted>> {
    let flags = tdfs_replication::flags::get_raw(fd.as_fd())?;
    if flags & tdfs_replication::flags::GUARD_FLAGS == 0 {
        return Ok(None);
    }
    tdfs_replication::flags::set_raw(fd.as_fd(), flags & !tdfs_replication::flags::GUARD_FLAGS)?;
    let ino = confine::fstat(fd.as_fd())?.st_ino;
    Ok(Some(Lifted { fd, ino, flags }))
}

/// Lifts the guard flags of `name` in `dir` (described by `st`), if it has any.
fn unguard_at(dir: BorrowedFd<'_>, name: &[u8], st: &libc::stat) -> io::Result<Option<Lifted>> {
    match tdfs_replication::flags::open_at(dir, name, st)? {
        Some(fd) => unguard_fd(fd),
        None => Ok(None),
    }
}

/// Runs `f` and, when it fails with EEXIST, removes the non-directory in the way and runs it
/// once more: the master's op succeeded, so whatever the slave still has there is stale.
fn replacing<T>(
    dir: BorrowedFd<'_>,
    name: &CString,
    mut f: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    match f() {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            unlink_nondir(dir, name)?;
            f()
        }
        r => r,
    }
}

fn pwrite_all(fd: BorrowedFd<'_>, mut data: &[u8], offset: u64) -> io::Result<()> {
    let mut off = to_off(offset)?;
    while !data.is_empty() {
        // SAFETY: the pointer and length describe the live `data` slice.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(errno(libc::EIO));
        }
        data = &data[n as usize..];
        off = off
            .checked_add(n as libc::off_t)
            .ok_or_else(|| errno(libc::EFBIG))?;
    }
    Ok(())
}

fn timespecs(t: &Times) -> [libc::timespec; 2] {
    [t.atime, t.mtime].map(|ts| libc::timespec {
        tv_sec: ts.sec as libc::time_t,
        tv_nsec: ts.nsec as libc::c_long,
    })
}

/// Does a namespace or metadata op leave open write fds pointing at the right files?
fn keeps_cache(k: &OpKind) -> bool {
    use OpKind::*;
    matches!(
        k,
        Write { .. }
            | Fallocate { .. }
            | CopyRange { .. }
            | SetAttr { .. }
            | SetTimes { .. }
            | SetXattr { .. }
            | RemoveXattr { .. }
            | Fsync { .. }
    )
}

impl Applier {
    /// Opens the mirrored root. The caller sets the process umask to 0 so modes come out
    /// exactly as the master reported them.
    pub fn open(dir: &Path) -> io::Result<Self> {
        Ok(Self {
            root: confine::open_root(dir)?,
            stash: None,
            cache: HashMap::new(),
        })
    }

    /// The mirrored root (an `O_PATH` directory fd), for inspection.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    fn target(&self, p: &WirePath) -> io::Result<Target> {
        confine::target(self.root.as_fd(), p)
    }

    /// Drops every cached write fd (namespace changes may have made their paths stale).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    /// A write fd for `p`, from the cache or freshly opened.
    fn write_fd(&mut self, p: &WirePath) -> io::Result<BorrowedFd<'_>> {
        if !self.cache.contains_key(p) {
            let t = self.target(p)?;
            // O_NONBLOCK: a FIFO must fail (ENXIO) rather than hang the apply thread.
            let fd = openat(
                t.dir.as_fd(),
                &t.name,
                libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            )?;
            self.cache_fd(p, fd);
        }
        Ok(self.cache[p].as_fd())
    }

    fn cache_fd(&mut self, p: &WirePath, fd: OwnedFd) {
        if self.cache.len() >= WRITE_CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(p.clone(), fd);
    }

    /// Applies one op, then its resulting timestamps.
    pub fn apply(&mut self, op: &Op) -> io::Result<()> {
        if !keeps_cache(&op.kind) {
            self.cache.clear();
        }
        if let Some(st) = self.stash.as_mut() {
            // A stashed file must be copied before a cached write fd changes it.
            self.cache.clear();
            st.before(self.root.as_fd(), op)?;
        }
        self.guarded(op, |a| a.apply_kind(&op.kind))?;
        for t in &op.touch {
            match t {
                Touch::Own(times) => {
                    // A removed entry has no timestamps left to set.
                    if matches!(op.kind, OpKind::Unlink { .. } | OpKind::Rmdir { .. }) {
                        continue;
                    }
                    if let Some(p) = op.primary_path() {
                        self.guarded(op, |a| a.set_times(p, times))?;
                    }
                }
                Touch::Parent(times) => {
                    if let Some(p) = op.primary_path() {
                        self.guarded(op, |a| a.set_times(&p.parent(), times))?;
                    }
                }
                Touch::Path(p, times) => self.guarded(op, |a| a.set_times(p, times))?,
            }
        }
        Ok(())
    }

    /// Runs `f`, a step of `op`. The master made the change before anything was made
    /// immutable or append-only (else it would have failed there too), but the replica holds
    /// the flags by now: a write and then `chattr +a` arrive in that order, and the write's
    /// times are set after the data. So when a step fails with EPERM, the guard flags of
    /// the inodes it touches are lifted, the step runs again, and they are put back.
    fn guarded(
        &mut self,
        op: &Op,
        mut f: impl FnMut(&mut Self) -> io::Result<()>,
    ) -> io::Result<()> {
        let e = match f(self) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => e,
            r => return r,
        };
        let lifted = self.lift_guards(op)?;
        if lifted.is_empty() {
            return Err(e);
        }
        // Write fds opened while the flags were down must not outlive them.
        self.cache.clear();
        let r = f(self);
        self.cache.clear();
        // A SetFlags op's own inode keeps what the op gave it.
        let own = match &op.kind {
            OpKind::SetFlags { path, .. } => self
                .target(path)
                .and_then(|t| lstat_at(t.dir.as_fd(), &t.name))
                .ok()
                .map(|st| st.st_ino),
            _ => None,
        };
        for l in lifted {
            if Some(l.ino) != own {
                l.restore();
            }
        }
        r
    }

    /// Lifts the guard flags of every inode `op` names and of their directories.
    fn lift_guards(&mut self, op: &Op) -> io::Result<Vec<Lifted>> {
        let mut paths: Vec<WirePath> = Vec::new();
        for p in op_paths(op) {
            if !p.is_root() {
                paths.push(p.parent());
            }
            paths.push(p);
        }
        paths.sort();
        paths.dedup();
        let mut out: Vec<Lifted> = Vec::new();
        for p in paths {
            let fd = if p.is_root() {
                openat(self.root.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)
            } else {
                let Ok(t) = self.target(&p) else { continue };
                let Ok(st) = lstat_at(t.dir.as_fd(), &t.name) else {
                    continue;
                };
                match tdfs_replication::flags::open_at(t.dir.as_fd(), t.name.as_bytes(), &st)? {
                    Some(fd) => Ok(fd),
                    None => continue,
                }
            }?;
            if let Some(l) = unguard_fd(fd)? {
                if out.iter().any(|o| o.ino == l.ino) {
                    // Already lifted through another name: this one read it lifted.
                    continue;
                }
                out.push(l);
            }
        }
        Ok(out)
    }

    /// Sets the timestamps of `p`: through its cached write fd when there is one (every
    /// replicated write carries its resulting times, so resolving the path again per op would
    /// cost an open, a close and a path walk), otherwise by name without following it.
    fn set_times(&self, p: &WirePath, times: &Times) -> io::Result<()> {
        let ts = timespecs(times);
        if let Some(fd) = self.cache.get(p) {
            // SAFETY: `fd` is live and `ts` holds the two timespecs futimens reads.
            check(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) })?;
            return Ok(());
        }
        let t = self.target(p)?;
        // SAFETY: `name` is NUL-terminated and `ts` holds the two timespecs utimensat reads.
        check(unsafe {
            libc::utimensat(
                t.dir.as_raw_fd(),
                t.name.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    fn apply_kind(&mut self, kind: &OpKind) -> io::Result<()> {
        use OpKind::*;
        match kind {
            Create { path, attr } => self.create(path, attr),
            Mknod {
                path,
                kind,
                rdev,
                attr,
            } => self.mknod(path, *kind, *rdev, attr),
            Mkdir { path, attr } => self.mkdir(path, attr),
            Symlink { path, target, attr } => {
                let t = self.target(path)?;
                let tgt = cstr(target)?;
                let dir = t.dir.as_fd();
                replacing(dir, &t.name, || {
                    // SAFETY: both strings are NUL-terminated; symlinkat never follows.
                    check(unsafe {
                        libc::symlinkat(tgt.as_ptr(), dir.as_raw_fd(), t.name.as_ptr())
                    })
                })?;
                chown_at(dir, &t.name, attr.uid, attr.gid)
            }
            Link { existing, new } => {
                let e = self.target(existing)?;
                let n = self.target(new)?;
                let ndir = n.dir.as_fd();
                replacing(ndir, &n.name, || {
                    // SAFETY: names are NUL-terminated; flags 0 = do not follow `existing`.
                    check(unsafe {
                        libc::linkat(
                            e.dir.as_raw_fd(),
                            e.name.as_ptr(),
                            ndir.as_raw_fd(),
                            n.name.as_ptr(),
                            0,
                        )
                    })
                })?;
                Ok(())
            }
            Unlink { path } => {
                let t = self.target(path)?;
                // SAFETY: `name` is NUL-terminated; unlinkat acts on the entry itself.
                check(unsafe { libc::unlinkat(t.dir.as_raw_fd(), t.name.as_ptr(), 0) })?;
                Ok(())
            }
            Rmdir { path } => {
                let t = self.target(path)?;
                // SAFETY: as above.
                check(unsafe {
                    libc::unlinkat(t.dir.as_raw_fd(), t.name.as_ptr(), libc::AT_REMOVEDIR)
                })?;
                Ok(())
            }
            Rename { from, to, flags } => {
                let mut kflags: libc::c_uint = 0;
                if flags & RENAME_NOREPLACE != 0 {
                    kflags |= libc::RENAME_NOREPLACE;
                }
                if flags & RENAME_EXCHANGE != 0 {
                    kflags |= libc::RENAME_EXCHANGE;
                }
                let f = self.target(from)?;
                let t = self.target(to)?;
                // SAFETY: names are NUL-terminated; renameat2 never follows either final
                // component.
                let ret = unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        f.dir.as_raw_fd(),
                        f.name.as_ptr(),
                        t.dir.as_raw_fd(),
                        t.name.as_ptr(),
                        kflags,
                    )
                };
                check(ret as libc::c_int)?;
                Ok(())
            }
            SetAttr { path, size, attr } => self.setattr(path, *size, attr),
            Write { path, offset, data } => {
                let fd = self.write_fd(path)?;
                pwrite_all(fd, data, *offset)
            }
            Fallocate {
                path,
                mode,
                offset,
                len,
            } => {
                let (off, len) = (to_off(*offset)?, to_off(*len)?);
                let fd = self.write_fd(path)?;
                // SAFETY: plain syscall on a live fd.
                check(unsafe { libc::fallocate(fd.as_raw_fd(), *mode, off, len) })?;
                Ok(())
            }
            CopyRange {
                src,
                src_offset,
                path,
                offset,
                len,
            } => {
                let s = self.target(src)?;
                let sfd = openat(
                    s.dir.as_fd(),
                    &s.name,
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                )?;
                let dfd = self.write_fd(path)?;
                copy_range(sfd.as_fd(), *src_offset, dfd, *offset, *len)
            }
            SetXattr {
                path,
                name,
                value,
                flags,
            } => {
                let (proc, _fd) = self.object_proc_path(path)?;
                let name = cstr(name)?;
                // SAFETY: strings are NUL-terminated and pointer/length describe `value`.
                check(unsafe {
                    libc::setxattr(
                        proc.as_ptr(),
                        name.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        *flags,
                    )
                })?;
                Ok(())
            }
            RemoveXattr { path, name } => {
                let (proc, _fd) = self.object_proc_path(path)?;
                let name = cstr(name)?;
                // SAFETY: both strings are NUL-terminated.
                check(unsafe { libc::removexattr(proc.as_ptr(), name.as_ptr()) })?;
                Ok(())
            }
            Fsync { path, datasync } => self.fsync(path.as_ref(), *datasync),
            SetTimes { .. } => Ok(()),
            SetFlags {
                path,
                flags,
                projid,
            } => {
                let fd = if path.is_root() {
                    openat(self.root.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)?
                } else {
                    let t = self.target(path)?;
                    let st = lstat_at(t.dir.as_fd(), &t.name)?;
                    match tdfs_replication::flags::open_at(t.dir.as_fd(), t.name.as_bytes(), &st)? {
                        Some(fd) => fd,
                        None if *flags == 0 && *projid == 0 => return Ok(()),
                        None => return Err(errno(libc::EOPNOTSUPP)),
                    }
                };
                tdfs_replication::flags::set(fd.as_fd(), *flags, *projid)
            }
            RemoveTree { path } => {
                if path.is_root() {
                    return Err(errno(libc::EINVAL));
                }
                let t = self.target(path)?;
                match remove_tree_at(t.dir.as_fd(), &t.name) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                    r => r,
                }
            }
        }
    }

    /// [`confine::proc_path`] of the object at `p`.
    fn object_proc_path(&self, p: &WirePath) -> io::Result<(CString, OwnedFd)> {
        let t = self.target(p)?;
        confine::proc_path(t.dir.as_fd(), &t.name)
    }

    fn create(&mut self, path: &WirePath, attr: &Attr) -> io::Result<()> {
        let t = self.target(path)?;
        let dir = t.dir.as_fd();
        let fd = replacing(dir, &t.name, || {
            // SAFETY: `name` is NUL-terminated; O_EXCL|O_NOFOLLOW never opens an existing
            // entry, symlink or not.
            confine::owned(unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    t.name.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_WRONLY
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o600 as libc::c_uint,
                )
            })
        })?;
        // Owner first: chown clears setuid/setgid, so the mode must be set after it.
        // SAFETY: plain syscalls on the fd we just created.
        check(unsafe { libc::fchown(fd.as_raw_fd(), attr.uid, attr.gid) })?;
        // SAFETY: as above.
        check(unsafe { libc::fchmod(fd.as_raw_fd(), attr.mode as libc::mode_t) })?;
        // A new file's data and times follow at once: keep the write fd already in hand.
        self.cache_fd(path, fd);
        Ok(())
    }

    fn mknod(&mut self, path: &WirePath, kind: NodeKind, rdev: u64, attr: &Attr) -> io::Result<()> {
        let fmt = match kind {
            NodeKind::Regular => return self.create(path, attr),
            NodeKind::Fifo => libc::S_IFIFO,
            NodeKind::Socket => libc::S_IFSOCK,
            NodeKind::Char => libc::S_IFCHR,
            NodeKind::Block => libc::S_IFBLK,
        };
        let t = self.target(path)?;
        let dir = t.dir.as_fd();
        replacing(dir, &t.name, || {
            // SAFETY: `name` is NUL-terminated; mknodat creates, it never follows.
            check(unsafe {
                libc::mknodat(
                    dir.as_raw_fd(),
                    t.name.as_ptr(),
                    fmt | 0o600,
                    rdev as libc::dev_t,
                )
            })
        })?;
        chown_at(dir, &t.name, attr.uid, attr.gid)?;
        chmod_at(dir, &t.name, attr.mode)
    }

    fn mkdir(&mut self, path: &WirePath, attr: &Attr) -> io::Result<()> {
        let t = self.target(path)?;
        let dir = t.dir.as_fd();
        let mk = || {
            // SAFETY: `name` is NUL-terminated.
            check(unsafe { libc::mkdirat(dir.as_raw_fd(), t.name.as_ptr(), 0o700) })
        };
        match mk() {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // An existing directory is kept (with its contents); anything else is stale.
                let st = lstat_at(dir, &t.name)?;
                if !is_type(&st, libc::S_IFDIR) {
                    unlink_nondir(dir, &t.name)?;
                    mk()?;
                }
            }
            Err(e) => return Err(e),
        }
        chown_at(dir, &t.name, attr.uid, attr.gid)?;
        chmod_at(dir, &t.name, attr.mode)
    }

    fn setattr(&mut self, path: &WirePath, size: Option<u64>, attr: &Attr) -> io::Result<()> {
        if let Some(size) = size {
            let size = to_off(size)?;
            let fd = self.write_fd(path)?;
            // SAFETY: plain syscall on a live fd.
            check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?;
        }
        let t = self.target(path)?;
        let dir = t.dir.as_fd();
        let st = lstat_at(dir, &t.name)?;
        let mut chowned = false;
        if st.st_uid != attr.uid || st.st_gid != attr.gid {
            chown_at(dir, &t.name, attr.uid, attr.gid)?;
            chowned = true;
        }
        let mode_differs = st.st_mode & 0o7777 != attr.mode;
        // After a chown the kernel may have dropped setuid/setgid, so set the mode again.
        if !is_type(&st, libc::S_IFLNK) && (mode_differs || chowned) {
            chmod_at(dir, &t.name, attr.mode)?;
        }
        Ok(())
    }

    fn fsync(&mut self, path: Option<&WirePath>, datasync: bool) -> io::Result<()> {
        let sync = |fd: &OwnedFd| {
            // SAFETY: plain syscalls on a live fd.
            check(unsafe {
                if datasync {
                    libc::fdatasync(fd.as_raw_fd())
                } else {
                    libc::fsync(fd.as_raw_fd())
                }
            })
        };
        let Some(path) = path else {
            let fd = openat(self.root.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
            // SAFETY: plain syscall on a live fd.
            check(unsafe { libc::syncfs(fd.as_raw_fd()) })?;
            return Ok(());
        };
        let t = self.target(path)?;
        let dir = t.dir.as_fd();
        let st = lstat_at(dir, &t.name)?;
        // Opening a device or FIFO could block or have side effects; only files and
        // directories hold data worth syncing.
        if is_type(&st, libc::S_IFREG) || is_type(&st, libc::S_IFDIR) {
            let fd = openat(
                dir,
                &t.name,
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            )?;
            sync(&fd)?;
        }
        // The entry itself must be durable too, and that lives in the parent directory.
        let pfd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
        sync(&pfd)?;
        Ok(())
    }
}

fn copy_range(
    src: BorrowedFd<'_>,
    src_offset: u64,
    dst: BorrowedFd<'_>,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let mut soff = to_off(src_offset)?;
    let mut doff = to_off(offset)?;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both fds are live and the offsets are valid, writable loff_t values.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut soff,
                dst.as_raw_fd(),
                &mut doff,
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    return copy_fallback(src, soff, dst, doff, left);
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            break;
        }
        left -= n as u64;
    }
    Ok(())
}

fn copy_fallback(
    src: BorrowedFd<'_>,
    mut soff: libc::off_t,
    dst: BorrowedFd<'_>,
    mut doff: libc::off_t,
    mut left: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK.min(left as usize)];
    while left > 0 {
        let want = buf.len().min(left as usize);
        // SAFETY: the pointer and length describe the live `buf`.
        let n = unsafe { libc::pread(src.as_raw_fd(), buf.as_mut_ptr().cast(), want, soff) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        let n = n as usize;
        pwrite_all(dst, &buf[..n], doff as u64)?;
        soff = soff
            .checked_add(n as libc::off_t)
            .ok_or_else(|| errno(libc::EFBIG))?;
        doff = doff
            .checked_add(n as libc::off_t)
            .ok_or_else(|| errno(libc::EFBIG))?;
        left -= n as u64;
    }
    Ok(())
}

/// Every path an op names: both ends of a rename or link, a copy's source, and the paths
/// whose times it carries.
pub fn op_paths(op: &Op) -> Vec<WirePath> {
    let mut v: Vec<WirePath> = op.primary_path().cloned().into_iter().collect();
    match &op.kind {
        OpKind::Rename { from, .. } => v.push(from.clone()),
        OpKind::Link { existing, .. } => v.push(existing.clone()),
        OpKind::CopyRange { src, .. } => v.push(src.clone()),
        _ => {}
    }
    for t in &op.touch {
        if let Touch::Path(p, _) = t {
            v.push(p.clone());
        }
    }
    v
}
