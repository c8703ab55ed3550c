//! Path resolution beneath the mirrored root.
//!
//! Every path the master sends is resolved relative to a root directory fd, never as a string
//! joined onto the root's name, and never through a symlink: the slave's tree holds replicated
//! symlinks whose targets are arbitrary, and following one would let the master's data land
//! outside the root. `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` gives that guarantee in
//! one syscall; kernels without it get a component-wise `O_NOFOLLOW` walk.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tdfs_protocol::sync::{Digest, Entry};
use tdfs_protocol::WirePath;
pub use tdfs_replication::fsio::{check, cstr, fstat, lstat_at, openat, owned, proc_path};
use tdfs_replication::inspect;

/// Set once `openat2` reported ENOSYS, so later resolutions skip straight to the walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens the mirrored root once; everything else is resolved relative to this fd.
pub fn open_root(dir: &Path) -> io::Result<OwnedFd> {
    let c = cstr(dir.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    owned(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })
}

/// Opens the directory `rel` beneath `root` as an `O_PATH` fd without following any symlink.
pub fn open_dir(root: BorrowedFd<'_>, rel: &WirePath) -> io::Result<OwnedFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match openat2_dir(root, rel) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    walk_dir(root, rel)
}

fn openat2_dir(root: BorrowedFd<'_>, rel: &WirePath) -> io::Result<OwnedFd> {
    let path = cstr(rel.to_at_path())?;
    // SAFETY: open_how is plain old data; all-zero is a valid value that we then fill in.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    loop {
        // SAFETY: `path` and `how` are valid for the call and the size passed is the size of
        // the struct we pass, as openat2 requires.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            // EAGAIN: a concurrent rename somewhere on the system raced the lookup.
            if e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            return Err(e);
        }
        return owned(ret as libc::c_int);
    }
}

/// Fallback for kernels before 5.6: one `openat(O_NOFOLLOW)` per component. Components are
/// validated names (never `..`), so staying beneath the root only needs symlinks refused.
pub(crate) fn walk_dir(root: BorrowedFd<'_>, rel: &WirePath) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let mut cur = openat(root, c".", flags)?;
    for comp in rel.components() {
        // Each step refuses a symlink (ELOOP/ENOTDIR) because of O_NOFOLLOW|O_DIRECTORY.
        use std::os::fd::AsFd;
        cur = openat(cur.as_fd(), &cstr(comp)?, flags)?;
    }
    Ok(cur)
}

pub use tdfs_replication::tree::Target;

/// Resolves the parent of `path` beneath `root`.
pub fn target(root: BorrowedFd<'_>, path: &WirePath) -> io::Result<Target> {
    match path.split_last() {
        Some((parent, name)) => Ok(Target {
            dir: open_dir(root, &parent)?,
            name: cstr(name)?,
        }),
        None => Ok(Target {
            dir: open_dir(root, path)?,
            name: c".".to_owned(),
        }),
    }
}

/// The replica's tree as the replication engine reads it (listings and digests it answers,
/// syncs a relay feeds its own replicas from): every path resolved beneath the root, never
/// through a symlink.
pub struct ConfinedTree {
    root: OwnedFd,
}

impl ConfinedTree {
    pub fn new(root: OwnedFd) -> Self {
        ConfinedTree { root }
    }
}

impl tdfs_replication::tree::Tree for ConfinedTree {
    fn root(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.root.as_fd()
    }

    fn open_dir(&self, dir: &WirePath) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        open_dir(self.root.as_fd(), dir)
    }

    fn target(&self, path: &WirePath) -> io::Result<Target> {
        use std::os::fd::AsFd;
        target(self.root.as_fd(), path)
    }
}

/// The entries of the directory `path` beneath `root`, sorted by name.
pub fn list_dir(root: BorrowedFd<'_>, path: &WirePath) -> io::Result<Vec<Entry>> {
    use std::os::fd::AsFd;
    inspect::list_open_dir(open_dir(root, path)?.as_fd())
}

/// SHA-256 of the regular file at `path` beneath `root`.
pub fn digest(root: BorrowedFd<'_>, path: &WirePath) -> Digest {
    use std::os::fd::AsFd;
    inspect::digest_file(
        target(root, path).and_then(|t| inspect::open_content(t.dir.as_fd(), &t.name)),
    )
}
