//! The stash: what a diverged replica held of its own, kept before a sync overwrites it.
//!
//! A replica diverges when it applied ops its new upstream's line does not have: a master
//! cut off from the others kept taking writes, or it acknowledged writes asynchronously and
//! died before its slaves had them, and another node was promoted meanwhile. Making it
//! identical to the new master would destroy those changes silently. Instead, while the sync
//! runs, every file or directory an op is about to overwrite, remove, truncate or rewrite is
//! copied first into a stash directory outside the mirrored tree (once per path), and a
//! manifest says what happened to each: HCFS's "stashed" losing timeline, for a person to
//! look at and merge back by hand.
//!
//! More is stashed than strictly diverged: a file the new master changed since the branch
//! point is also overwritten here, and its old version lands in the stash too. Nothing is
//! left out, which is the point.
//!
//! Layout: `STASH_DIR/<UTC time>-epoch<N>/MANIFEST.tsv` and `files/<path>` (the copies, with
//! their mode, owner and times). The manifest has one line per path, tab-separated:
//! `action type size mtime mode uid gid path copy` (action `replaced`, `removed`,
//! `modified` or `metadata`; paths with a tab, newline or `%` percent-escaped).

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tdfs_protocol::{Op, OpKind, WirePath};
use tdfs_replication::fsio::{check, cstr, lstat_at, openat};

use crate::confine;

/// What an op is about to do to an existing path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Replaced,
    Removed,
    Modified,
    Metadata,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Replaced => "replaced",
            Action::Removed => "removed",
            Action::Modified => "modified",
            Action::Metadata => "metadata",
        }
    }
}

pub struct Stash {
    dir: PathBuf,
    files: PathBuf,
    manifest: File,
    done: HashSet<WirePath>,
    /// Directories copied whole: whatever lies beneath them is in the stash already.
    whole: HashSet<WirePath>,
    /// Paths stashed (manifest lines) and bytes of file content copied.
    pub entries: u64,
    pub bytes: u64,
}

fn escape(s: &[u8]) -> String {
    let mut out = String::new();
    for &b in s {
        match b {
            b'%' | b'\t' | b'\n' | b'\r' => out.push_str(&format!("%{b:02X}")),
            _ => out.push(b as char),
        }
    }
    // Non-UTF-8 names: bytes above 0x7f come out as Latin-1 characters here; escape them
    // too so the manifest stays byte-exact.
    out.chars()
        .map(|c| {
            if (c as u32) > 0x7e {
                format!("%{:02X}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "chardev",
        libc::S_IFBLK => "blockdev",
        _ => "unknown",
    }
}

fn utc(sec: i64, nsec: i64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm): the one date
    // format this file writes, not worth a dependency.
    let days = sec.div_euclid(86_400);
    let secs = sec.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nsec:09}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

impl Stash {
    /// Opens a new stash under `base` for a sync into a diverged tree; `header` says why
    /// (upstream, epoch, branch point, this tree's position).
    pub fn create(base: &Path, epoch: u64, header: &str) -> io::Result<Stash> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let stamp: String = utc(now.as_secs() as i64, 0)
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == 'T')
            .take(15)
            .collect();
        let mut dir = base.join(format!("{stamp}Z-epoch{epoch}"));
        let mut n = 1;
        while dir.exists() {
            n += 1;
            dir = base.join(format!("{stamp}Z-epoch{epoch}-{n}"));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let files = dir.join("files");
        fs::DirBuilder::new().mode(0o700).create(&files)?;
        let mut manifest = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("MANIFEST.tsv"))?;
        for line in header.lines() {
            writeln!(manifest, "# {line}")?;
        }
        writeln!(
            manifest,
            "# action\ttype\tsize\tmtime\tmode\tuid\tgid\tpath\tcopy"
        )?;
        manifest.sync_all()?;
        Ok(Stash {
            dir,
            files,
            manifest,
            done: HashSet::new(),
            whole: HashSet::new(),
            entries: 0,
            bytes: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Before `op` changes the tree beneath `root`: preserves whatever it would overwrite,
    /// remove or change. An error means nothing may be changed (the op must not be applied).
    pub fn before(&mut self, root: BorrowedFd<'_>, op: &Op) -> io::Result<()> {
        use OpKind::*;
        match &op.kind {
            Create { path, .. } | Symlink { path, .. } | Mknod { path, .. } => {
                self.preserve(root, path, Action::Replaced, false)
            }
            Link { new, .. } => self.preserve(root, new, Action::Replaced, false),
            Mkdir { path, .. } => self.preserve(root, path, Action::Replaced, true),
            Unlink { path } | Rmdir { path } | RemoveTree { path } => {
                self.preserve(root, path, Action::Removed, false)
            }
            Rename { to, flags, .. } => {
                if flags & tdfs_protocol::op::RENAME_EXCHANGE == 0 {
                    self.preserve(root, to, Action::Replaced, false)?;
                }
                Ok(())
            }
            Write { path, .. } | Fallocate { path, .. } | CopyRange { path, .. } => {
                self.preserve(root, path, Action::Modified, false)
            }
            SetAttr {
                path,
                size: Some(_),
                ..
            } => self.preserve(root, path, Action::Modified, false),
            SetAttr { path, .. }
            | SetTimes { path }
            | SetXattr { path, .. }
            | RemoveXattr { path, .. }
            | SetFlags { path, .. } => self.preserve(root, path, Action::Metadata, false),
            Fsync { .. } => Ok(()),
        }
    }

    /// Stashes `path` (once). `keep_dir`: a directory there survives the op (mkdir over
    /// one), so only something else is stashed.
    fn preserve(
        &mut self,
        root: BorrowedFd<'_>,
        path: &WirePath,
        action: Action,
        keep_dir: bool,
    ) -> io::Result<()> {
        if path.is_root() || self.done.contains(path) {
            return Ok(());
        }
        // Already stashed as part of a directory stashed whole.
        if action != Action::Metadata {
            let mut up = path.parent();
            while !up.is_root() {
                if self.whole.contains(&up) {
                    return Ok(());
                }
                up = up.parent();
            }
        }
        let t = match confine::target(root, path) {
            Ok(t) => t,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        let st = match lstat_at(t.dir.as_fd(), &t.name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // Nothing of this tree's own there: what an op creates at this path now is
                // the upstream's, never to be stashed later.
                if action == Action::Replaced {
                    self.done.insert(path.clone());
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if keep_dir && is_dir {
            return Ok(());
        }
        let rel = String::from_utf8_lossy(path.as_bytes()).into_owned();
        let copy = if action == Action::Metadata {
            None
        } else {
            let dest = self.files.join(OsStr::from_bytes(path.as_bytes()));
            if let Some(parent) = dest.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)?;
            }
            self.copy_entry(t.dir.as_fd(), &t.name, &st, &dest)?;
            Some(format!("files/{rel}"))
        };
        writeln!(
            self.manifest,
            "{}\t{}\t{}\t{}\t{:04o}\t{}\t{}\t{}\t{}",
            action.name(),
            kind_name(st.st_mode),
            if is_dir { 0 } else { st.st_size },
            utc(st.st_mtime, st.st_mtime_nsec),
            st.st_mode & 0o7777,
            st.st_uid,
            st.st_gid,
            escape(path.as_bytes()),
            copy.as_deref()
                .map_or_else(|| "-".to_string(), |c| escape(c.as_bytes()))
        )?;
        self.manifest.flush()?;
        self.entries += 1;
        if is_dir && copy.is_some() {
            self.whole.insert(path.clone());
        }
        self.done.insert(path.clone());
        Ok(())
    }

    /// Copies `name` in `dir` (described by `st`) to `dest`, directories recursively, with
    /// mode, owner and times; never following a symlink.
    fn copy_entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CString,
        st: &libc::stat,
        dest: &Path,
    ) -> io::Result<()> {
        let dc = cstr(dest.as_os_str().as_encoded_bytes())?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {
                let src = openat(
                    dir,
                    name,
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                )?;
                let out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(dest)?;
                self.bytes += copy_content(src.as_fd(), out.as_fd(), st.st_size as u64)?;
                out.sync_all()?;
            }
            libc::S_IFDIR => {
                fs::DirBuilder::new().mode(0o700).create(dest)?;
                let d = openat(
                    dir,
                    name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                )?;
                for child in tdfs_replication::inspect::read_names(d.as_fd())? {
                    let c = cstr(&child)?;
                    let cst = match lstat_at(d.as_fd(), &c) {
                        Ok(s) => s,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                        Err(e) => return Err(e),
                    };
                    let cd = dest.join(OsStr::from_bytes(&child));
                    self.copy_entry(d.as_fd(), &c, &cst, &cd)?;
                }
            }
            libc::S_IFLNK => {
                let target = tdfs_replication::inspect::readlink_at(dir, name)?;
                let tc = cstr(&target)?;
                // SAFETY: both are valid C strings.
                check(unsafe { libc::symlink(tc.as_ptr(), dc.as_ptr()) })?;
            }
            kind => {
                // SAFETY: valid C string; a device node, FIFO or socket is made, never opened.
                check(unsafe { libc::mknod(dc.as_ptr(), kind | 0o600, st.st_rdev) })?;
            }
        }
        // Owner, then mode (chown clears setuid), then times; a symlink keeps its own mode.
        // SAFETY: valid C string; AT_SYMLINK_NOFOLLOW acts on the link itself.
        check(unsafe {
            libc::fchownat(
                libc::AT_FDCWD,
                dc.as_ptr(),
                st.st_uid,
                st.st_gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            // SAFETY: valid C string (not a symlink, so chmod acts on it).
            check(unsafe { libc::chmod(dc.as_ptr(), st.st_mode & 0o7777) })?;
        }
        let ts = [
            libc::timespec {
                tv_sec: st.st_atime,
                tv_nsec: st.st_atime_nsec,
            },
            libc::timespec {
                tv_sec: st.st_mtime,
                tv_nsec: st.st_mtime_nsec,
            },
        ];
        // SAFETY: valid C string and a two-element array.
        check(unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                dc.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    /// Closes the manifest (durably) and says what was stashed. An empty stash is removed.
    pub fn finish(self) -> io::Result<Option<(PathBuf, u64, u64)>> {
        self.manifest.sync_all()?;
        if self.entries == 0 {
            let _ = fs::remove_dir_all(&self.dir);
            return Ok(None);
        }
        Ok(Some((self.dir, self.entries, self.bytes)))
    }
}

/// Copies `len` bytes (or to EOF) from `src` to `dst`: copy_file_range (a reflink where the
/// filesystem shares extents), read/write where it cannot cross filesystems.
fn copy_content(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, len: u64) -> io::Result<u64> {
    let mut done = 0u64;
    loop {
        // SAFETY: both fds are live; null offsets use and advance the file positions.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                std::ptr::null_mut(),
                dst.as_raw_fd(),
                std::ptr::null_mut(),
                (len.saturating_sub(done).max(1 << 20)) as usize,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => break,
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Ok(done);
        }
        done += n as u64;
    }
    // The fallback, from wherever the first attempt left the offsets.
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // SAFETY: buffer writable for its length.
        let n = unsafe { libc::read(src.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(done);
        }
        let mut off = 0;
        while off < n as usize {
            // SAFETY: the slice [off, n) of buf is readable.
            let w = unsafe {
                libc::write(
                    dst.as_raw_fd(),
                    buf[off..].as_ptr().cast(),
                    n as usize - off,
                )
            };
            if w < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            off += w as usize;
        }
        done += n as u64;
    }
}
