//! Incremental sync: bring a slave to identical with the master while writers keep working.
//!
//! The master walks its tree depth-first. For each directory it takes its own listing under
//! the order lock (so the listing is exactly the state after the ops sent so far), asks the
//! slave for the same directory's listing (answered in stream order, i.e. after the same
//! ops), and compares them on everything a mirror must keep. Each difference is fixed by ops
//! that describe the master's *current* state of that path, read under the order lock and
//! sent at that point of the stream: whatever the slave had there, the path is right from
//! then on, and later live ops apply on top of it.
//!
//! File content is copied in 1 MiB pieces, each read under the lock from an open fd (so a
//! rename during the copy is followed: the piece goes to the file's current name) and holes
//! are skipped. A file's timestamps are set only after its last piece, so an interrupted copy
//! never looks complete to the next sync.
//!
//! While the sync runs, the slave skips live ops that fail because its tree differs (the sync
//! rewrites what they touch) and reports their paths; the master re-walks the directories
//! holding them until a pass reports none, then ends the sync.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::inspect;
use crate::tree::Tree;
use tdfs_protocol::frame::FrameType;
use tdfs_protocol::sync::{encode_path, Entry};
use tdfs_protocol::{Attr, NodeKind, Op, OpKind, Times, Touch, WirePath};
use tracing::{debug, info};

use super::link::{Event, Link, LinkError};
use super::LinkState;

const CHUNK: usize = 1 << 20;
/// Re-walk passes for paths skipped during the sync before giving up on this attempt.
const MAX_ROUNDS: usize = 50;

enum Item {
    Visit(WirePath),
    /// A directory whose entries are done: its times, then its inode flags when the slave's
    /// differed (or may differ: `true`).
    Finish(WirePath, bool),
}

#[derive(Default)]
struct Stats {
    dirs: u64,
    entries: u64,
    fixed: u64,
    bytes: u64,
}

/// A hard-linked inode already placed on the slave: its first path, and the slave's inode
/// number for it when the slave already had it right.
type Links = HashMap<u64, (WirePath, Option<u64>)>;

fn enc(op: &Op) -> Arc<[u8]> {
    let mut b = Vec::new();
    op.encode(&mut b);
    b.into()
}

fn attr(e: &Entry) -> Attr {
    Attr {
        mode: e.mode & 0o7777,
        uid: e.uid,
        gid: e.gid,
    }
}

fn times(e: &Entry) -> Times {
    Times {
        atime: e.mtime,
        mtime: e.mtime,
    }
}

/// Sets `path`'s mode, owner and mtime to the master's (an entry whose content is right).
fn restate(path: &WirePath, m: &Entry) -> Op {
    Op::new(OpKind::SetAttr {
        path: path.clone(),
        size: None,
        attr: attr(m),
    })
    .with_touch(Touch::Own(times(m)))
}

fn kind_of(mode: u32) -> Option<NodeKind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFIFO => NodeKind::Fifo,
        libc::S_IFSOCK => NodeKind::Socket,
        libc::S_IFCHR => NodeKind::Char,
        libc::S_IFBLK => NodeKind::Block,
        _ => return None,
    })
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// What to do about one path.
struct Plan {
    ops: Vec<Op>,
    /// Copy content from this fd (then set size, mode and times).
    copy: Option<OwnedFd>,
    /// Sent after the content: inode flags (an immutable or append-only file must get its
    /// data and times first).
    post: Vec<Op>,
}

fn set_flags(path: &WirePath, m: &Entry) -> Op {
    Op::new(OpKind::SetFlags {
        path: path.clone(),
        flags: m.flags,
        projid: m.projid,
    })
}

/// Decides the fixes for `path` from the master's current state (called under the lock).
fn plan(
    tree: &dyn Tree,
    path: &WirePath,
    s: Option<&Entry>,
    links: &mut Links,
    force_content: bool,
) -> io::Result<Plan> {
    let mut p = Plan {
        ops: Vec::new(),
        copy: None,
        post: Vec::new(),
    };
    let t = tree.target(path)?;
    let m = match inspect::entry_at(t.dir.as_fd(), t.name.as_bytes()) {
        Ok(m) => m,
        Err(e) if matches!(errno(&e), libc::ENOENT | libc::ENOTDIR) => {
            if s.is_some() {
                p.ops
                    .push(Op::new(OpKind::RemoveTree { path: path.clone() }));
            }
            return Ok(p);
        }
        Err(e) => return Err(e),
    };
    let kind = m.kind();
    let type_differs = s.is_none_or(|s| s.kind() != kind);
    let is_dir = |k: u32| k == libc::S_IFDIR;
    if let Some(s) = s {
        if type_differs && (is_dir(s.kind()) || is_dir(kind)) {
            p.ops
                .push(Op::new(OpKind::RemoveTree { path: path.clone() }));
        }
    }
    let mut recreated = type_differs;
    let attr_differs = s.is_none_or(|s| attr(s) != attr(&m));
    let mtime_differs = s.is_none_or(|s| s.mtime != m.mtime);
    match kind {
        libc::S_IFDIR => {
            if type_differs {
                p.ops.push(Op::new(OpKind::Mkdir {
                    path: path.clone(),
                    attr: attr(&m),
                }));
            } else if attr_differs {
                p.ops.push(Op::new(OpKind::SetAttr {
                    path: path.clone(),
                    size: None,
                    attr: attr(&m),
                }));
            }
            // Directory times are set when the directory is finished.
        }
        libc::S_IFREG => {
            if m.nlink > 1 {
                if let Some((first, s_ino)) = links.get(&m.ino) {
                    if s_ino.is_none() || s.map(|s| s.ino) != *s_ino || type_differs {
                        if s.is_some()
                            && !p
                                .ops
                                .iter()
                                .any(|o| matches!(o.kind, OpKind::RemoveTree { .. }))
                        {
                            p.ops
                                .push(Op::new(OpKind::RemoveTree { path: path.clone() }));
                        }
                        p.ops.push(Op::new(OpKind::Link {
                            existing: first.clone(),
                            new: path.clone(),
                        }));
                    }
                    return Ok(p);
                }
            }
            let content = type_differs
                || force_content
                || s.is_none_or(|s| s.size != m.size)
                || mtime_differs;
            if content {
                recreated = true;
                p.ops.push(Op::new(OpKind::Create {
                    path: path.clone(),
                    attr: attr(&m),
                }));
                p.copy = Some(OwnedFd::from(inspect::open_content(
                    t.dir.as_fd(),
                    &t.name,
                )?));
            } else if attr_differs {
                p.ops.push(restate(path, &m));
            }
            if m.nlink > 1 {
                let s_ino = if content { None } else { s.map(|s| s.ino) };
                links.insert(m.ino, (path.clone(), s_ino));
            }
            let flags_differ = if content {
                m.flags != 0 || m.projid != 0
            } else {
                s.is_none_or(|s| s.flags != m.flags || s.projid != m.projid)
            };
            if flags_differ {
                p.post.push(set_flags(path, &m));
            }
        }
        libc::S_IFLNK => {
            if type_differs || s.is_some_and(|s| s.target != m.target) {
                recreated = true;
                p.ops.push(
                    Op::new(OpKind::Symlink {
                        path: path.clone(),
                        target: m.target.clone(),
                        attr: attr(&m),
                    })
                    .with_touch(Touch::Own(times(&m))),
                );
            } else if attr_differs || mtime_differs {
                p.ops.push(restate(path, &m));
            }
        }
        k => {
            let Some(nk) = kind_of(k) else {
                return Ok(p);
            };
            if type_differs || s.is_some_and(|s| s.rdev != m.rdev) {
                recreated = true;
                p.ops.push(
                    Op::new(OpKind::Mknod {
                        path: path.clone(),
                        kind: nk,
                        rdev: m.rdev,
                        attr: attr(&m),
                    })
                    .with_touch(Touch::Own(times(&m))),
                );
            } else if attr_differs || mtime_differs {
                p.ops.push(restate(path, &m));
            }
        }
    }
    // Extended attributes: remove what the master lacks, set what differs.
    let theirs: &[(Vec<u8>, Vec<u8>)] = match s {
        Some(s) if !recreated => &s.xattrs,
        _ => &[],
    };
    if theirs != m.xattrs.as_slice() {
        for (n, _) in theirs {
            if !m.xattrs.iter().any(|(mn, _)| mn == n) {
                p.ops.push(Op::new(OpKind::RemoveXattr {
                    path: path.clone(),
                    name: n.clone(),
                }));
            }
        }
        for (n, v) in &m.xattrs {
            if !theirs.iter().any(|(tn, tv)| tn == n && tv == v) {
                p.ops.push(Op::new(OpKind::SetXattr {
                    path: path.clone(),
                    name: n.clone(),
                    value: v.clone(),
                    flags: 0,
                }));
            }
        }
        // Setting an xattr does not change mtime, but re-state it for symlinks and devices
        // whose only fix was xattrs (harmless elsewhere).
    }
    Ok(p)
}

enum Piece {
    Data(WirePath, u64, Vec<u8>),
    Done(WirePath, libc::stat),
    Gone,
}

fn read_piece(tree: &dyn Tree, fd: BorrowedFd<'_>, off: u64) -> io::Result<Piece> {
    let Some(path) = tree.path_of(fd)? else {
        return Ok(Piece::Gone);
    };
    // SAFETY: lseek on an fd we own.
    let data_at = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    let stat = || crate::fsio::fstat(fd.as_fd());
    if data_at < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(Piece::Done(path, stat()?));
        }
        return Err(e);
    }
    let mut buf = vec![0u8; CHUNK];
    // SAFETY: buffer writable for its length.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            CHUNK,
            data_at as libc::off_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(Piece::Done(path, stat()?));
    }
    buf.truncate(n as usize);
    Ok(Piece::Data(path, data_at as u64, buf))
}

impl Link {
    /// Runs `f` on the tree under the order lock; returns the head at that moment.
    fn locked<T>(&self, f: impl FnOnce(&dyn Tree) -> T) -> (u64, T) {
        tokio::task::block_in_place(|| {
            let log = self.shared.lock();
            let head = log.next_seq;
            (head, f(self.shared.tree.as_ref()))
        })
    }

    async fn request(&mut self, kind: FrameType, p: &WirePath) -> Result<u64, LinkError> {
        let id = self.next_request;
        self.next_request += 1;
        self.send_frame(kind, id, &encode_path(p)).await?;
        Ok(id)
    }

    /// The slave's listing of `dir` (errno on failure), collecting misses meanwhile.
    async fn slave_listing(
        &mut self,
        dir: &WirePath,
        misses: &mut Vec<WirePath>,
    ) -> Result<Result<Vec<Entry>, i32>, LinkError> {
        let id = self.request(FrameType::ListDir, dir).await?;
        let mut out = Vec::new();
        loop {
            match self.event().await? {
                Event::Listing(rid, l) if rid == id => {
                    if l.errno != 0 {
                        return Ok(Err(l.errno));
                    }
                    out.extend(l.entries);
                    if !l.more {
                        return Ok(Ok(out));
                    }
                }
                Event::Misses(p) => misses.extend(p),
                _ => {}
            }
        }
    }

    async fn slave_digest(
        &mut self,
        p: &WirePath,
        misses: &mut Vec<WirePath>,
    ) -> Result<tdfs_protocol::sync::Digest, LinkError> {
        let id = self.request(FrameType::Checksum, p).await?;
        loop {
            match self.event().await? {
                Event::Digest(rid, d) if rid == id => return Ok(d),
                Event::Misses(p) => misses.extend(p),
                _ => {}
            }
        }
    }

    async fn send_plan_ops(&mut self, head: u64, ops: &[Op]) -> Result<(), LinkError> {
        self.send_live(head).await?;
        if !ops.is_empty() {
            self.send_sync(ops.iter().map(enc).collect()).await?;
        }
        Ok(())
    }

    async fn fix(
        &mut self,
        path: &WirePath,
        s: Option<&Entry>,
        links: &mut Links,
        force_content: bool,
        st: &mut Stats,
    ) -> Result<(), LinkError> {
        let (head, plan) = self.locked(|tree| plan(tree, path, s, links, force_content));
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                debug!(%path, "sync: cannot read master entry: {e}");
                return Ok(());
            }
        };
        if !plan.ops.is_empty() || plan.copy.is_some() {
            st.fixed += 1;
        }
        self.send_plan_ops(head, &plan.ops).await?;
        if let Some(fd) = plan.copy {
            self.copy(fd, st).await?;
        }
        if !plan.post.is_empty() {
            let head = self.shared.head();
            self.send_plan_ops(head, &plan.post).await?;
        }
        Ok(())
    }

    /// Streams a file's content from an open fd, then its final size, mode and times.
    async fn copy(&mut self, fd: OwnedFd, st: &mut Stats) -> Result<(), LinkError> {
        let mut off = 0u64;
        loop {
            let (head, piece) = self.locked(|tree| read_piece(tree, fd.as_fd(), off));
            self.send_live(head).await?;
            match piece? {
                Piece::Gone => return Ok(()),
                Piece::Data(path, at, data) => {
                    off = at + data.len() as u64;
                    st.bytes += data.len() as u64;
                    let op = Op::new(OpKind::Write {
                        path,
                        offset: at,
                        data: data.into(),
                    });
                    self.send_sync(vec![enc(&op)]).await?;
                }
                Piece::Done(path, s) => {
                    let op = Op::new(OpKind::SetAttr {
                        path,
                        size: Some(s.st_size as u64),
                        attr: Attr {
                            mode: s.st_mode & 0o7777,
                            uid: s.st_uid,
                            gid: s.st_gid,
                        },
                    })
                    .with_touch(Touch::Own(inspect::times_of(&s)));
                    self.send_sync(vec![enc(&op)]).await?;
                    return Ok(());
                }
            }
        }
    }

    async fn finish_dir(&mut self, dir: &WirePath, flags: bool) -> Result<(), LinkError> {
        let (head, e) = self.locked(|tree| tree.entry(dir));
        let Ok(e) = e else {
            return Ok(());
        };
        if e.kind() != libc::S_IFDIR {
            return Ok(());
        }
        let mut ops = Vec::new();
        if dir.is_root() {
            for (n, v) in &e.xattrs {
                ops.push(Op::new(OpKind::SetXattr {
                    path: dir.clone(),
                    name: n.clone(),
                    value: v.clone(),
                    flags: 0,
                }));
            }
        }
        ops.push(restate(dir, &e));
        if flags {
            ops.push(set_flags(dir, &e));
        }
        self.send_plan_ops(head, &ops).await
    }

    async fn visit(
        &mut self,
        dir: &WirePath,
        stack: &mut Vec<Item>,
        links: &mut Links,
        misses: &mut Vec<WirePath>,
        checksums: bool,
        st: &mut Stats,
    ) -> Result<(), LinkError> {
        st.dirs += 1;
        let (head, mine) = self.locked(|tree| tree.list_dir(dir));
        let mine = match mine {
            Ok(m) => m,
            // Gone or replaced on the master since it was queued: live ops took care of it.
            Err(_) => return Ok(()),
        };
        self.send_live(head).await?;
        let theirs = match self.slave_listing(dir, misses).await? {
            Ok(t) => t,
            Err(_) => {
                // The slave lacks the directory: re-check it from its parent.
                misses.push(dir.clone());
                return Ok(());
            }
        };
        let mut ti = theirs.iter().peekable();
        for m in &mine {
            // Entries only the slave has, before this name.
            while let Some(s) = ti.next_if(|s| s.name < m.name) {
                let p = dir
                    .join(&s.name)
                    .map_err(|e| LinkError::Protocol(e.to_string()))?;
                st.entries += 1;
                self.fix(&p, Some(s), links, false, st).await?;
            }
            let s = ti.next_if(|s| s.name == m.name);
            let p = dir
                .join(&m.name)
                .map_err(|e| LinkError::Protocol(e.to_string()))?;
            st.entries += 1;
            let mut force = false;
            let flags_same = s.is_some_and(|s| s.flags == m.flags && s.projid == m.projid);
            let same = flags_same
                && s.is_some_and(|s| {
                    s.kind() == m.kind()
                        && attr(s) == attr(m)
                        && s.size == m.size
                        && s.target == m.target
                        && s.rdev == m.rdev
                        && s.xattrs == m.xattrs
                        && (m.kind() == libc::S_IFDIR || s.mtime == m.mtime)
                });
            let linked = m.nlink > 1 && m.kind() == libc::S_IFREG;
            if same && checksums && m.kind() == libc::S_IFREG {
                let theirs = self.slave_digest(&p, misses).await?;
                let tree = self.shared.tree.clone();
                let mine = tokio::task::block_in_place(|| tree.digest(&p));
                force = theirs.errno != 0 || mine.sha256 != theirs.sha256;
                if force {
                    info!(slave = %self.me.config.addr, path = %p, "content differs though metadata agree");
                }
            }
            if !same || force || linked {
                self.fix(&p, s, links, force, st).await?;
            }
            if m.kind() == libc::S_IFDIR {
                stack.push(Item::Finish(p.clone(), !flags_same));
                stack.push(Item::Visit(p));
            }
        }
        for s in ti {
            let p = dir
                .join(&s.name)
                .map_err(|e| LinkError::Protocol(e.to_string()))?;
            st.entries += 1;
            self.fix(&p, Some(s), links, false, st).await?;
        }
        Ok(())
    }

    /// Brings the slave to identical with the master, then leaves it streaming.
    /// `stash`: the slave holds ops of its own (it diverged); it is told so at the start,
    /// and preserves whatever the sync would overwrite or remove.
    pub(super) async fn sync(
        &mut self,
        why: &str,
        checksums: bool,
        stash: bool,
    ) -> Result<(), LinkError> {
        let started = Instant::now();
        let addr = self.me.config.addr.clone();
        self.me.set_state(LinkState::Syncing);
        self.shared.drop_out(&self.me, "syncing");
        self.me.durable.store(0, Ordering::Release);
        let h0 = self.shared.head();
        self.cursor = h0;
        self.me
            .applied
            .store(h0.saturating_sub(1), Ordering::Release);
        self.shared.set_need(&self.me, h0);
        info!(slave = %addr, from = h0, "sync starting: {why}");
        let flags = if stash {
            tdfs_protocol::sync::SYNC_STASH
        } else {
            0
        };
        self.send_frame(FrameType::SyncBegin, 0, &[flags]).await?;
        let mut st = Stats::default();
        let mut links = Links::new();
        let mut misses = Vec::new();
        let mut stack = vec![
            Item::Finish(WirePath::root(), true),
            Item::Visit(WirePath::root()),
        ];
        let mut rounds = 0;
        loop {
            let renames = self.shared.dir_renames.load(Ordering::Acquire);
            while let Some(item) = stack.pop() {
                self.check_current()?;
                match item {
                    Item::Visit(d) => {
                        self.visit(&d, &mut stack, &mut links, &mut misses, checksums, &mut st)
                            .await?
                    }
                    Item::Finish(d, flags) => self.finish_dir(&d, flags).await?,
                }
            }
            // A round trip after everything sent: every miss it caused has arrived.
            self.send_live(self.shared.head()).await?;
            let _ = self.slave_digest(&WirePath::root(), &mut misses).await?;
            let moved = self.shared.dir_renames.load(Ordering::Acquire) != renames;
            if misses.is_empty() && !moved {
                break;
            }
            rounds += 1;
            if rounds > MAX_ROUNDS {
                return Err(LinkError::Protocol(
                    "sync did not converge (the tree changes too fast); retrying".into(),
                ));
            }
            debug!(slave = %addr, misses = misses.len(), "re-checking paths skipped during the sync");
            let mut dirs: BTreeSet<WirePath> = misses.drain(..).map(|p| p.parent()).collect();
            if moved {
                dirs.insert(WirePath::root());
            }
            // Re-walking a directory re-walks its subtree: drop ones under another.
            let dirs: Vec<&WirePath> = dirs
                .iter()
                .filter(|d| !dirs.iter().any(|o| o != *d && d.starts_with(o)))
                .collect();
            for d in dirs {
                stack.push(Item::Finish(d.clone(), true));
                stack.push(Item::Visit(d.clone()));
            }
            links.clear();
        }
        self.send_live(self.shared.head()).await?;
        // A relay's tree must not have been rewritten under this sync.
        self.check_current()?;
        self.send_frame(FrameType::SyncEnd, self.cursor, &[])
            .await?;
        self.me.needs_sync.store(false, Ordering::Release);
        self.shared.set_need(&self.me, self.cursor);
        self.me.set_state(LinkState::Streaming);
        self.shared.check_in_sync(&self.me);
        let secs = started.elapsed().as_secs_f64();
        info!(
            slave = %addr,
            dirs = st.dirs,
            entries = st.entries,
            fixed = st.fixed,
            bytes = st.bytes,
            rounds,
            "sync complete in {secs:.2}s; streaming from seq {}",
            self.cursor
        );
        if st.fixed == 0 {
            debug!(slave = %addr, "slave was already identical");
        }
        self.me.syncs.fetch_add(1, Ordering::Relaxed);
        self.me.sync_bytes.fetch_add(st.bytes, Ordering::Relaxed);
        *self.me.last_sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(super::SyncReport {
            why: why.to_string(),
            entries: st.entries,
            fixed: st.fixed,
            bytes: st.bytes,
            secs,
            stashed: stash,
            resumed_at: self.cursor,
        });
        Ok(())
    }
}
