//! Reading a tree the way a mirror compares it: directory listings with every attribute a
//! replica must match, and content digests computed where the data lives.
//!
//! Used by a replica to answer `ListDir` and `Checksum`, and by a sync's source and
//! `tdfs verify` for their own side, so both sides describe a tree identically. Everything
//! here works on directory fds and names: resolving a path to them is the caller's job
//! ([`crate::tree::Tree`]).

use std::ffi::{CStr, CString};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use sha2::{Digest as _, Sha256};
use tdfs_protocol::sync::{Digest, Entry};
use tdfs_protocol::Timespec;

use crate::fsio::{self, cstr, openat};

/// Names in a directory (without `.` and `..`), in the order the directory returns them.
pub fn read_names(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    // fdopendir takes ownership of its fd: give it a duplicate opened for reading.
    let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
    // SAFETY: `fd` is a directory fd we own; on success the DIR* owns it.
    let d = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(fd);
    struct Closer(*mut libc::DIR);
    impl Drop for Closer {
        fn drop(&mut self) {
            // SAFETY: closed exactly once.
            unsafe { libc::closedir(self.0) };
        }
    }
    let d = Closer(d);
    let mut out = Vec::new();
    loop {
        // SAFETY: errno is thread-local; cleared to tell end-of-directory from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: d.0 is a live DIR*.
        let e = unsafe { libc::readdir64(d.0) };
        if e.is_null() {
            let err = io::Error::last_os_error();
            if err.raw_os_error().unwrap_or(0) != 0 {
                return Err(err);
            }
            return Ok(out);
        }
        // SAFETY: e points to a dirent with a NUL-terminated name, valid until next readdir.
        let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    }
}

/// Extended attributes of the object `name` in `dir` (not following a symlink), sorted.
fn xattrs_at(dir: BorrowedFd<'_>, name: &CString) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let (proc, _fd) = fsio::proc_path(dir, name)?;
    let mut names = vec![0u8; 4096];
    let n = loop {
        // SAFETY: buffer writable for its length; the magic link names the object itself.
        let r = unsafe { libc::listxattr(proc.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if names.len() < (1 << 20) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    };
    let mut out = Vec::new();
    for xname in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let c = cstr(xname)?;
        let mut val = vec![0u8; 4096];
        let len = loop {
            // SAFETY: buffer writable for its length.
            let r = unsafe {
                libc::getxattr(
                    proc.as_ptr(),
                    c.as_ptr(),
                    val.as_mut_ptr().cast(),
                    val.len(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) if val.len() < (1 << 17) => val.resize(val.len() * 4, 0),
                _ => return Err(e),
            }
        };
        val.truncate(len);
        out.push((xname.to_vec(), val));
    }
    out.sort();
    Ok(out)
}

/// The target of the symlink `name` in `dir`.
pub fn readlink_at(dir: BorrowedFd<'_>, name: &CString) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer writable for its length.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Access and modification time of a stat.
pub fn times_of(st: &libc::stat) -> tdfs_protocol::Times {
    tdfs_protocol::Times {
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

/// Describes one directory entry.
pub fn entry_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Entry> {
    let c = cstr(name)?;
    let st = fsio::lstat_at(dir, &c)?;
    let kind = st.st_mode & libc::S_IFMT;
    let target = if kind == libc::S_IFLNK {
        readlink_at(dir, &c)?
    } else {
        Vec::new()
    };
    let (flags, projid) = match crate::flags::open_at(dir, name, &st)? {
        Some(fd) => crate::flags::get(fd.as_fd())?,
        None => (0, 0),
    };
    Ok(Entry {
        name: name.to_vec(),
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: if kind == libc::S_IFDIR {
            0
        } else {
            st.st_size as u64
        },
        mtime: Timespec {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec as u32,
        },
        rdev: if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            st.st_rdev
        } else {
            0
        },
        ino: st.st_ino,
        nlink: st.st_nlink,
        target,
        xattrs: xattrs_at(dir, &c)?,
        flags,
        projid,
    })
}

/// Lists an open directory, entries sorted by name. Entries that vanish while listing are
/// left out.
pub fn list_open_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Entry>> {
    let mut names = read_names(dir)?;
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        match entry_at(dir, &n) {
            Ok(e) => out.push(e),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The root directory itself, described like an entry (its name is empty).
pub fn root_entry(root: BorrowedFd<'_>) -> io::Result<Entry> {
    let mut e = entry_at(root, b".")?;
    e.name.clear();
    Ok(e)
}

/// Opens the regular file `name` in `dir` for reading its content: never following a
/// symlink, never blocking on a FIFO, without moving its atime where that is allowed.
pub fn open_content(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<std::fs::File> {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let fd = openat(dir, name, flags | libc::O_NOATIME).or_else(|e| {
        // O_NOATIME needs ownership or CAP_FOWNER; fall back rather than fail.
        if e.raw_os_error() == Some(libc::EPERM) {
            openat(dir, name, flags)
        } else {
            Err(e)
        }
    })?;
    let f = std::fs::File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(f)
}

/// SHA-256 of an open file's content, read in 1 MiB pieces; any error becomes its errno.
pub fn digest_file(f: io::Result<std::fs::File>) -> Digest {
    let r = (|| -> io::Result<(u64, [u8; 32])> {
        let mut f = f?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            size += n as u64;
            h.update(&buf[..n]);
        }
        Ok((size, h.finalize().into()))
    })();
    match r {
        Ok((size, sha256)) => Digest {
            errno: 0,
            size,
            sha256,
        },
        Err(e) => Digest {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            size: 0,
            sha256: [0; 32],
        },
    }
}
