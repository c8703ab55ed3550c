//! The FUSE adapter: decode a request, call an op, reply. No filesystem logic lives here.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use fuser::{BackingId, InitFlags};
use tracing::{debug, error, info, warn};

use crate::ops::{Caller, Ops, SetAttrReq, TimeArg};

/// What the kernel caches, and what it is told.
///
/// Every change goes through this mount, so the kernel sees every change and may cache
/// names, negative lookups, attributes, directory listings, symlink targets and POSIX ACLs
/// for `ttl` (a day by default), not just a second. Its own bookkeeping covers what a
/// request changes on the inodes it names (a reply carries the new attributes; an unlink
/// drops the link count of every name of the inode; a rename moves the dentry). The rest
/// it is told, with an invalidation sent before the reply, of:
/// - directories whose entries changed (their times, link count): the kernel marks them
///   stale itself, but a getattr that read the old state and is answered after the change
///   would be taken as fresh for a day. An invalidation from the daemon bumps the kernel's
///   attribute version, which makes such a late answer be dropped;
/// - inodes a rename moved or replaced (ctime, link count), a setxattr or removexattr
///   touched (ctime; an ACL also sets the mode), an inode-flag ioctl or a fallocate
///   changed;
/// - a directory moved to another parent: its cached listing (its `..`);
/// - everything a failed mutation may have changed before failing (see `Ops::restate`);
/// - a file with a writer beside passthrough readers: that writer's shared mapping writes
///   the backing file directly, so its attributes are not cached at all while it is open.
pub struct Cache {
    /// How long names, negative lookups and attributes stay valid; zero caches nothing.
    pub ttl: Duration,
    /// Set once the session exists (before the first request).
    pub notifier: Arc<OnceLock<Notifier>>,
}

pub struct TdfsFs {
    pub ops: Ops,
    pub max_write: u32,
    cache: Cache,
    /// Negotiated at init: directories are opened by the kernel alone, which then caches
    /// every listing (see `opendir`).
    no_opendir: AtomicBool,
    /// Negotiated at init: the kernel caches POSIX ACLs (and enforces them).
    posix_acl: AtomicBool,
    /// Use the kernel's FUSE passthrough for read-only opens (if the kernel offers it).
    pub want_passthrough: bool,
    /// Negotiated at init.
    passthrough: AtomicBool,
    /// Negotiated at init with passthrough: opens that do not pass through may be direct
    /// I/O and still be mmapped (FUSE_DIRECT_IO_ALLOW_MMAP). See `Backings`.
    direct: AtomicBool,
    backing: Mutex<Backings>,
    /// Registering a backing file failed once: new read-only opens stop trying (inodes
    /// that have one keep using it, as the kernel requires).
    backing_failed: AtomicBool,
}

/// Passthrough bookkeeping. The kernel's rules: every passthrough open of an inode uses
/// the same backing file; while an inode has passthrough opens, *every* open of it must be
/// passthrough; and a passthrough open fails while the inode has page-cached opens (or a
/// direct-I/O open that is mmapped, which the daemon cannot see).
///
/// Writes must reach the daemon to be replicated. So each open takes one of three modes,
/// and an inode's opens are all in one mode at a time (the counts below never have two
/// non-zero), which keeps every reader coherent with every writer:
/// - *passthrough*: read-only opens while the inode has no other kind. A writer opened
///   beside them must share their backing file, *with FOPEN_DIRECT_IO*: the kernel then
///   sends its read() and write() to the daemon and only its mmap uses the backing file
///   (for that case see `Ops::watch`).
/// - *direct*: write-only opens while the inode has no other kind, and any opened beside
///   them. FOPEN_DIRECT_IO hands the caller's pages to the daemon without first copying
///   them into a FUSE page cache: replicated writes run at about twice the speed of the
///   cached write-through path. Nothing of the inode sits in a FUSE page cache that a
///   direct write could leave stale (the kernel writes back and drops what an mmap of it
///   cached).
/// - *cached* (FOPEN_KEEP_CACHE, write-through): read-write opens while the inode has no
///   other kind, and any opened beside them. A read-write open (a database's) reads what
///   it writes: from the page cache that is about ten times faster than a round trip
///   through the daemon for each 4 KiB pread. Also every open after registering a backing
///   file failed.
///
/// Lock order: these ids, then the order lock.
#[derive(Default)]
struct Backings {
    by_ino: HashMap<u64, Weak<BackingId>>,
    by_fh: HashMap<u64, Handle>,
    modes: HashMap<u64, Modes>,
}

/// An inode's open handles by mode.
#[derive(Default, Clone, Copy, PartialEq, Debug)]
struct Modes {
    passthrough: u32,
    direct: u32,
    cached: u32,
}

/// How an open may use the file (its O_ACCMODE).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    fn of(flags: i32) -> Access {
        match flags & libc::O_ACCMODE {
            libc::O_RDONLY => Access::Read,
            libc::O_WRONLY => Access::Write,
            _ => Access::ReadWrite,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Passthrough,
    Direct,
    Cached,
}

impl Modes {
    fn count(&mut self, mode: Mode) -> &mut u32 {
        match mode {
            Mode::Passthrough => &mut self.passthrough,
            Mode::Direct => &mut self.direct,
            Mode::Cached => &mut self.cached,
        }
    }

    /// The mode of a new open. `direct`: the kernel lets direct-I/O opens mmap.
    /// `passthrough_ok`: backing files can be registered.
    fn choose(&self, access: Access, direct: bool, passthrough_ok: bool) -> Mode {
        if self.passthrough > 0 {
            // Every open of an inode with passthrough opens must pass through.
            Mode::Passthrough
        } else if self.direct > 0 {
            Mode::Direct
        } else if self.cached > 0 {
            Mode::Cached
        } else {
            match access {
                Access::Write if direct => Mode::Direct,
                Access::Read if passthrough_ok => Mode::Passthrough,
                _ => Mode::Cached,
            }
        }
    }
}

struct Handle {
    ino: u64,
    mode: Mode,
    /// A passthrough open's backing id: held here so that it stays registered while the
    /// inode has passthrough opens (`by_ino` holds it weakly).
    _backing: Option<Arc<BackingId>>,
    /// A writable handle sharing the readers' backing file.
    mixed: bool,
}

impl Backings {
    fn add(&mut self, fh: u64, h: Handle) {
        *self.modes.entry(h.ino).or_default().count(h.mode) += 1;
        self.by_fh.insert(fh, h);
    }

    fn remove(&mut self, fh: u64) -> Option<Handle> {
        let h = self.by_fh.remove(&fh)?;
        let m = self.modes.entry(h.ino).or_default();
        let n = m.count(h.mode);
        *n = n.saturating_sub(1);
        if *m == Modes::default() {
            self.modes.remove(&h.ino);
            self.by_ino.remove(&h.ino);
        }
        Some(h)
    }
}

impl TdfsFs {
    pub fn new(ops: Ops, max_write: u32, want_passthrough: bool, cache: Cache) -> Self {
        TdfsFs {
            ops,
            max_write,
            cache,
            no_opendir: AtomicBool::new(false),
            posix_acl: AtomicBool::new(false),
            want_passthrough,
            passthrough: AtomicBool::new(false),
            direct: AtomicBool::new(false),
            backing: Mutex::new(Backings::default()),
            backing_failed: AtomicBool::new(false),
        }
    }
}

fn systime(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn dtype_kind(d: rustix::fs::FileType) -> FileType {
    use rustix::fs::FileType as T;
    match d {
        T::Directory => FileType::Directory,
        T::Symlink => FileType::Symlink,
        T::Fifo => FileType::NamedPipe,
        T::Socket => FileType::Socket,
        T::CharacterDevice => FileType::CharDevice,
        T::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Attributes for a reply that the kernel does not read: a negative lookup (node id 0),
/// and readdirplus's `.` and `..` (which it never links).
fn placeholder(id: u64, kind: FileType) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn is_acl_name(name: &OsStr) -> bool {
    matches!(
        name.as_bytes(),
        b"system.posix_acl_access" | b"system.posix_acl_default"
    )
}

fn attr(id: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: systime(st.st_atime, st.st_atime_nsec),
        mtime: systime(st.st_mtime, st.st_mtime_nsec),
        ctime: systime(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn time_arg(t: Option<TimeOrNow>) -> Option<TimeArg> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeArg::Now,
        TimeOrNow::SpecificTime(s) => match s.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeArg::At(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                // fuser 0.18 decodes the kernel's (sec < 0, nsec) as EPOCH - (|sec| s + nsec
                // ns) rather than EPOCH - |sec| s + nsec ns; invert exactly that encoding so
                // pre-1970 times reach the disk as the caller gave them.
                let d = e.duration();
                TimeArg::At(-(d.as_secs() as i64), d.subsec_nanos())
            }
        },
    })
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

/// Replies to an op with no result but success or an errno.
fn empty(reply: ReplyEmpty, r: std::io::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

/// Replies to getxattr/listxattr: the length when the caller asked for it (size 0), else
/// the bytes.
fn xattr(reply: ReplyXattr, size: u32, r: std::io::Result<Vec<u8>>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

impl TdfsFs {
    /// Whether handle `fh` was opened with FOPEN_DIRECT_IO.
    fn is_direct(&self, fh: u64) -> bool {
        self.backing
            .lock()
            .expect("backing ids poisoned")
            .by_fh
            .get(&fh)
            .is_some_and(|h| h.mode == Mode::Direct || h.mixed)
    }

    fn entry(&self, reply: ReplyEntry, r: std::io::Result<(u64, libc::stat)>) {
        match r {
            Ok((id, st)) => reply.entry_with_ttls(
                &self.attr_ttl(id),
                &self.cache.ttl,
                &attr(id, &st),
                Generation(0),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// How long the kernel may keep `ino`'s attributes.
    fn attr_ttl(&self, ino: u64) -> Duration {
        if self.ops.is_watched(ino) {
            Duration::ZERO
        } else {
            self.cache.ttl
        }
    }

    /// Tells the kernel that what it holds of these inodes' attributes is stale (see
    /// `Cache`). Node id 0 (none) is skipped; an inode the kernel does not have is no error.
    fn stale(&self, inos: &[u64]) {
        self.invalidate(inos, -1);
    }

    /// [`TdfsFs::stale`], and the cached listing of these directories too.
    fn stale_listing(&self, inos: &[u64]) {
        self.invalidate(inos, 0);
    }

    fn invalidate(&self, inos: &[u64], offset: i64) {
        let Some(n) = self.cache.notifier.get() else {
            return;
        };
        if self.cache.ttl.is_zero() {
            return;
        }
        for (i, &ino) in inos.iter().enumerate() {
            if ino == 0 || inos[..i].contains(&ino) {
                continue;
            }
            if let Err(e) = n.inval_inode(INodeNo(ino), offset, 0) {
                // The connection is going away (unmount): nothing is cached any more.
                debug!(ino, "invalidating the kernel's cache: {e}");
            }
        }
    }

    /// Replies to a mutation that names no inode in its reply, invalidating `inos` before
    /// (see `Cache`): on success those whose attributes it changed, on failure those it
    /// may have changed before failing.
    fn empty_stale(
        &self,
        reply: ReplyEmpty,
        r: std::io::Result<()>,
        on_ok: &[u64],
        on_err: &[u64],
    ) {
        self.stale(if r.is_ok() { on_ok } else { on_err });
        empty(reply, r)
    }

    /// Asks for what lets the kernel cache metadata (see `Cache`), as far as it offers it.
    fn init_caching(&self, config: &mut KernelConfig) {
        let caps = config.capabilities();
        let mut want = InitFlags::empty();
        // `ls -l` and `find` get each directory's attributes with its listing: one
        // round trip per directory (a page of entries), not one lookup per entry. Only for
        // the first page of a listing, or after lookups in it (AUTO): a plain readdir
        // (`find -type f`, `du` once cached) asks for no attributes.
        want |= InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO;
        // Lookups and listings of one directory run concurrently.
        want |= InitFlags::FUSE_PARALLEL_DIROPS;
        // A symlink's target never changes (a new one is a new inode).
        want |= InitFlags::FUSE_CACHE_SYMLINKS;
        if caps.contains(InitFlags::FUSE_POSIX_ACL) && self.ops.acls_supported() {
            // The kernel caches ACLs (`ls -l` asks for them for every file) and
            // enforces them in its permission checks, as the backing filesystem would.
            want |= InitFlags::FUSE_POSIX_ACL;
            self.posix_acl.store(true, Ordering::Release);
        }
        let _ = config.add_capabilities(want & caps);
        if caps.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT) {
            self.no_opendir.store(true, Ordering::Release);
        }
        info!(
            ttl_secs = self.cache.ttl.as_secs_f64(),
            readdirplus = caps.contains(InitFlags::FUSE_DO_READDIRPLUS),
            posix_acl = self.posix_acl.load(Ordering::Acquire),
            no_opendir = caps.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT),
            "kernel metadata caching on"
        );
    }

    /// The passthrough backing id for an open of `ino` that `admit` chose to pass through:
    /// the one its readers already share, else a new one `register`ed from the handle's fd
    /// (None: serve it cached). `admit` chooses a first reader only while registering has
    /// never failed.
    fn backing_id(
        &self,
        b: &mut Backings,
        ino: u64,
        fh: u64,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if let Some(id) = b.by_ino.get(&ino).and_then(Weak::upgrade) {
            return Some(id);
        }
        let fd = self.ops.file_fd(fh)?;
        // SAFETY: the fd stays open in the handle table for the whole call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        match register(fd) {
            Ok(id) => {
                let id = Arc::new(id);
                b.by_ino.insert(ino, Arc::downgrade(&id));
                Some(id)
            }
            Err(e) => {
                // Typically EPERM (registering a backing file needs CAP_SYS_ADMIN): it would
                // fail for every open, so stop trying, and say so once.
                if !self.backing_failed.swap(true, Ordering::AcqRel) {
                    warn!(
                        "passthrough open failed ({e}); serving every read through the daemon \
                         from now on"
                    );
                }
                None
            }
        }
    }

    /// Takes handle `fh` of `ino`, just opened (or created) with `flags`, into the
    /// bookkeeping in the mode its inode's opens allow (see `Backings`). Returns the backing
    /// id to reply with, if it passes through, and the open flags. `may_register`: a first
    /// reader may register a backing file (with `register`). On error `fh` is released.
    fn admit(
        &self,
        ino: u64,
        fh: u64,
        flags: i32,
        may_register: bool,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> std::io::Result<(Option<Arc<BackingId>>, FopenFlags)> {
        let access = Access::of(flags);
        let mut b = self.backing.lock().expect("backing ids poisoned");
        let modes = b.modes.get(&ino).copied().unwrap_or_default();
        let mut mode = modes.choose(
            access,
            self.direct.load(Ordering::Acquire),
            may_register && !self.backing_failed.load(Ordering::Acquire),
        );
        let mixed = access != Access::Read && mode == Mode::Passthrough;
        if mixed {
            // A writer beside passthrough readers: it must share their backing file.
            if let Err(e) = self.ops.watch(ino, fh) {
                drop(b);
                self.ops.release(fh);
                return Err(e);
            }
            // Attributes cached before are dropped; while it is open none are cached.
            self.stale(&[ino]);
        }
        let backing = match mode {
            Mode::Passthrough => {
                let id = self.backing_id(&mut b, ino, fh, register);
                if id.is_none() {
                    // Only a first reader gets here (later ones share its id): registering
                    // failed, so it and those after it are served cached.
                    mode = Mode::Cached;
                }
                id
            }
            Mode::Direct | Mode::Cached => None,
        };
        b.add(
            fh,
            Handle {
                ino,
                mode,
                _backing: backing.clone(),
                mixed,
            },
        );
        let flags = match mode {
            Mode::Passthrough if !mixed => FopenFlags::empty(),
            Mode::Passthrough | Mode::Direct => FopenFlags::FOPEN_DIRECT_IO,
            Mode::Cached => FopenFlags::FOPEN_KEEP_CACHE,
        };
        Ok((backing, flags))
    }
}

impl Filesystem for TdfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(self.max_write) {
            warn!("kernel caps max_write at {max}");
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_readahead(1 << 20);
        if self.want_passthrough && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH) {
            // The backing tree is an ordinary filesystem (stack depth 0), so this mount is 1.
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                self.passthrough.store(true, Ordering::Release);
                info!("kernel FUSE passthrough on: read-only opens bypass the daemon");
                // Direct-I/O writers only beside passthrough: without it readers are
                // page-cached, and a direct write racing a cached read could leave a stale
                // page there.
                if config
                    .capabilities()
                    .contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
                    && config
                        .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
                        .is_ok()
                {
                    self.direct.store(true, Ordering::Release);
                }
            }
        } else if self.want_passthrough {
            info!("kernel offers no FUSE passthrough: reads go through the daemon");
        }
        if !self.cache.ttl.is_zero() {
            self.init_caching(config);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Lookup);
        match self.ops.lookup(parent.0, name) {
            // A negative entry (node id 0) with a timeout: the kernel remembers the name is
            // free. Whatever takes it later is created through the mount, which fills it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !self.cache.ttl.is_zero() => reply
                .entry(
                    &self.cache.ttl,
                    &placeholder(0, FileType::RegularFile),
                    Generation(0),
                ),
            r => self.entry(reply, r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Forget);
        self.ops.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Getattr);
        match self.ops.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(st) => reply.attr(&self.attr_ttl(ino.0), &attr(ino.0, &st)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Setattr);
        let req = SetAttrReq {
            mode,
            uid,
            gid,
            size,
            atime: time_arg(atime),
            mtime: time_arg(mtime),
            fh: fh.map(|f| f.0),
        };
        match self.ops.setattr(ino.0, &req) {
            Ok(st) => reply.attr(&self.attr_ttl(ino.0), &attr(ino.0, &st)),
            Err(e) => {
                // An earlier step may have taken effect (see `Ops::setattr`).
                self.stale(&[ino.0]);
                reply.error(errno(e))
            }
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Readlink);
        match self.ops.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Mknod);
        let r = self
            .ops
            .mknod(caller(req), parent.0, name, mode, u64::from(rdev));
        self.stale(&[parent.0]);
        self.entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Mkdir);
        let r = self.ops.mkdir(caller(req), parent.0, name, mode);
        self.stale(&[parent.0]);
        self.entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Unlink);
        let r = self.ops.unlink(parent.0, name, false);
        self.empty_stale(reply, r, &[parent.0], &[parent.0])
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Rmdir);
        let r = self.ops.unlink(parent.0, name, true);
        self.empty_stale(reply, r, &[parent.0], &[parent.0])
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Symlink);
        let r = self.ops.symlink(
            caller(req),
            parent.0,
            link_name,
            target.as_os_str().as_bytes(),
        );
        self.stale(&[parent.0]);
        self.entry(reply, r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Rename);
        // The inodes behind both names, as the kernel knows them (it has looked both up).
        let moved = self.ops.inodes.child(parent.0, name).unwrap_or(0);
        let replaced = self.ops.inodes.child(newparent.0, newname).unwrap_or(0);
        let r = self.ops.rename(
            caller(req),
            parent.0,
            name,
            newparent.0,
            newname,
            flags.bits(),
        );
        let touched = [parent.0, newparent.0, moved, replaced];
        if let Ok(true) = r {
            // A directory moved to another parent: its listing's `..` changed (the other
            // side of an exchange moved too).
            let exchanged = flags.bits() & libc::RENAME_EXCHANGE != 0;
            self.stale_listing(&[moved, if exchanged { replaced } else { 0 }]);
        }
        self.empty_stale(reply, r.map(drop), &touched, &touched)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Link);
        let r = self.ops.link(ino.0, newparent.0, newname);
        if r.is_err() {
            self.stale(&[ino.0]);
        }
        self.stale(&[newparent.0]);
        self.entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Open);
        let fh = match self.ops.open(ino.0, flags.0) {
            Ok(fh) => fh,
            Err(e) => return reply.error(errno(e)),
        };
        if !self.passthrough.load(Ordering::Acquire) {
            return reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
        }
        match self.admit(ino.0, fh, flags.0, true, |fd| reply.open_backing(fd)) {
            Ok((Some(id), f)) => reply.opened_passthrough(FileHandle(fh), f, &id),
            Ok((None, f)) => reply.opened(FileHandle(fh), f),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Read);
        match self.ops.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Write);
        // An O_SYNC/O_DSYNC write is a barrier like fsync. On a page-cached open the kernel
        // follows each such write with an FSYNC request; on a direct-I/O open it does not,
        // so the write itself waits for the slaves there.
        let sync = if flags.0 & libc::O_DSYNC != 0 && self.is_direct(fh.0) {
            Some(flags.0 & libc::O_SYNC != libc::O_SYNC)
        } else {
            None
        };
        match self.ops.write(ino.0, fh.0, offset, data, sync) {
            Ok(n) => {
                // A write-back of a shared mapping: the kernel marks the times stale but
                // does not bump the attribute version (see `Cache`).
                if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
                    self.stale(&[ino.0]);
                }
                reply.written(n)
            }
            Err(e) => {
                // A failed write may have moved the times (see `Ops::restate`).
                self.stale(&[ino.0]);
                reply.error(errno(e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Flush);
        // Nothing happens at close here: writes are replicated as they come, fsync is the
        // barrier, and locks are the kernel's own (no getlk/setlk). ENOSYS tells the kernel
        // to stop sending FLUSH at all (fc->no_flush), which takes one of the five round
        // trips of a create-write-close off every file.
        reply.error(fuser::Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Release);
        self.ops.release(fh.0);
        let gone = self
            .backing
            .lock()
            .expect("backing ids poisoned")
            .remove(fh.0);
        if let Some(Handle {
            ino, mixed: true, ..
        }) = gone
        {
            if let Err(e) = self.ops.unwatch(ino) {
                error!(
                    ino,
                    "could not resend a file changed through a shared mapping: {e}"
                );
            }
            // Its mapping may have moved the times: from now on they are cached again.
            self.stale(&[ino]);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Fsync);
        let mixed = self
            .backing
            .lock()
            .expect("backing ids poisoned")
            .by_fh
            .get(&fh.0)
            .is_some_and(|h| h.mixed);
        if mixed {
            self.stale(&[ino.0]);
            if let Err(e) = self.ops.recheck_watched(ino.0) {
                return reply.error(errno(e));
            }
        }
        empty(reply, self.ops.fsync(ino.0, Some(fh.0), datasync))
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Opendir);
        if self.no_opendir.load(Ordering::Acquire) {
            // From now on the kernel opens directories without asking (no opendir or
            // releasedir round trips), and caches every listing (FOPEN_CACHE_DIR and
            // FOPEN_KEEP_CACHE): it drops one when the directory changes, and every change
            // reaches it through this mount.
            return reply.error(Errno::ENOSYS);
        }
        // Listings are stateless (see `Ops::readdir`): no handle.
        let flags = if self.cache.ttl.is_zero() {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        };
        reply.opened(FileHandle(0), flags);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Readdir);
        let r = self.ops.readdir(ino.0, offset, false, |e| {
            reply.add(
                INodeNo(e.ino),
                e.offset,
                dtype_kind(e.kind),
                OsStr::from_bytes(e.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Readdirplus);
        let r = self.ops.readdir(ino.0, offset, true, |e| {
            let name = OsStr::from_bytes(e.name);
            match &e.plus {
                Some(st) => reply.add(
                    INodeNo(e.ino),
                    e.offset,
                    name,
                    &self.attr_ttl(e.ino),
                    &attr(e.ino, st),
                    Generation(0),
                ),
                // `.` and `..`: listed, never linked by the kernel, so not counted.
                None => reply.add(
                    INodeNo(e.ino),
                    e.offset,
                    name,
                    &Duration::ZERO,
                    &placeholder(e.ino, FileType::Directory),
                    Generation(0),
                ),
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Releasedir);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Fsyncdir);
        empty(reply, self.ops.fsync(ino.0, None, datasync))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Statfs);
        match self.ops.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Setxattr);
        let r = self.ops.setxattr(ino.0, name, value, flags);
        self.empty_stale(reply, r, &[ino.0], &[])
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Getxattr);
        let mut r = self.ops.getxattr(ino.0, name, size as usize);
        if self.posix_acl.load(Ordering::Relaxed) && is_acl_name(name) {
            if let Err(e) = &r {
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    // An inode on a filesystem without ACLs (mounted inside the backing
                    // tree) has none: the kernel would fail every permission check that
                    // consults its ACL with EOPNOTSUPP.
                    r = Err(std::io::Error::from_raw_os_error(libc::ENODATA));
                }
            }
        }
        xattr(reply, size, r)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Listxattr);
        xattr(reply, size, self.ops.listxattr(ino.0, size as usize))
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Removexattr);
        let r = self.ops.removexattr(ino.0, name);
        self.empty_stale(reply, r, &[ino.0], &[])
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Access);
        empty(reply, self.ops.access(ino.0))
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Create);
        let r = self.ops.create(caller(req), parent.0, name, mode, flags);
        if r.is_err() {
            // A creation that failed late may have made and removed the entry, moving the
            // parent's times. On success the kernel invalidates the parent itself
            // (fuse_dir_changed), so telling it again would only cost a notification.
            self.stale(&[parent.0]);
        }
        match r {
            Ok((id, st, fh)) => {
                if !self.passthrough.load(Ordering::Acquire) {
                    return reply.created(
                        &self.cache.ttl,
                        &attr(id, &st),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    );
                }
                // Usually a new file, with no opens (a read-only create is rare enough not
                // to register a backing file for: it is served cached). Without O_EXCL it
                // may be an existing file that another opener holds: then it joins their
                // mode, as in `open`.
                let admitted = self.admit(id, fh, flags, false, |fd| reply.open_backing(fd));
                let (a, fh) = (attr(id, &st), FileHandle(fh));
                match admitted {
                    Ok((Some(bid), f)) => {
                        reply.created_passthrough(&self.cache.ttl, &a, Generation(0), fh, f, &bid)
                    }
                    Ok((None, f)) => reply.created(&self.cache.ttl, &a, Generation(0), fh, f),
                    Err(e) => reply.error(errno(e)),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Fallocate);
        let r = self.ops.fallocate(ino.0, fh.0, offset, length, mode);
        // With FALLOC_FL_KEEP_SIZE the kernel marks the times stale without a version
        // bump; a failed one may have allocated part of the range.
        self.empty_stale(reply, r, &[ino.0], &[ino.0])
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::Lseek);
        match self.ops.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        use tdfs_replication::flags::{
            FsXattr, FS_IOC32_GETFLAGS, FS_IOC32_SETFLAGS, FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR,
        };
        let _t = crate::metrics::time(crate::metrics::FuseOp::Ioctl);
        // Only the inode-flag ioctls (chattr, lsattr): the kernel turns a caller's
        // FS_IOC_{GET,SET}FLAGS and FS_IOC_FS{GET,SET}XATTR on the mount into these, after
        // checking ownership and CAP_LINUX_IMMUTABLE. Nothing else reaches the backing file
        // by ioctl: an unknown request could change it behind the replicas' back.
        let cmd = libc::c_ulong::from(cmd);
        let word = |d: &[u8]| {
            d.get(..4)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4")))
        };
        let r = if cmd == libc::FS_IOC_GETFLAGS as libc::c_ulong || cmd == FS_IOC32_GETFLAGS {
            self.ops
                .get_flags(ino.0, fh.0)
                .map(|f| (f as i32).to_ne_bytes().to_vec())
        } else if cmd == libc::FS_IOC_SETFLAGS as libc::c_ulong || cmd == FS_IOC32_SETFLAGS {
            match word(in_data) {
                Some(f) => self
                    .ops
                    .set_flags(ino.0, fh.0, Some(f), None)
                    .map(|()| Vec::new()),
                None => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
            }
        } else if cmd == FS_IOC_FSGETXATTR {
            self.ops
                .get_fsxattr(ino.0, fh.0)
                .map(|x| x.to_bytes().to_vec())
        } else if cmd == FS_IOC_FSSETXATTR {
            match FsXattr::from_bytes(in_data) {
                Some(x) => self
                    .ops
                    .set_flags(ino.0, fh.0, None, Some(x))
                    .map(|()| Vec::new()),
                None => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
            }
        } else {
            Err(std::io::Error::from_raw_os_error(libc::ENOTTY))
        };
        if r.is_ok()
            && (cmd == libc::FS_IOC_SETFLAGS as libc::c_ulong
                || cmd == FS_IOC32_SETFLAGS
                || cmd == FS_IOC_FSSETXATTR)
        {
            // The kernel does not know that flags move the ctime.
            self.stale(&[ino.0]);
        }
        match r {
            Ok(data) => reply.ioctl(0, &data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _t = crate::metrics::time(crate::metrics::FuseOp::CopyFileRange);
        match self.ops.copy_file_range(
            ino_in.0, fh_in.0, offset_in, ino_out.0, fh_out.0, offset_out, len,
        ) {
            Ok(n) => reply.written(n),
            Err(e) => {
                self.stale(&[ino_out.0]);
                reply.error(errno(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Access, Mode, Modes};

    /// Every interleaving of opens and closes (up to a depth) keeps an inode's opens in one
    /// mode, and a writer never starts passthrough on its own (it only joins readers).
    #[test]
    fn an_inodes_opens_share_one_mode() {
        // (access, mode) of each open handle.
        fn walk(open: &mut Vec<(Access, Mode)>, m: &mut Modes, depth: u32, direct: bool, pt: bool) {
            let nonzero = [m.passthrough, m.direct, m.cached]
                .iter()
                .filter(|&&n| n > 0)
                .count();
            assert!(nonzero <= 1, "mixed modes {m:?} after {open:?}");
            if depth == 0 {
                return;
            }
            for access in [Access::Read, Access::Write, Access::ReadWrite] {
                let mode = m.choose(access, direct, pt);
                if access != Access::Read && mode == Mode::Passthrough {
                    assert!(m.passthrough > 0, "a writer started passthrough: {open:?}");
                }
                if !direct {
                    assert_ne!(mode, Mode::Direct, "direct I/O without the capability");
                }
                *m.count(mode) += 1;
                open.push((access, mode));
                walk(open, m, depth - 1, direct, pt);
                open.pop();
                *m.count(mode) -= 1;
            }
            for i in 0..open.len() {
                let h = open.remove(i);
                *m.count(h.1) -= 1;
                walk(open, m, depth - 1, direct, pt);
                *m.count(h.1) += 1;
                open.insert(i, h);
            }
        }
        for direct in [false, true] {
            for pt in [false, true] {
                walk(&mut Vec::new(), &mut Modes::default(), 7, direct, pt);
            }
        }
        // The choices that make writes fast and reads bypass the daemon.
        let none = Modes::default();
        assert_eq!(none.choose(Access::Write, true, true), Mode::Direct);
        assert_eq!(none.choose(Access::Read, true, true), Mode::Passthrough);
        assert_eq!(none.choose(Access::ReadWrite, true, true), Mode::Cached);
        assert_eq!(none.choose(Access::Write, false, true), Mode::Cached);
        assert_eq!(none.choose(Access::Read, true, false), Mode::Cached);
    }
}
