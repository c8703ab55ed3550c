//! Syscalls on the backing tree, by path relative to one root fd.
//!
//! The master is the only writer of its backing directory, and the paths it uses come from its
//! inode table (real directories, never through a symlink), so resolving relative to the root
//! fd is both correct and free of a per-inode fd: the fd budget is spent only on files users
//! hold open. Every call that could follow a final symlink is made with its no-follow form.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use tdfs_protocol::{Times, Timespec, WirePath};

pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn cvt_sz(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn times_of(st: &libc::stat) -> Times {
    Times {
        atime: Timespec {
            sec: st.st_atime,
            nsec: st.st_atime_nsec as u32,
        },
        mtime: Timespec {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec as u32,
        },
    }
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: the caller's fd is open for the duration of the call.
    tdfs_replication::fsio::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
}

#[derive(Debug)]
pub struct Backing {
    root: OwnedFd,
    /// `/proc/self/fd/<root>`, for the xattr calls that have no `*at` form.
    proc_root: String,
    pub dev: u64,
    pub ino: u64,
}

impl Backing {
    pub fn new(dir: &Path) -> io::Result<Self> {
        let c = cstr(dir.as_os_str().as_encoded_bytes())?;
        // SAFETY: c is a valid NUL-terminated path; the returned fd is owned below.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(root.as_raw_fd())?;
        Ok(Backing {
            proc_root: format!("/proc/self/fd/{}", root.as_raw_fd()),
            root,
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// Another fd on the root, for the replication layer's syncs.
    pub fn dup_root(&self) -> io::Result<OwnedFd> {
        self.root.try_clone()
    }

    pub fn root_fd(&self) -> RawFd {
        self.root.as_raw_fd()
    }

    fn at(&self, p: &WirePath) -> io::Result<CString> {
        cstr(p.to_at_path())
    }

    pub fn lstat(&self, p: &WirePath) -> io::Result<libc::stat> {
        tdfs_replication::fsio::lstat_at(self.root.as_fd(), &self.at(p)?)
    }

    /// Opens `p` without following a final symlink, and without ever blocking: O_NONBLOCK
    /// is always added, so a FIFO found where a file was expected fails or returns at once
    /// instead of holding a FUSE thread until some writer appears (it changes nothing for
    /// regular files and directories).
    pub fn open(&self, p: &WirePath, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        let c = self.at(p)?;
        // SAFETY: valid fd and C string; the returned fd is owned below.
        let fd = cvt(unsafe {
            libc::openat(
                self.root_fd(),
                c.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                mode as libc::c_uint,
            )
        })?;
        // SAFETY: fresh fd from openat.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn mkdir(&self, p: &WirePath, mode: u32) -> io::Result<()> {
        let c = self.at(p)?;
        // SAFETY: valid fd and C string.
        cvt(unsafe { libc::mkdirat(self.root_fd(), c.as_ptr(), mode) }).map(drop)
    }

    pub fn mknod(&self, p: &WirePath, mode: u32, rdev: u64) -> io::Result<()> {
        let c = self.at(p)?;
        // SAFETY: valid fd and C string.
        cvt(unsafe { libc::mknodat(self.root_fd(), c.as_ptr(), mode, rdev) }).map(drop)
    }

    pub fn symlink(&self, target: &[u8], p: &WirePath) -> io::Result<()> {
        let t = cstr(target)?;
        let c = self.at(p)?;
        // SAFETY: valid C strings and fd.
        cvt(unsafe { libc::symlinkat(t.as_ptr(), self.root_fd(), c.as_ptr()) }).map(drop)
    }

    pub fn link(&self, existing: &WirePath, new: &WirePath) -> io::Result<()> {
        let a = self.at(existing)?;
        let b = self.at(new)?;
        // SAFETY: valid C strings and fds; flags 0 means a symlink is linked, not followed.
        cvt(unsafe { libc::linkat(self.root_fd(), a.as_ptr(), self.root_fd(), b.as_ptr(), 0) })
            .map(drop)
    }

    pub fn unlink(&self, p: &WirePath, dir: bool) -> io::Result<()> {
        let c = self.at(p)?;
        let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: valid fd and C string.
        cvt(unsafe { libc::unlinkat(self.root_fd(), c.as_ptr(), flags) }).map(drop)
    }

    pub fn rename(&self, from: &WirePath, to: &WirePath, flags: u32) -> io::Result<()> {
        let a = self.at(from)?;
        let b = self.at(to)?;
        // SAFETY: valid C strings and fds; renameat2 via syscall for older libcs.
        cvt(unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                self.root_fd(),
                a.as_ptr(),
                self.root_fd(),
                b.as_ptr(),
                flags,
            ) as libc::c_int
        })
        .map(drop)
    }

    pub fn chown(&self, p: &WirePath, uid: u32, gid: u32) -> io::Result<()> {
        let c = self.at(p)?;
        // SAFETY: valid fd and C string; no-follow so a symlink itself is chowned.
        cvt(unsafe {
            libc::fchownat(
                self.root_fd(),
                c.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    /// chmod of a non-symlink (the kernel never sends chmod for a symlink: it follows it).
    pub fn chmod(&self, p: &WirePath, mode: u32) -> io::Result<()> {
        let c = self.at(p)?;
        // SAFETY: valid fd and C string.
        cvt(unsafe { libc::fchmodat(self.root_fd(), c.as_ptr(), mode, 0) }).map(drop)
    }

    pub fn utimens(&self, p: &WirePath, ts: &[libc::timespec; 2]) -> io::Result<()> {
        let c = self.at(p)?;
        // SAFETY: valid fd, C string and a two-element timespec array.
        cvt(unsafe {
            libc::utimensat(
                self.root_fd(),
                c.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    pub fn readlink(&self, p: &WirePath) -> io::Result<Vec<u8>> {
        let c = self.at(p)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: buf is writable for its length.
        let n = cvt_sz(unsafe {
            libc::readlinkat(
                self.root_fd(),
                c.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        })?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn statfs(&self) -> io::Result<libc::statvfs> {
        // SAFETY: `s` fully written on success.
        unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            cvt(libc::fstatvfs(self.root_fd(), &mut s))?;
            Ok(s)
        }
    }

    fn xpath(&self, p: &WirePath) -> io::Result<CString> {
        let mut v = self.proc_root.as_bytes().to_vec();
        v.push(b'/');
        // The root as `/proc/self/fd/N/.`: the l*xattr calls do not follow a final magic
        // link, so `/proc/self/fd/N` alone names the proc link itself (EOPNOTSUPP).
        v.extend_from_slice(p.to_at_path());
        cstr(&v)
    }

    /// getxattr without following a final symlink. `size` 0 asks for the length.
    pub fn getxattr(&self, p: &WirePath, name: &[u8], size: usize) -> io::Result<Vec<u8>> {
        let c = self.xpath(p)?;
        let n = cstr(name)?;
        let mut buf = vec![0u8; size];
        // SAFETY: buf is writable for `size` bytes (null pointer allowed when size is 0).
        let r = cvt_sz(unsafe {
            libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size)
        })?;
        if size == 0 {
            return Ok(vec![0; r]);
        }
        buf.truncate(r);
        Ok(buf)
    }

    pub fn listxattr(&self, p: &WirePath, size: usize) -> io::Result<Vec<u8>> {
        let c = self.xpath(p)?;
        let mut buf = vec![0u8; size];
        // SAFETY: buf is writable for `size` bytes.
        let r = cvt_sz(unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), size) })?;
        if size == 0 {
            return Ok(vec![0; r]);
        }
        buf.truncate(r);
        Ok(buf)
    }

    pub fn setxattr(&self, p: &WirePath, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
        let c = self.xpath(p)?;
        let n = cstr(name)?;
        // SAFETY: valid C strings; value readable for its length.
        cvt(unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
        .map(drop)
    }

    pub fn removexattr(&self, p: &WirePath, name: &[u8]) -> io::Result<()> {
        let c = self.xpath(p)?;
        let n = cstr(name)?;
        // SAFETY: valid C strings.
        cvt(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }).map(drop)
    }
}

/// The backing tree as the replication engine reads it (syncs, `tdfs verify`): paths are
/// resolved relative to the root fd, like every other backing call. They come from the
/// tree's own listings and are read under the order lock, so each component is the real
/// directory a listing just showed; a final symlink is never followed.
pub struct BackingTree {
    root: OwnedFd,
}

impl BackingTree {
    pub fn new(root: OwnedFd) -> Self {
        BackingTree { root }
    }
}

impl tdfs_replication::tree::Tree for BackingTree {
    fn root(&self) -> std::os::fd::BorrowedFd<'_> {
        self.root.as_fd()
    }

    fn open_dir(&self, dir: &WirePath) -> io::Result<OwnedFd> {
        let c = cstr(dir.to_at_path())?;
        // SAFETY: valid fd and C string; the returned fd is owned below.
        let fd = cvt(unsafe {
            libc::openat(
                self.root.as_raw_fd(),
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: fresh fd from openat.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
