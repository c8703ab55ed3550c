//! The tree a node serves, as the engine reads it: for syncs it feeds (listings, entries,
//! file content) and for listings and digests it answers.
//!
//! The engine never turns a path into a file descriptor itself. Each daemon does that its
//! own way: the master by the names its inode table holds, relative to its root fd (it is
//! the only writer of that tree); a replica beneath its root without following any symlink
//! (`tdfs-slave`'s confinement), since its tree holds replicated symlinks with arbitrary
//! targets and a path from upstream is untrusted.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use tdfs_protocol::sync::{Digest, Entry};
use tdfs_protocol::WirePath;

use crate::inspect;

/// A path split for `*at` calls: its parent directory, opened, and its last name (`.` for
/// the root itself).
pub struct Target {
    pub dir: OwnedFd,
    pub name: CString,
}

/// Read access to a tree by wire path. Implementors say how a path is resolved; the rest is
/// shared.
pub trait Tree: Send + Sync + 'static {
    /// The tree's root directory (an `O_PATH` or readable directory fd).
    fn root(&self) -> BorrowedFd<'_>;

    /// The directory at `dir`, opened (a base for `*at` calls).
    fn open_dir(&self, dir: &WirePath) -> io::Result<OwnedFd>;

    /// Where `path` is: its parent directory, opened, and its last name.
    fn target(&self, path: &WirePath) -> io::Result<Target> {
        match path.split_last() {
            Some((parent, name)) => Ok(Target {
                dir: self.open_dir(&parent)?,
                name: crate::fsio::cstr(name)?,
            }),
            None => Ok(Target {
                dir: self.open_dir(path)?,
                name: c".".to_owned(),
            }),
        }
    }

    /// The entries of directory `dir`, sorted by name.
    fn list_dir(&self, dir: &WirePath) -> io::Result<Vec<Entry>> {
        inspect::list_open_dir(self.open_dir(dir)?.as_fd())
    }

    /// The entry at `path`; the root's has an empty name.
    fn entry(&self, path: &WirePath) -> io::Result<Entry> {
        if path.is_root() {
            return inspect::root_entry(self.root());
        }
        let t = self.target(path)?;
        inspect::entry_at(t.dir.as_fd(), t.name.as_bytes())
    }

    /// The regular file at `path`, open for reading its content.
    fn open_content(&self, path: &WirePath) -> io::Result<std::fs::File> {
        let t = self.target(path)?;
        inspect::open_content(t.dir.as_fd(), &t.name)
    }

    /// SHA-256 of the regular file at `path` (its errno on failure).
    fn digest(&self, path: &WirePath) -> Digest {
        inspect::digest_file(self.open_content(path))
    }

    /// Where an open file of this tree is now (it may have been renamed since it was
    /// opened), or `None` once it has no name left.
    fn path_of(&self, fd: BorrowedFd<'_>) -> io::Result<Option<WirePath>> {
        let root = std::fs::read_link(format!("/proc/self/fd/{}", self.root().as_raw_fd()))?;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let s = link.as_os_str().as_encoded_bytes();
        if s.ends_with(b" (deleted)") {
            return Ok(None);
        }
        let Some(rest) = s.strip_prefix(root.as_os_str().as_encoded_bytes()) else {
            return Ok(None);
        };
        // "/srv/www2/f" is not beneath "/srv/www".
        let rest = match rest.strip_prefix(b"/") {
            Some(r) => r,
            None if rest.is_empty() => rest,
            None => return Ok(None),
        };
        WirePath::parse(rest)
            .map(Some)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }
}
