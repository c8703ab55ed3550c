//! Operations on the backing tree. Each returns `io::Result`; each mutation runs inside
//! [`Replicator::mutate`] and yields the op that reproduces its effect on a slave, built from
//! what the backing tree says *after* the syscall (resulting mode, owner and timestamps).

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tdfs_protocol::op::{MAX_WRITE, RENAME_EXCHANGE, RENAME_NOREPLACE};

/// `renameat2` flag (not on the wire: replicated as a rename and a device node).
const RENAME_WHITEOUT: u32 = 4;
use tdfs_protocol::{Attr, NodeKind, Op, OpKind, Touch, WirePath};
use tracing::{debug, warn};

use crate::backing::{cvt, cvt_sz, fstat, times_of, Backing};
use crate::inode::{Inodes, Xattrs};
use tdfs_replication::flags::FsXattr;
use tdfs_replication::repl::{Emit, Replicator};

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Who is asking (from the FUSE request header).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug)]
pub struct OpenFile {
    pub ino: u64,
    fd: OwnedFd,
    append: bool,
}

impl OpenFile {
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One directory entry for readdir.
pub struct DirEntry<'a> {
    /// The node id its inode has (or would have) in the inode table.
    pub ino: u64,
    /// The cookie of the entry after it.
    pub offset: u64,
    pub kind: rustix::fs::FileType,
    pub name: &'a [u8],
    /// For readdirplus: its attributes, and a lookup counted for it.
    pub plus: Option<libc::stat>,
}

/// getdents64 buffer: about what one FUSE reply holds (the kernel asks for a page of
/// entries at a time), so that little is read and thrown away.
const DIRENT_BUF: usize = 4096;

pub struct Ops {
    pub backing: Backing,
    pub inodes: Inodes,
    pub repl: Replicator,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    /// Inodes with a writer that shares the kernel's passthrough backing file with readers
    /// (see `fs.rs`). Lock order: after the order lock.
    watched: Mutex<HashMap<u64, Watch>>,
    /// `watched.len()`, read without the lock on the write path.
    n_watched: AtomicUsize,
}

/// A writer opened while readers bypass the daemon must share their passthrough backing
/// file (a kernel rule), with FOPEN_DIRECT_IO so its read() and write() still reach the
/// daemon. Its *shared mmap*, though, maps the backing file directly: those stores would
/// never be replicated. Every store through such a mapping moves the file's ctime (the
/// page-fault path updates it), so the daemon remembers the ctime its own writes left and,
/// when such a writer closes, sends the whole content if anything else moved it.
#[derive(Debug)]
struct Watch {
    /// The ctime after the daemon's last write (or when watching began).
    ctime: (i64, i64),
    /// Something other than the daemon changed the file since: resend.
    tainted: bool,
    writers: u32,
}

/// The op that leaves a replica's entry with `st`'s attributes and times (and `size`).
fn setattr_op(path: WirePath, size: Option<u64>, st: &libc::stat) -> Op {
    Op::new(OpKind::SetAttr {
        path,
        size,
        attr: attr_of(st),
    })
    .with_touch(Touch::Own(times_of(st)))
}

fn ctime_of(st: &libc::stat) -> (i64, i64) {
    (st.st_ctime, st.st_ctime_nsec)
}

/// How much of a file goes in one op when its content is resent.
const RESEND_CHUNK: usize = 1 << 20;

fn attr_of(st: &libc::stat) -> Attr {
    Attr {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
    }
}

fn to_timespec(t: Option<TimeArg>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeArg::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeArg::At(sec, nsec)) => libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec as i64,
        },
    }
}

#[derive(Debug, Clone, Copy)]
pub enum TimeArg {
    Now,
    At(i64, u32),
}

impl SetAttrReq {
    /// Nothing to change but the ctime.
    fn is_empty(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
    }
}

/// What setattr was asked to change.
#[derive(Debug, Default)]
pub struct SetAttrReq {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeArg>,
    pub mtime: Option<TimeArg>,
    pub fh: Option<u64>,
}

impl Ops {
    pub fn new(backing: Backing, repl: Replicator) -> Self {
        let inodes = Inodes::new(backing.dev, backing.ino);
        Ops {
            backing,
            inodes,
            repl,
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            watched: Mutex::new(HashMap::new()),
            n_watched: AtomicUsize::new(0),
        }
    }

    fn path(&self, ino: u64) -> io::Result<WirePath> {
        self.inodes.path(ino)?.ok_or_else(|| err(libc::ENOENT))
    }

    fn file(&self, fh: u64) -> io::Result<Arc<OpenFile>> {
        self.files
            .lock()
            .expect("files poisoned")
            .get(&fh)
            .cloned()
            .ok_or_else(|| err(libc::EBADF))
    }

    /// The backing fd of an open handle.
    pub fn file_fd(&self, fh: u64) -> Option<RawFd> {
        self.file(fh).ok().map(|f| f.fd())
    }

    /// An open handle on `ino`, for attributes of an inode that may have no name left.
    fn any_open(&self, ino: u64) -> Option<Arc<OpenFile>> {
        self.files
            .lock()
            .expect("files poisoned")
            .values()
            .find(|f| f.ino == ino)
            .cloned()
    }

    /// Where the slaves know this inode by, or `None` when it has no name left (then a
    /// change to it has no visible effect on a replica and is not sent).
    fn replica_path(&self, ino: u64, st: &libc::stat) -> io::Result<Option<WirePath>> {
        if let Some(p) = self.inodes.path(ino)? {
            return Ok(Some(p));
        }
        if st.st_nlink == 0 {
            return Ok(None);
        }
        // Every name the kernel looked up was unlinked, but a hard link it never looked up
        // remains: find it (rare; costs a walk of the tree).
        debug!(
            ino,
            "searching the tree for a remaining name of a hard-linked inode"
        );
        Ok(self.find_by_inode(st.st_dev, st.st_ino))
    }

    /// After a mutation of `ino` failed: restates on the replicas what the backing inode
    /// holds now (`st`, read after the failure). A syscall may change an inode before it fails
    /// (ext4 moves a file's times before it rejects a direct write or runs out of space; a
    /// setattr may fail at its last step), and whatever the backing tree ends up with, the
    /// replicas must end up with too. `with_size`: the failed call could have changed the
    /// size. Restating what did not change costs a replica nothing but a few syscalls.
    fn restate(&self, emit: &mut Emit, ino: u64, st: io::Result<libc::stat>, with_size: bool) {
        let Ok(st) = st else { return };
        if let Ok(Some(path)) = self.replica_path(ino, &st) {
            emit.op(setattr_op(
                path,
                with_size.then_some(st.st_size as u64),
                &st,
            ));
        }
    }

    fn find_by_inode(&self, dev: u64, ino: u64) -> Option<WirePath> {
        let mut stack = vec![WirePath::root()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = self.list(&dir) else {
                continue;
            };
            for (name, _, dtype) in entries {
                let Ok(p) = dir.join(&name) else { continue };
                if dtype == rustix::fs::FileType::Directory {
                    stack.push(p);
                } else if let Ok(st) = self.backing.lstat(&p) {
                    if st.st_dev == dev && st.st_ino == ino {
                        return Some(p);
                    }
                }
            }
        }
        None
    }

    fn list(&self, dir: &WirePath) -> io::Result<Vec<(Vec<u8>, u64, rustix::fs::FileType)>> {
        let fd = self
            .backing
            .open(dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let mut buf = [std::mem::MaybeUninit::uninit(); DIRENT_BUF];
        let mut entries = rustix::fs::RawDir::new(&fd, &mut buf);
        let mut out = Vec::new();
        while let Some(e) = entries.next() {
            let e = e?;
            let name = e.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push((name.to_vec(), e.ino(), e.file_type()));
            }
        }
        Ok(out)
    }

    // ---- reads -------------------------------------------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<(u64, libc::stat)> {
        loop {
            let generation = self.inodes.generation();
            let p = self.inodes.child_path(parent, name)?;
            let st = self.backing.lstat(&p)?;
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            if let Some(id) = self
                .inodes
                .lookup_checked(generation, parent, name, st.st_dev, st.st_ino, is_dir)
            {
                return Ok((id, st));
            }
            // A name changed meanwhile: what the lstat saw may be gone. Look again.
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> io::Result<libc::stat> {
        if let Some(f) = fh.and_then(|fh| self.file(fh).ok()) {
            return fstat(f.fd());
        }
        // The kernel may cache the answer for long: it must be this inode's, not that of
        // whatever a concurrent rename just moved onto its name (then read the name again).
        for _ in 0..16 {
            match self.inodes.path(ino)? {
                Some(p) => {
                    let st = self.backing.lstat(&p)?;
                    if self.inodes.peek_id(st.st_dev, st.st_ino) == ino {
                        return Ok(st);
                    }
                }
                None => {
                    return match self.any_open(ino) {
                        Some(f) => fstat(f.fd()),
                        None => Err(err(libc::ENOENT)),
                    }
                }
            }
        }
        Err(err(libc::ESTALE))
    }

    /// Whether a writer shares `ino`'s passthrough backing file (see `Watch`): its shared
    /// mapping changes the file's times without the daemon, so the kernel must not cache
    /// its attributes.
    pub fn is_watched(&self, ino: u64) -> bool {
        self.n_watched.load(Ordering::Acquire) > 0
            && self
                .watched
                .lock()
                .expect("watched poisoned")
                .contains_key(&ino)
    }

    pub fn readlink(&self, ino: u64) -> io::Result<Vec<u8>> {
        self.backing.readlink(&self.path(ino)?)
    }

    pub fn statfs(&self) -> io::Result<libc::statvfs> {
        self.backing.statfs()
    }

    pub fn access(&self, ino: u64) -> io::Result<()> {
        // Permission checks are the kernel's (default_permissions); this only says it exists.
        self.getattr(ino, None).map(drop)
    }

    /// `ls -l` asks for an SELinux label and ACLs of every file, and most files have no
    /// xattr at all: a file's first query lists its xattrs instead (one syscall either
    /// way), and when there are none, later queries are answered without a syscall.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: usize) -> io::Result<Vec<u8>> {
        let (known, epoch) = self.inodes.xattrs(ino);
        if known == Xattrs::None {
            return Err(err(libc::ENODATA));
        }
        let p = self.path(ino)?;
        if known == Xattrs::Unknown {
            match self.backing.listxattr(&p, 0) {
                Ok(l) if l.is_empty() => {
                    self.inodes.set_xattrs(ino, epoch, Xattrs::None);
                    return Err(err(libc::ENODATA));
                }
                Ok(_) => self.inodes.set_xattrs(ino, epoch, Xattrs::Some),
                Err(_) => {}
            }
        }
        self.backing.getxattr(&p, name.as_bytes(), size)
    }

    /// Whether the backing filesystem keeps POSIX ACLs (its root answers for one).
    pub fn acls_supported(&self) -> bool {
        match self
            .backing
            .getxattr(&WirePath::root(), b"system.posix_acl_access", 0)
        {
            Ok(_) => true,
            Err(e) => e.raw_os_error() == Some(libc::ENODATA),
        }
    }

    pub fn listxattr(&self, ino: u64, size: usize) -> io::Result<Vec<u8>> {
        if self.inodes.xattrs(ino).0 == Xattrs::None {
            return Ok(Vec::new());
        }
        self.backing.listxattr(&self.path(ino)?, size)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let f = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            // SAFETY: the slice after `done` is writable for its length.
            let n = cvt_sz(unsafe {
                libc::pread(
                    f.fd(),
                    buf[done..].as_mut_ptr().cast(),
                    buf.len() - done,
                    (offset + done as u64) as libc::off_t,
                )
            })?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> io::Result<i64> {
        let f = self.file(fh)?;
        // SAFETY: plain lseek on an fd we own.
        let r = unsafe { libc::lseek(f.fd(), offset, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    // ---- open files ------------------------------------------------------------------

    fn add_file(&self, ino: u64, fd: OwnedFd, flags: i32) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().expect("files poisoned").insert(
            fh,
            Arc::new(OpenFile {
                ino,
                fd,
                append: flags & libc::O_APPEND != 0,
            }),
        );
        fh
    }

    fn open_flags(flags: i32) -> i32 {
        // Creation is done by create(); truncation arrives as setattr (no atomic_o_trunc),
        // but is honoured below if a kernel sends it. O_DIRECT stays with the kernel: a
        // direct write reaches the daemon in a buffer of fuser's, at an address the backing
        // filesystem's alignment rules do not allow (every such pwrite failed with EINVAL).
        // The caller's direct I/O still bypasses the FUSE page cache, and durability is
        // fsync's (or O_SYNC's) business, as with O_DIRECT anywhere.
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC | libc::O_DIRECT)
    }

    /// The kernel opens only regular files through FUSE; `fd`, just opened by `ino`'s
    /// name, must be that very file. Anything else means the name moved on (ESTALE makes the
    /// kernel look the name up again).
    fn check_opened(&self, ino: u64, fd: RawFd) -> io::Result<libc::stat> {
        let st = fstat(fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG
            || self.inodes.peek_id(st.st_dev, st.st_ino) != ino
        {
            return Err(err(libc::ESTALE));
        }
        Ok(st)
    }

    pub fn open(&self, ino: u64, flags: i32) -> io::Result<u64> {
        let p = self.path(ino)?;
        let fd = self.backing.open(&p, Self::open_flags(flags), 0)?;
        self.check_opened(ino, fd.as_raw_fd())?;
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.truncate_fd(ino, fd.as_raw_fd(), 0)?;
        }
        Ok(self.add_file(ino, fd, flags))
    }

    fn truncate_fd(&self, ino: u64, fd: RawFd, size: u64) -> io::Result<()> {
        self.repl.mutate(|| {
            // SAFETY: ftruncate on an fd we own.
            cvt(unsafe { libc::ftruncate(fd, size as libc::off_t) })?;
            let st = fstat(fd)?;
            let op = self
                .replica_path(ino, &st)?
                .map(|path| setattr_op(path, Some(size), &st));
            Ok(((), op))
        })
    }

    pub fn release(&self, fh: u64) {
        self.files.lock().expect("files poisoned").remove(&fh);
    }

    // ---- writers beside passthrough readers (see `Watch`) -----------------------------

    /// A writer of `ino` (handle `fh`) now shares the readers' passthrough backing file.
    pub fn watch(&self, ino: u64, fh: u64) -> io::Result<()> {
        let f = self.file(fh)?;
        // Under the order lock: no daemon write can slip between the stat and the record.
        self.repl.mutate(|| {
            let st = fstat(f.fd())?;
            let mut w = self.watched.lock().expect("watched poisoned");
            w.entry(ino)
                .or_insert(Watch {
                    ctime: ctime_of(&st),
                    tainted: false,
                    writers: 0,
                })
                .writers += 1;
            self.n_watched.store(w.len(), Ordering::Release);
            Ok(((), None))
        })
    }

    /// Before a daemon write to a watched inode: a ctime that moved since the daemon's last
    /// write means a store through a shared mapping happened in between.
    fn watch_before(&self, ino: u64, fd: RawFd) {
        let mut w = self.watched.lock().expect("watched poisoned");
        if let Some(e) = w.get_mut(&ino) {
            if fstat(fd).map_or(true, |st| ctime_of(&st) != e.ctime) {
                e.tainted = true;
            }
        }
    }

    fn watch_after(&self, ino: u64, st: &libc::stat) {
        if let Some(e) = self.watched.lock().expect("watched poisoned").get_mut(&ino) {
            e.ctime = ctime_of(st);
        }
    }

    /// A writer that shared the passthrough backing file closed (after its last mapping
    /// went away): if the file changed behind the daemon's back, send its whole content,
    /// so the replicas hold what the master holds.
    pub fn unwatch(&self, ino: u64) -> io::Result<()> {
        self.check_watched(ino, true)
    }

    /// Before such a writer's fsync: the same check, so the barrier covers its mapping.
    pub fn recheck_watched(&self, ino: u64) -> io::Result<()> {
        self.check_watched(ino, false)
    }

    fn check_watched(&self, ino: u64, closing: bool) -> io::Result<()> {
        let changed = self.repl.mutate(|| {
            let mut w = self.watched.lock().expect("watched poisoned");
            let Some(e) = w.get_mut(&ino) else {
                return Ok((false, None));
            };
            let changed = e.tainted
                || match self.inodes.path(ino)? {
                    Some(p) => self
                        .backing
                        .lstat(&p)
                        .map_or(true, |st| ctime_of(&st) != e.ctime),
                    None => false,
                };
            e.tainted = false;
            if closing {
                e.writers -= 1;
                if e.writers == 0 {
                    w.remove(&ino);
                }
            }
            self.n_watched.store(w.len(), Ordering::Release);
            Ok((changed, None))
        })?;
        if changed {
            debug!(
                ino,
                "file changed outside the daemon (shared mmap): resending it"
            );
            self.resend_content(ino)?;
        }
        Ok(())
    }

    /// Sends `ino`'s current content, size and times to the slaves, a piece per op, each
    /// read under the order lock so it lands between the ops it happened between.
    fn resend_content(&self, ino: u64) -> io::Result<()> {
        let Some(p) = self.inodes.path(ino)? else {
            return Ok(());
        };
        let fd = self
            .backing
            .open(&p, libc::O_RDONLY | libc::O_NOFOLLOW, 0)?;
        // A page already dirty and writable in a mapping takes further stores without a
        // fault, so without moving the ctime. Writing the pages back write-protects them:
        // any store after this point faults and moves the ctime again, to be seen next time.
        // SAFETY: fdatasync on an fd we own.
        cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) })?;
        let mut buf = vec![0u8; RESEND_CHUNK];
        let mut offset = 0u64;
        loop {
            let (n, _) = self.repl.mutate_encoded(|| {
                let st = fstat(fd.as_raw_fd())?;
                if offset == 0 {
                    // After the write-back, under the order lock: the baseline from now on.
                    if let Some(e) = self.watched.lock().expect("watched poisoned").get_mut(&ino) {
                        e.ctime = ctime_of(&st);
                    }
                }
                let Some(path) = self.replica_path(ino, &st)? else {
                    return Ok((0, None));
                };
                let want = RESEND_CHUNK.min((st.st_size as u64).saturating_sub(offset) as usize);
                // SAFETY: `buf` is writable for `want` <= its length bytes.
                let n = cvt_sz(unsafe {
                    libc::pread(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        want,
                        offset as libc::off_t,
                    )
                })?;
                let op = (n > 0).then(|| {
                    tdfs_protocol::op::encode_write(
                        &path,
                        offset,
                        &buf[..n],
                        &[Touch::Own(times_of(&st))],
                    )
                });
                Ok((n, op))
            })?;
            if n == 0 {
                break;
            }
            offset += n as u64;
        }
        // The end: size (the file may have shrunk meanwhile) and times.
        self.repl.mutate(|| {
            let st = fstat(fd.as_raw_fd())?;
            let op = self
                .replica_path(ino, &st)?
                .map(|path| setattr_op(path, Some(st.st_size as u64), &st));
            Ok(((), op))
        })
    }

    /// Sets ownership of a just-created entry to the caller's, the way the kernel would have
    /// had the caller created it: gid from a setgid parent, and setuid/setgid bits restored
    /// after chown (which clears them). Returns the entry's attributes and its parent's
    /// resulting times (the parent is stat'ed after the creation, and chown of the entry
    /// does not change it, so one stat serves both).
    fn own(
        &self,
        p: &WirePath,
        who: Caller,
        mode: u32,
        is_dir: bool,
    ) -> io::Result<(libc::stat, Touch)> {
        let parent = self.backing.lstat(&p.parent())?;
        let gid = if parent.st_mode & libc::S_ISGID != 0 {
            parent.st_gid
        } else {
            who.gid
        };
        if who.uid != 0 || gid != 0 {
            self.backing.chown(p, who.uid, gid)?;
            if !is_dir && mode & 0o6000 != 0 {
                self.backing.chmod(p, mode & 0o7777)?;
            }
        }
        Ok((self.backing.lstat(p)?, Touch::Parent(times_of(&parent))))
    }

    fn register_new(&self, parent: u64, name: &OsStr, st: &libc::stat) -> u64 {
        self.inodes.lookup(
            parent,
            name,
            st.st_dev,
            st.st_ino,
            st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        )
    }

    /// After `p` was created in the backing tree: the caller's ownership (see `own`), its
    /// name in the inode table, and the op that recreates it (`kind` from its attributes)
    /// with its own times and its parent's. If giving it to the caller fails (a quota, say),
    /// the entry is removed again, so the call fails without a trace on the master, and
    /// the parent's times (moved by both) are restated to the replicas.
    #[allow(clippy::too_many_arguments)]
    fn created(
        &self,
        emit: &mut Emit,
        parent: u64,
        name: &OsStr,
        p: &WirePath,
        who: Caller,
        perm: u32,
        is_dir: bool,
        kind: impl FnOnce(Attr, &libc::stat) -> OpKind,
    ) -> io::Result<(u64, libc::stat)> {
        let (st, parent_times) = match self.own(p, who, perm, is_dir) {
            Ok(v) => v,
            Err(e) => {
                match self.backing.unlink(p, is_dir) {
                    Ok(()) => {
                        if let Ok(t) = self.parent_touch(p) {
                            let Touch::Parent(times) = t else {
                                unreachable!()
                            };
                            emit.op(Op::new(OpKind::SetTimes { path: p.parent() })
                                .with_touch(Touch::Own(times)));
                        }
                    }
                    Err(u) => {
                        // It stays: the replicas get it as it is.
                        warn!(path = %p, "could not remove an entry whose creation failed ({e}): {u}");
                        if let Ok(st) = self.backing.lstat(p) {
                            let mut op = Op::new(kind(attr_of(&st), &st))
                                .with_touch(Touch::Own(times_of(&st)));
                            if let Ok(t) = self.parent_touch(p) {
                                op = op.with_touch(t);
                            }
                            emit.op(op);
                        }
                    }
                }
                return Err(e);
            }
        };
        let id = self.register_new(parent, name, &st);
        emit.op(Op::new(kind(attr_of(&st), &st))
            .with_touch(Touch::Own(times_of(&st)))
            .with_touch(parent_times));
        Ok((id, st))
    }

    fn parent_touch(&self, p: &WirePath) -> io::Result<Touch> {
        Ok(Touch::Parent(times_of(&self.backing.lstat(&p.parent())?)))
    }

    pub fn create(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> io::Result<(u64, libc::stat, u64)> {
        let p = self.inodes.child_path(parent, name)?;
        let perm = mode & 0o7777;
        self.repl
            .mutate_with(|emit| {
                let oflags = Self::open_flags(flags) | libc::O_CREAT | libc::O_EXCL;
                let fd = match self.backing.open(&p, oflags, perm) {
                    Ok(fd) => fd,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 =>
                    {
                        // It exists after all: this is a plain open, not a creation.
                        let fd = self.backing.open(&p, Self::open_flags(flags), 0)?;
                        let st = fstat(fd.as_raw_fd())?;
                        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                            // Not something FUSE opens (a FIFO made meanwhile, say): let
                            // the kernel look it up and open it itself.
                            return Err(err(libc::ESTALE));
                        }
                        let id = self.register_new(parent, name, &st);
                        let fh = self.add_file(id, fd, flags);
                        return Ok((id, st, fh));
                    }
                    Err(e) => return Err(e),
                };
                let (id, st) =
                    self.created(emit, parent, name, &p, who, perm, false, |attr, _| {
                        OpKind::Create {
                            path: p.clone(),
                            attr,
                        }
                    })?;
                let fh = self.add_file(id, fd, flags);
                Ok((id, st, fh))
            })
            .map(|(v, _)| v)
    }

    pub fn mknod(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u64,
    ) -> io::Result<(u64, libc::stat)> {
        let p = self.inodes.child_path(parent, name)?;
        let kind = match mode & libc::S_IFMT {
            libc::S_IFIFO => NodeKind::Fifo,
            libc::S_IFSOCK => NodeKind::Socket,
            libc::S_IFCHR => NodeKind::Char,
            libc::S_IFBLK => NodeKind::Block,
            libc::S_IFREG | 0 => NodeKind::Regular,
            _ => return Err(err(libc::EINVAL)),
        };
        self.repl
            .mutate_with(|emit| {
                self.backing.mknod(&p, mode, rdev)?;
                self.created(
                    emit,
                    parent,
                    name,
                    &p,
                    who,
                    mode & 0o7777,
                    false,
                    |attr, st| OpKind::Mknod {
                        path: p.clone(),
                        kind,
                        rdev: st.st_rdev,
                        attr,
                    },
                )
            })
            .map(|(v, _)| v)
    }

    pub fn mkdir(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> io::Result<(u64, libc::stat)> {
        let p = self.inodes.child_path(parent, name)?;
        self.repl
            .mutate_with(|emit| {
                self.backing.mkdir(&p, mode & 0o7777)?;
                self.created(
                    emit,
                    parent,
                    name,
                    &p,
                    who,
                    mode & 0o7777,
                    true,
                    |attr, _| OpKind::Mkdir {
                        path: p.clone(),
                        attr,
                    },
                )
            })
            .map(|(v, _)| v)
    }

    pub fn symlink(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        target: &[u8],
    ) -> io::Result<(u64, libc::stat)> {
        let p = self.inodes.child_path(parent, name)?;
        if target.len() > tdfs_protocol::op::MAX_SYMLINK {
            return Err(err(libc::ENAMETOOLONG));
        }
        self.repl
            .mutate_with(|emit| {
                self.backing.symlink(target, &p)?;
                self.created(emit, parent, name, &p, who, 0o777, false, |attr, _| {
                    OpKind::Symlink {
                        path: p.clone(),
                        target: target.to_vec(),
                        attr,
                    }
                })
            })
            .map(|(v, _)| v)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> io::Result<(u64, libc::stat)> {
        let existing = self.path(ino)?;
        let new = self.inodes.child_path(newparent, newname)?;
        self.repl
            .mutate_with(|emit| {
                self.backing.link(&existing, &new)?;
                // From here on the link exists: its op goes out whatever else fails.
                let mut op = Op::new(OpKind::Link {
                    existing: existing.clone(),
                    new: new.clone(),
                });
                if let Ok(t) = self.parent_touch(&new) {
                    op = op.with_touch(t);
                }
                emit.op(op);
                let st = self.backing.lstat(&new)?;
                let id = self.register_new(newparent, newname, &st);
                Ok((id, st))
            })
            .map(|(v, _)| v)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr, dir: bool) -> io::Result<()> {
        let p = self.inodes.child_path(parent, name)?;
        self.repl
            .mutate_with(|emit| {
                self.backing.unlink(&p, dir)?;
                self.inodes.remove_name(parent, name);
                let kind = if dir {
                    OpKind::Rmdir { path: p.clone() }
                } else {
                    OpKind::Unlink { path: p.clone() }
                };
                let mut op = Op::new(kind);
                if let Ok(t) = self.parent_touch(&p) {
                    op = op.with_touch(t);
                }
                emit.op(op);
                Ok(())
            })
            .map(drop)
    }

    /// Renames `parent/name` to `newparent/newname`. Returns whether a directory changed
    /// parent (its `..` now names another directory).
    pub fn rename(
        &self,
        who: Caller,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> io::Result<bool> {
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) != 0 {
            return Err(err(libc::EINVAL));
        }
        let from = self.inodes.child_path(parent, name)?;
        let to = self.inodes.child_path(newparent, newname)?;
        self.repl
            .mutate_with(|emit| {
                if let Err(e) = self.backing.rename(&from, &to, flags) {
                    // ext4 can fail a rename after touching the directories: a whiteout
                    // rename onto a non-empty directory moves both parents' times (and the
                    // target's) before it finds ENOTEMPTY and puts the entries back. The
                    // replicas get whatever times those inodes hold now.
                    let mut seen = Vec::new();
                    for p in [from.parent(), to.parent(), from.clone(), to.clone()] {
                        if seen.contains(&p) {
                            continue;
                        }
                        if let Ok(st) = self.backing.lstat(&p) {
                            emit.op(Op::new(OpKind::SetTimes { path: p.clone() })
                                .with_touch(Touch::Own(times_of(&st))));
                        }
                        seen.push(p);
                    }
                    return Err(e);
                }
                self.inodes.rename(
                    parent,
                    name,
                    newparent,
                    newname,
                    flags & RENAME_EXCHANGE != 0,
                );
                // From here on the rename has happened: its ops go out whatever else fails,
                // with every resulting time that can be read.
                let whiteout = flags & RENAME_WHITEOUT != 0;
                let mut op = Op::new(OpKind::Rename {
                    from: from.clone(),
                    to: to.clone(),
                    flags: flags & !RENAME_WHITEOUT,
                });
                // A directory moved to another parent has its ".." rewritten; carry its times
                // (and the other side's, for an exchange) so nothing is left to the slave's
                // clock.
                let moved = self.backing.lstat(&to);
                let is_dir = |st: &io::Result<libc::stat>| {
                    st.as_ref()
                        .map_or(true, |m| m.st_mode & libc::S_IFMT == libc::S_IFDIR)
                };
                let exchanged = if flags & RENAME_EXCHANGE != 0 {
                    Some(self.backing.lstat(&from))
                } else {
                    None
                };
                let dir_moved = is_dir(&moved) || exchanged.as_ref().is_some_and(is_dir);
                if is_dir(&moved) || exchanged.is_some() {
                    self.repl.note_dir_rename();
                }
                if let Ok(m) = &moved {
                    op = op.with_touch(Touch::Own(times_of(m)));
                }
                if let Some(Ok(st)) = &exchanged {
                    op = op.with_touch(Touch::Path(from.clone(), times_of(st)));
                }
                if let Ok(t) = self.parent_touch(&to) {
                    op = op.with_touch(t);
                }
                if from.parent() != to.parent() && !whiteout {
                    if let Ok(st) = self.backing.lstat(&from.parent()) {
                        op = op.with_touch(Touch::Path(from.parent(), times_of(&st)));
                    }
                }
                emit.op(op);
                if whiteout {
                    // The kernel left a whiteout (a 0:0 character device) at `from`, owned
                    // by the daemon: it belongs to the caller, as on a local filesystem. The
                    // replicas make the same device node, with its attributes and times and
                    // its directory's.
                    if let Err(e) = self.own(&from, who, 0, false) {
                        warn!(path = %from, "whiteout left owned by the daemon: {e}");
                    }
                    if let Ok(st) = self.backing.lstat(&from) {
                        let mut wop = Op::new(OpKind::Mknod {
                            path: from.clone(),
                            kind: NodeKind::Char,
                            rdev: st.st_rdev,
                            attr: attr_of(&st),
                        })
                        .with_touch(Touch::Own(times_of(&st)));
                        if let Ok(t) = self.parent_touch(&from) {
                            wop = wop.with_touch(t);
                        }
                        emit.op(wop);
                    }
                }
                Ok(dir_moved && parent != newparent)
            })
            .map(|(moved, _)| moved)
    }

    pub fn setattr(&self, ino: u64, req: &SetAttrReq) -> io::Result<libc::stat> {
        let path = self.inodes.path(ino)?;
        let open = req.fh.and_then(|fh| self.file(fh).ok());
        if path.is_none() && open.is_none() {
            return Err(err(libc::ENOENT));
        }
        let stat_now = || match (&path, &open) {
            (Some(p), _) => self.backing.lstat(p),
            (None, Some(f)) => fstat(f.fd()),
            (None, None) => unreachable!("checked above"),
        };
        self.repl
            .mutate_with(|emit| {
                // Order: size, owner (which clears setuid bits), mode, then times, so that the
                // times the caller asked for are the ones left standing.
                let steps = || -> io::Result<()> {
                    if req.is_empty() {
                        // Nothing but the ctime (a chown to -1:-1, say): do exactly that, so
                        // the backing filesystem answers as it would have natively (ext4
                        // refuses any change to an immutable inode, even this one).
                        return match (&path, &open) {
                            (Some(p), _) => self.backing.chown(p, u32::MAX, u32::MAX),
                            (None, Some(f)) => {
                                // SAFETY: fchown on an fd we own.
                                cvt(unsafe { libc::fchown(f.fd(), u32::MAX, u32::MAX) }).map(drop)
                            }
                            (None, None) => unreachable!("checked above"),
                        };
                    }
                    if let Some(size) = req.size {
                        match (&open, &path) {
                            (Some(f), _) => {
                                // SAFETY: ftruncate on an fd we own.
                                cvt(unsafe { libc::ftruncate(f.fd(), size as libc::off_t) })?;
                            }
                            (None, Some(p)) => {
                                let fd = self.backing.open(p, libc::O_WRONLY, 0)?;
                                // SAFETY: ftruncate on an fd we just opened.
                                cvt(unsafe {
                                    libc::ftruncate(fd.as_raw_fd(), size as libc::off_t)
                                })?;
                            }
                            (None, None) => unreachable!("checked above"),
                        }
                    }
                    if req.uid.is_some() || req.gid.is_some() {
                        let uid = req.uid.unwrap_or(u32::MAX);
                        let gid = req.gid.unwrap_or(u32::MAX);
                        match (&path, &open) {
                            (Some(p), _) => self.backing.chown(p, uid, gid)?,
                            (None, Some(f)) => {
                                // SAFETY: fchown on an fd we own.
                                cvt(unsafe { libc::fchown(f.fd(), uid, gid) })?;
                            }
                            _ => unreachable!(),
                        }
                    }
                    if let Some(mode) = req.mode {
                        match (&path, &open) {
                            (Some(p), _) => self.backing.chmod(p, mode & 0o7777)?,
                            (None, Some(f)) => {
                                // SAFETY: fchmod on an fd we own.
                                cvt(unsafe { libc::fchmod(f.fd(), mode & 0o7777) })?;
                            }
                            _ => unreachable!(),
                        }
                    }
                    if req.atime.is_some() || req.mtime.is_some() {
                        let ts = [to_timespec(req.atime), to_timespec(req.mtime)];
                        match (&path, &open) {
                            (Some(p), _) => self.backing.utimens(p, &ts)?,
                            (None, Some(f)) => {
                                // SAFETY: futimens with a two-element array on an fd we own.
                                cvt(unsafe { libc::futimens(f.fd(), ts.as_ptr()) })?;
                            }
                            _ => unreachable!(),
                        }
                    }
                    Ok(())
                };
                if let Err(e) = steps() {
                    // An earlier step may have taken effect (a truncate before a failed
                    // chown, a chown before a failed chmod).
                    self.restate(emit, ino, stat_now(), req.size.is_some());
                    return Err(e);
                }
                let st = stat_now()?;
                let rpath = match &path {
                    Some(p) => Some(p.clone()),
                    None => self.replica_path(ino, &st)?,
                };
                if let Some(p) = rpath {
                    emit.op(setattr_op(p, req.size, &st));
                }
                Ok(st)
            })
            .map(|(st, _)| st)
    }

    /// Writes `data` at `offset` through handle `fh`. `sync`: the write is also a
    /// durability barrier (an O_SYNC, `Some(false)`, or O_DSYNC, `Some(true)`, write the
    /// kernel sends no FSYNC after): the backing fd already carries the flag, and the
    /// write returns once every in-sync slave has made it durable too.
    pub fn write(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        sync: Option<bool>,
    ) -> io::Result<u32> {
        if data.len() > MAX_WRITE {
            return Err(err(libc::EINVAL));
        }
        let f = self.file(fh)?;
        let (n, seq) = self.repl.mutate_with(|emit| {
            let watched = self.n_watched.load(Ordering::Acquire) > 0;
            if watched {
                self.watch_before(ino, f.fd());
            }
            let mut done = 0;
            while done < data.len() {
                // SAFETY: the slice after `done` is readable for its length.
                let n = cvt_sz(unsafe {
                    libc::pwrite(
                        f.fd(),
                        data[done..].as_ptr().cast(),
                        data.len() - done,
                        (offset + done as u64) as libc::off_t,
                    )
                });
                match n {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if done > 0 => {
                        debug!("short write after {done} bytes: {e}");
                        break;
                    }
                    Err(e) => {
                        let st = fstat(f.fd());
                        if watched {
                            if let Ok(st) = &st {
                                self.watch_after(ino, st);
                            }
                        }
                        self.restate(emit, ino, st, false);
                        return Err(e);
                    }
                }
                if f.append {
                    // pwrite on an O_APPEND fd appends whatever the offset: one call only.
                    break;
                }
            }
            // With no slave, the op's copy of the data would be dropped at once: only its
            // sequence number is used up.
            let replicating = self.repl.replicating();
            if !replicating && !watched {
                emit.encoded(Replicator::seq_only());
                return Ok(done as u32);
            }
            let st = fstat(f.fd())?;
            if watched {
                self.watch_after(ino, &st);
            }
            if !replicating {
                emit.encoded(Replicator::seq_only());
                return Ok(done as u32);
            }
            // An O_APPEND write landed at the end: send where it actually went.
            let at = if f.append {
                (st.st_size as u64).saturating_sub(done as u64)
            } else {
                offset
            };
            if let Some(path) = self.replica_path(ino, &st)? {
                emit.encoded(tdfs_protocol::op::encode_write(
                    &path,
                    at,
                    &data[..done],
                    &[Touch::Own(times_of(&st))],
                ));
                if let Some(datasync) = sync {
                    emit.op(Op::new(OpKind::Fsync {
                        path: Some(path),
                        datasync,
                    }));
                }
            }
            Ok(done as u32)
        })?;
        if let (Some(_), Some(seq)) = (sync, seq) {
            self.repl.fsync_barrier(seq)?;
        }
        Ok(n)
    }

    pub fn fallocate(&self, ino: u64, fh: u64, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        let f = self.file(fh)?;
        self.repl
            .mutate_with(|emit| {
                // SAFETY: fallocate on an fd we own.
                let r = cvt(unsafe {
                    libc::fallocate(f.fd(), mode, offset as libc::off_t, len as libc::off_t)
                });
                if let Err(e) = r {
                    // A failed allocation may have extended the file part of the way.
                    self.restate(emit, ino, fstat(f.fd()), true);
                    return Err(e);
                }
                let st = fstat(f.fd())?;
                if let Some(path) = self.replica_path(ino, &st)? {
                    emit.op(Op::new(OpKind::Fallocate {
                        path,
                        mode,
                        offset,
                        len,
                    })
                    .with_touch(Touch::Own(times_of(&st))));
                }
                Ok(())
            })
            .map(drop)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        ino_in: u64,
        fh_in: u64,
        off_in: u64,
        ino_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> io::Result<u32> {
        let fin = self.file(fh_in)?;
        let fout = self.file(fh_out)?;
        let len = len.min(u32::MAX as u64 & !0xfff);
        self.repl
            .mutate_with(|emit| {
                let src_st = fstat(fin.fd())?;
                let src_path = self.replica_path(ino_in, &src_st)?;
                // If the source has no name on the replicas, the bytes themselves must travel.
                let len = if src_path.is_none() {
                    len.min(MAX_WRITE as u64)
                } else {
                    len
                };
                let mut oin = off_in as libc::off_t;
                let mut oout = off_out as libc::off_t;
                // SAFETY: both fds are ours; offsets are passed by pointer and updated.
                let n = cvt_sz(unsafe {
                    libc::copy_file_range(fin.fd(), &mut oin, fout.fd(), &mut oout, len as usize, 0)
                });
                let n = match n {
                    Ok(n) => n,
                    Err(e) => {
                        self.restate(emit, ino_out, fstat(fout.fd()), false);
                        return Err(e);
                    }
                };
                let st = fstat(fout.fd())?;
                let Some(dst) = self.replica_path(ino_out, &st)? else {
                    return Ok(n as u32);
                };
                let kind = match src_path {
                    Some(src) => OpKind::CopyRange {
                        src,
                        src_offset: off_in,
                        path: dst,
                        offset: off_out,
                        len: n as u64,
                    },
                    None => {
                        let data = self.read_fd(fout.fd(), off_out, n)?;
                        OpKind::Write {
                            path: dst,
                            offset: off_out,
                            data: data.into(),
                        }
                    }
                };
                emit.op(Op::new(kind).with_touch(Touch::Own(times_of(&st))));
                Ok(n as u32)
            })
            .map(|(n, _)| n)
    }

    fn read_fd(&self, fd: RawFd, off: u64, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        let mut done = 0;
        while done < n {
            // SAFETY: writable slice of the remaining length.
            let r = cvt_sz(unsafe {
                libc::pread(
                    fd,
                    buf[done..].as_mut_ptr().cast(),
                    n - done,
                    (off + done as u64) as libc::off_t,
                )
            })?;
            if r == 0 {
                break;
            }
            done += r;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// fsync/fdatasync: durable locally, then a barrier op in the stream (slaves make
    /// everything up to it durable).
    pub fn fsync(&self, ino: u64, fh: Option<u64>, datasync: bool) -> io::Result<()> {
        match fh.and_then(|fh| self.file(fh).ok()) {
            Some(f) => {
                // SAFETY: fsync on an fd we own.
                cvt(unsafe {
                    if datasync {
                        libc::fdatasync(f.fd())
                    } else {
                        libc::fsync(f.fd())
                    }
                })?;
            }
            None => {
                let p = self.path(ino)?;
                let fd = self
                    .backing
                    .open(&p, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
                // SAFETY: fsync on an fd we just opened.
                cvt(unsafe { libc::fsync(fd.as_raw_fd()) })?;
            }
        }
        let path = self.inodes.path(ino)?;
        let ((), seq) = self.repl.mutate_seq(|| {
            Ok((
                (),
                Some(Op::new(OpKind::Fsync {
                    path: path.clone(),
                    datasync,
                })),
            ))
        })?;
        match seq {
            Some(seq) => self.repl.fsync_barrier(seq),
            None => Ok(()),
        }
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let p = self.path(ino)?;
        if value.len() > tdfs_protocol::op::MAX_XATTR_VALUE {
            return Err(err(libc::E2BIG));
        }
        if name.len() > tdfs_protocol::op::MAX_XATTR_NAME {
            return Err(err(libc::ERANGE));
        }
        self.repl.mutate(|| {
            let r = self.backing.setxattr(&p, name.as_bytes(), value, flags);
            // Also on failure: a failed call may still have changed them.
            self.inodes.xattrs_changed(ino);
            r?;
            let op = Op::new(OpKind::SetXattr {
                path: p.clone(),
                name: name.as_bytes().to_vec(),
                value: value.to_vec(),
                flags,
            });
            Ok(((), Some(op)))
        })
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> io::Result<()> {
        let p = self.path(ino)?;
        self.repl.mutate(|| {
            let r = self.backing.removexattr(&p, name.as_bytes());
            self.inodes.xattrs_changed(ino);
            r?;
            let op = Op::new(OpKind::RemoveXattr {
                path: p.clone(),
                name: name.as_bytes().to_vec(),
            });
            Ok(((), Some(op)))
        })
    }

    // ---- inode flags (chattr) ---------------------------------------------------------

    /// An fd for the flag ioctls on `ino`: its name in the backing tree, or (for a file with
    /// no name left) the handle's own fd.
    fn flags_fd(&self, ino: u64, fh: u64) -> io::Result<OwnedFd> {
        match self.inodes.path(ino)? {
            Some(p) => self
                .backing
                .open(&p, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0),
            None => {
                let f = self.file(fh)?;
                // SAFETY: the handle's fd is open while `f` is held.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(f.fd()) };
                fd.try_clone_to_owned()
            }
        }
    }

    /// FS_IOC_GETFLAGS: every flag the backing inode has.
    pub fn get_flags(&self, ino: u64, fh: u64) -> io::Result<u32> {
        let fd = self.flags_fd(ino, fh)?;
        let r = tdfs_replication::flags::get_raw(fd.as_fd())?;
        Ok(r)
    }

    /// FS_IOC_FSGETXATTR.
    pub fn get_fsxattr(&self, ino: u64, fh: u64) -> io::Result<FsXattr> {
        let fd = self.flags_fd(ino, fh)?;
        tdfs_replication::flags::get_fsxattr(fd.as_fd())?.ok_or_else(|| err(libc::ENOTTY))
    }

    /// FS_IOC_SETFLAGS (`flags`) or FS_IOC_FSSETXATTR (`fsx`). The kernel has checked
    /// ownership and CAP_LINUX_IMMUTABLE for the caller. The replicas get the flags and
    /// project id the inode holds afterwards.
    pub fn set_flags(
        &self,
        ino: u64,
        fh: u64,
        flags: Option<u32>,
        fsx: Option<FsXattr>,
    ) -> io::Result<()> {
        let fd = self.flags_fd(ino, fh)?;
        self.repl
            .mutate_with(|emit| {
                let r = match (flags, &fsx) {
                    (Some(f), _) => tdfs_replication::flags::set_raw(fd.as_fd(), f),
                    (None, Some(x)) => tdfs_replication::flags::set_fsxattr(fd.as_fd(), x),
                    (None, None) => Ok(()),
                };
                r?;
                let (flags, projid) = tdfs_replication::flags::get(fd.as_fd())?;
                let st = tdfs_replication::fsio::fstat(fd.as_fd())?;
                if let Some(path) = self.replica_path(ino, &st)? {
                    emit.op(Op::new(OpKind::SetFlags {
                        path,
                        flags,
                        projid,
                    }));
                }
                Ok(())
            })
            .map(drop)
    }

    // ---- directories -------------------------------------------------------------------

    /// The backing directory of node `ino`, opened for listing. Its path is read from the
    /// inode table, and a rename may move another directory onto that name between the
    /// read and the open: the fd is checked to be `ino` itself, or the path is read again,
    /// since a listing of the wrong directory would stay in the kernel's directory cache.
    fn open_dir(&self, ino: u64) -> io::Result<OwnedFd> {
        for _ in 0..16 {
            let p = self.path(ino)?;
            let fd = self
                .backing
                .open(&p, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            let st = fstat(fd.as_raw_fd())?;
            if self.inodes.peek_id(st.st_dev, st.st_ino) == ino {
                return Ok(fd);
            }
        }
        Err(err(libc::ESTALE))
    }

    /// Looks `name` up in the directory `dir` (node `parent`), counting a lookup, as
    /// [`Ops::lookup`] does but relative to the directory's fd: one short `fstatat` instead
    /// of a walk of the whole path.
    fn lookup_in(&self, dir: &OwnedFd, parent: u64, name: &CStr) -> io::Result<(u64, libc::stat)> {
        loop {
            let generation = self.inodes.generation();
            let st = tdfs_replication::fsio::lstat_at(dir.as_fd(), name)?;
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            let name = OsStr::from_bytes(name.to_bytes());
            if let Some(id) = self
                .inodes
                .lookup_checked(generation, parent, name, st.st_dev, st.st_ino, is_dir)
            {
                return Ok((id, st));
            }
        }
    }

    /// Lists directory `ino` from `offset` (0, or the cookie of an entry listed before),
    /// calling `add` for each entry until it returns true (the reply is full; that entry
    /// was not taken). With `plus` (readdirplus), each entry but `.` and `..` comes with its
    /// attributes and counts as a lookup, taken back if `add` refuses it.
    ///
    /// Stateless: the directory is opened for each call, so the kernel needs no opendir
    /// round trip (it caches the listing itself, see `fs.rs`). The cookies are the backing
    /// filesystem's `d_off`, valid across opens.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(&DirEntry) -> bool,
    ) -> io::Result<()> {
        let fd = self.open_dir(ino)?;
        if offset != 0 {
            rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(offset))?;
        }
        let mut buf = [std::mem::MaybeUninit::uninit(); DIRENT_BUF];
        let mut entries = rustix::fs::RawDir::new(&fd, &mut buf);
        while let Some(e) = entries.next() {
            let e = e?;
            let name = e.file_name();
            let dot = matches!(name.to_bytes(), b"." | b"..");
            let looked = if plus && !dot {
                match self.lookup_in(&fd, ino, name) {
                    Ok(st) => Some(st),
                    // Removed since the listing was read.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            let entry = DirEntry {
                ino: match &looked {
                    Some((id, _)) => *id,
                    None => self.inodes.peek_id(self.backing.dev, e.ino()),
                },
                offset: e.next_entry_cookie(),
                kind: e.file_type(),
                name: name.to_bytes(),
                plus: looked.map(|(_, st)| st),
            };
            if add(&entry) {
                if entry.plus.is_some() {
                    self.inodes.forget(entry.ino, 1);
                }
                break;
            }
        }
        Ok(())
    }
}
