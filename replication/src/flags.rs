//! Inode flags (`chattr`: append-only, immutable, noatime, nodump, ...) and project ids,
//! through the ioctls every Linux filesystem that has them answers: FS_IOC_GETFLAGS and
//! FS_IOC_SETFLAGS for the flags, FS_IOC_FSGETXATTR and FS_IOC_FSSETXATTR for the project id.
//!
//! A mirror keeps only the flags of [`REPLICATED_FLAGS`]; the others are the filesystem's
//! own (ext4 sets its extents flag by itself) and are left as each tree has them.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

pub use tdfs_protocol::op::{GUARD_FLAGS, REPLICATED_FLAGS};

use crate::fsio::{self, cstr};

/// `_IOR('X', 31, struct fsxattr)`: libc has no constant for it.
pub const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
/// `_IOW('X', 32, struct fsxattr)`.
pub const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
/// The 32-bit forms of GETFLAGS/SETFLAGS (`_IOR('f', 1, int)`), which the kernel also
/// accepts.
pub const FS_IOC32_GETFLAGS: libc::c_ulong = 0x8004_6601;
pub const FS_IOC32_SETFLAGS: libc::c_ulong = 0x4004_6602;

/// `struct fsxattr` (28 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsXattr {
    pub xflags: u32,
    pub extsize: u32,
    pub nextents: u32,
    pub projid: u32,
    pub cowextsize: u32,
    pub pad: [u8; 8],
}

impl FsXattr {
    pub const LEN: usize = 28;

    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        for (i, v) in [
            self.xflags,
            self.extsize,
            self.nextents,
            self.projid,
            self.cowextsize,
        ]
        .iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b[20..28].copy_from_slice(&self.pad);
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::LEN {
            return None;
        }
        let u = |i: usize| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        Some(FsXattr {
            xflags: u(0),
            extsize: u(1),
            nextents: u(2),
            projid: u(3),
            cowextsize: u(4),
            pad: b[20..28].try_into().expect("8 bytes"),
        })
    }
}

/// The filesystem has no such ioctl (or no flags for this kind of file).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

/// Every inode flag of an open file or directory (0 where the filesystem has none).
pub fn get_raw(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, which is valid.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut v) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if unsupported(&e) { Ok(0) } else { Err(e) };
    }
    Ok(v as u32)
}

/// Sets every inode flag of an open file or directory.
pub fn set_raw(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    let v = flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, which is valid.
    fsio::check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_SETFLAGS, &v) })?;
    Ok(())
}

/// `struct fsxattr` of an open file or directory (`None` where the filesystem has none).
pub fn get_fsxattr(fd: BorrowedFd<'_>) -> io::Result<Option<FsXattr>> {
    let mut x = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR writes one struct fsxattr through the pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut x) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if unsupported(&e) { Ok(None) } else { Err(e) };
    }
    Ok(Some(x))
}

pub fn set_fsxattr(fd: BorrowedFd<'_>, x: &FsXattr) -> io::Result<()> {
    // SAFETY: FS_IOC_FSSETXATTR reads one struct fsxattr through the pointer.
    fsio::check(unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FSSETXATTR as _, x) })?;
    Ok(())
}

/// What a mirror compares: the replicated flags and the project id.
pub fn get(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let flags = get_raw(fd)? & REPLICATED_FLAGS;
    let projid = get_fsxattr(fd)?.map_or(0, |x| x.projid);
    Ok((flags, projid))
}

/// Gives an open file or directory the replicated `flags` and `projid`, keeping the flags
/// its filesystem manages itself. The project id goes first: a project cannot be changed
/// once the inode is immutable.
pub fn set(fd: BorrowedFd<'_>, flags: u32, projid: u32) -> io::Result<()> {
    match get_fsxattr(fd)? {
        Some(mut x) if x.projid != projid => {
            x.projid = projid;
            set_fsxattr(fd, &x)?;
        }
        None if projid != 0 => return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        _ => {}
    }
    let cur = get_raw(fd)?;
    let want = (cur & !REPLICATED_FLAGS) | (flags & REPLICATED_FLAGS);
    if want != cur {
        set_raw(fd, want)?;
    }
    Ok(())
}

/// Opens `name` in `dir` for the flag ioctls, if it is a regular file or directory (the
/// only kinds that carry flags; opening a device or FIFO could block or reach a driver).
pub fn open_at(dir: BorrowedFd<'_>, name: &[u8], st: &libc::stat) -> io::Result<Option<OwnedFd>> {
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFDIR {
        return Ok(None);
    }
    let c = cstr(name)?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    match fsio::openat(dir, &c, flags | libc::O_NOATIME) {
        Ok(fd) => Ok(Some(fd)),
        // O_NOATIME needs ownership or CAP_FOWNER.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fsio::openat(dir, &c, flags).map(Some),
        Err(e) => Err(e),
    }
}
