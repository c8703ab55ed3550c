//! The inode table: FUSE node ids, lookup counts, and the current name(s) of each inode.
//!
//! The wire speaks paths, so every inode the kernel knows about keeps the names it is reachable
//! by (parent node id + name; several for hard links, exactly one for a directory). Paths are
//! rebuilt by walking parents up to the root, so renaming a directory renames everything under
//! it for free. No file descriptor is held per inode: the master opens by path relative to its
//! root fd when it needs to, so a tree of millions of files never exhausts the fd budget.
//!
//! Node ids are the backing inode numbers for inodes on the root's filesystem (so `d_ino` from
//! readdir and `st_ino` from stat agree for tools like `find` and `tar`); inodes on other
//! filesystems mounted inside the backing tree get ids from a private range, keyed by
//! (dev, ino).
//!
//! Lock order: the replication order lock (if taken) before this table's lock; the table lock
//! is never held across a syscall on the backing tree except `lstat` in name scans.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::RwLock;

use tdfs_protocol::WirePath;

pub const ROOT: u64 = 1;
/// Node ids for inodes on other devices start here (above any ext4/xfs inode number in use).
const FOREIGN_BASE: u64 = 1 << 62;

#[derive(Debug)]
struct Inode {
    dev: u64,
    ino: u64,
    nlookup: u64,
    names: Vec<(u64, OsString)>,
    /// What is known of its extended attributes (see [`Inodes::xattrs`]).
    xattrs: Xattrs,
    /// Bumped by every change of its extended attributes through the mount.
    xattr_epoch: u64,
}

/// Whether an inode has extended attributes, as far as the daemon knows. Every xattr is
/// set through the mount, so once a listing showed none, queries can be answered without
/// a syscall until one is set. (What the backing filesystem removes on its own, a file
/// capability on write or chown, only makes "none" truer.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Xattrs {
    #[default]
    Unknown,
    None,
    Some,
}

#[derive(Debug)]
struct Table {
    /// Bumped by every change to the names (unlink, rename): a lookup that stat'ed a name
    /// before such a change must not record what it saw (see [`Inodes::lookup_checked`]).
    generation: u64,
    nodes: HashMap<u64, Inode>,
    /// Reverse index of `Inode::names`, so unlink and rename cost O(1), not a scan.
    children: HashMap<(u64, OsString), u64>,
    foreign: HashMap<(u64, u64), u64>,
    next_foreign: u64,
}

#[derive(Debug)]
pub struct Inodes {
    root_dev: u64,
    root_ino: u64,
    t: RwLock<Table>,
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

fn name_error(e: tdfs_protocol::PathError) -> io::Error {
    use tdfs_protocol::PathError::*;
    io::Error::from_raw_os_error(match e {
        NameTooLong(_) | PathTooLong(_) | TooDeep(_) => libc::ENAMETOOLONG,
        _ => libc::EINVAL,
    })
}

impl Table {
    fn link_child(&mut self, parent: u64, name: &OsStr, id: u64) {
        self.children.insert((parent, name.to_os_string()), id);
    }

    /// Drops the name from the index and from its node; returns the node that had it.
    fn unlink_child(&mut self, parent: u64, name: &OsStr) -> Option<u64> {
        let id = self.children.remove(&(parent, name.to_os_string()))?;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.names
                .retain(|(p, nm)| !(*p == parent && nm.as_os_str() == name));
        }
        Some(id)
    }
}

impl Inodes {
    pub fn new(root_dev: u64, root_ino: u64) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Inode {
                dev: root_dev,
                ino: root_ino,
                nlookup: 1,
                names: Vec::new(),
                xattrs: Xattrs::Unknown,
                xattr_epoch: 0,
            },
        );
        Inodes {
            root_dev,
            root_ino,
            t: RwLock::new(Table {
                generation: 0,
                nodes,
                children: HashMap::new(),
                foreign: HashMap::new(),
                next_foreign: FOREIGN_BASE,
            }),
        }
    }

    /// The node id for a backing (dev, ino), without registering it. For readdir.
    pub fn peek_id(&self, dev: u64, ino: u64) -> u64 {
        if dev == self.root_dev {
            if ino == self.root_ino {
                ROOT
            } else if ino == ROOT {
                // The backing root's number is free, since the root is shown as 1.
                self.root_ino
            } else {
                ino
            }
        } else {
            let t = self.t.read().expect("inode table poisoned");
            t.foreign.get(&(dev, ino)).copied().unwrap_or(FOREIGN_BASE)
        }
    }

    /// The names' generation, to read before a lookup's `lstat` (see
    /// [`Inodes::lookup_checked`]).
    pub fn generation(&self) -> u64 {
        self.t.read().expect("inode table poisoned").generation
    }

    /// [`Inodes::lookup`] for a lookup that runs beside mutations (a FUSE LOOKUP does not take
    /// the order lock): records it only if no name changed since `generation` was read,
    /// before the `lstat` it comes from. Otherwise `None`, and the caller looks again: a
    /// rename between its `lstat` and this call would leave the name on the inode that was
    /// moved away, and the next open of it would open whatever took the name (once a FIFO,
    /// which blocked a FUSE thread for good).
    pub fn lookup_checked(
        &self,
        generation: u64,
        parent: u64,
        name: &OsStr,
        dev: u64,
        ino: u64,
        is_dir: bool,
    ) -> Option<u64> {
        let mut t = self.t.write().expect("inode table poisoned");
        if t.generation != generation {
            return None;
        }
        Some(self.lookup_locked(&mut t, parent, name, dev, ino, is_dir))
    }

    /// Records a successful lookup of `name` in `parent` resolving to (dev, ino); returns the
    /// node id. Every call must be balanced by a kernel FORGET. For lookups made under the
    /// order lock (creations), where no name can change meanwhile.
    pub fn lookup(&self, parent: u64, name: &OsStr, dev: u64, ino: u64, is_dir: bool) -> u64 {
        let mut t = self.t.write().expect("inode table poisoned");
        let id = self.lookup_locked(&mut t, parent, name, dev, ino, is_dir);
        // A new inode (perhaps under the number of one the kernel has yet to forget) may
        // have inherited a default ACL.
        Self::xattrs_changed_locked(&mut t, id);
        id
    }

    /// What is known of node `id`'s extended attributes, and the epoch to pass to
    /// [`Inodes::set_xattrs`] when recording what a listing read after this showed.
    pub fn xattrs(&self, id: u64) -> (Xattrs, u64) {
        let t = self.t.read().expect("inode table poisoned");
        t.nodes
            .get(&id)
            .map_or((Xattrs::Unknown, 0), |n| (n.xattrs, n.xattr_epoch))
    }

    /// Records what a listing of node `id`'s xattrs showed, unless they changed since
    /// `epoch` was read (before the listing).
    pub fn set_xattrs(&self, id: u64, epoch: u64, known: Xattrs) {
        let mut t = self.t.write().expect("inode table poisoned");
        if let Some(n) = t.nodes.get_mut(&id) {
            if n.xattr_epoch == epoch {
                n.xattrs = known;
            }
        }
    }

    /// After an xattr of node `id` was set or removed (or may have been).
    pub fn xattrs_changed(&self, id: u64) {
        let mut t = self.t.write().expect("inode table poisoned");
        Self::xattrs_changed_locked(&mut t, id);
    }

    fn xattrs_changed_locked(t: &mut Table, id: u64) {
        if let Some(n) = t.nodes.get_mut(&id) {
            n.xattrs = Xattrs::Unknown;
            n.xattr_epoch += 1;
        }
    }

    fn lookup_locked(
        &self,
        t: &mut Table,
        parent: u64,
        name: &OsStr,
        dev: u64,
        ino: u64,
        is_dir: bool,
    ) -> u64 {
        let id = if dev == self.root_dev {
            self.peek_id(dev, ino)
        } else if let Some(&id) = t.foreign.get(&(dev, ino)) {
            id
        } else {
            let id = t.next_foreign;
            t.next_foreign += 1;
            t.foreign.insert((dev, ino), id);
            id
        };
        let node = t.nodes.entry(id).or_insert_with(|| Inode {
            dev,
            ino,
            nlookup: 0,
            names: Vec::new(),
            xattrs: Xattrs::Unknown,
            xattr_epoch: 0,
        });
        let mut stale = Vec::new();
        if node.dev != dev || node.ino != ino {
            // The number was reused by a new inode while the kernel still remembered the old
            // one (it was deleted). Names of the old inode are stale by construction.
            node.dev = dev;
            node.ino = ino;
            node.xattrs = Xattrs::Unknown;
            node.xattr_epoch += 1;
            stale.append(&mut node.names);
        }
        node.nlookup += 1;
        let mut added = false;
        if id != ROOT {
            if is_dir {
                // A directory has exactly one name; a stale one (the kernel missed a rename
                // done behind our back) is replaced.
                stale.append(&mut node.names);
            }
            if !node
                .names
                .iter()
                .any(|(p, n)| *p == parent && n.as_os_str() == name)
            {
                node.names.push((parent, name.to_os_string()));
                added = true;
            }
        }
        for key in stale {
            if t.children.get(&key) == Some(&id) {
                t.children.remove(&key);
            }
        }
        if added {
            // The name now leads here: whichever inode the table still had under it lost it
            // (the kernel forgot a rename's target only later).
            if let Some(&other) = t.children.get(&(parent, name.to_os_string())) {
                if other != id {
                    if let Some(n) = t.nodes.get_mut(&other) {
                        n.names
                            .retain(|(p, nm)| !(*p == parent && nm.as_os_str() == name));
                    }
                }
            }
            t.link_child(parent, name, id);
        }
        id
    }

    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT {
            return;
        }
        let mut t = self.t.write().expect("inode table poisoned");
        if let Some(node) = t.nodes.get_mut(&id) {
            node.nlookup = node.nlookup.saturating_sub(n);
            if node.nlookup == 0 {
                let node = t.nodes.remove(&id).expect("present");
                for key in node.names {
                    if t.children.get(&key) == Some(&id) {
                        t.children.remove(&key);
                    }
                }
                if node.dev != self.root_dev {
                    t.foreign.remove(&(node.dev, node.ino));
                }
            }
        }
    }

    /// Current path of a node: `Ok(None)` when it has no name left (unlinked but still open).
    pub fn path(&self, id: u64) -> io::Result<Option<WirePath>> {
        let t = self.t.read().expect("inode table poisoned");
        let mut comps: Vec<&OsStr> = Vec::new();
        let mut cur = id;
        while cur != ROOT {
            let node = t.nodes.get(&cur).ok_or_else(enoent)?;
            let Some((parent, name)) = node.names.first() else {
                if cur == id {
                    return Ok(None);
                }
                // An ancestor directory with no name: it was removed, so this is gone too.
                return Ok(None);
            };
            comps.push(name);
            cur = *parent;
            if comps.len() > tdfs_protocol::path::MAX_DEPTH {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
        }
        let mut p = WirePath::root();
        for c in comps.iter().rev() {
            p.push(c.as_bytes()).map_err(name_error)?;
        }
        Ok(Some(p))
    }

    /// The node that the kernel knows by `name` in `parent`, if any.
    pub fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let t = self.t.read().expect("inode table poisoned");
        t.children.get(&(parent, name.to_os_string())).copied()
    }

    /// Path of `name` inside directory `parent`.
    pub fn child_path(&self, parent: u64, name: &OsStr) -> io::Result<WirePath> {
        let p = self.path(parent)?.ok_or_else(enoent)?;
        p.join(name.as_bytes()).map_err(name_error)
    }

    /// Removes the name `parent/name` from whichever inode holds it (unlink, rmdir, or the
    /// target of a replacing rename).
    pub fn remove_name(&self, parent: u64, name: &OsStr) {
        let mut t = self.t.write().expect("inode table poisoned");
        t.generation += 1;
        t.unlink_child(parent, name);
    }

    /// Applies a rename to the names: the source name moves; a replaced target loses its name;
    /// with `exchange`, the two names swap.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        exchange: bool,
    ) {
        let mut t = self.t.write().expect("inode table poisoned");
        t.generation += 1;
        let src = t.unlink_child(parent, name);
        let dst = t.unlink_child(newparent, newname);
        if let (Some(d), true) = (dst, exchange) {
            t.link_child(parent, name, d);
            if let Some(n) = t.nodes.get_mut(&d) {
                n.names.push((parent, name.to_os_string()));
            }
        }
        if let Some(s) = src {
            t.link_child(newparent, newname, s);
            if let Some(n) = t.nodes.get_mut(&s) {
                n.names.push((newparent, newname.to_os_string()));
            }
        }
    }
}
