//! Path resolution beneath the mirrored root.
//!
//! Every path the master sends is resolved relative to a root directory fd, never as a string
//! joined onto the root's name, and never through a symlink: the slave's tree holds replicated
//! symlinks whose targets are arbitrary, and following one would let the master's data land
//! outside the root. `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` gives that guarantee in
//! one syscall; kernels without it get a component-wise `O_NOFOLLOW` walk.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tdfs_protocol::WirePath;

/// Set once `openat2` reported ENOSYS, so later resolutions skip straight to the walk.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Converts a name or path to a C string; wire paths cannot hold NUL, but a local path given
/// on the command line could, and an error beats a panic.
pub fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Turns a -1 syscall result into the errno it left.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Wraps a freshly returned fd (or -1) into an owned fd.
pub fn owned(ret: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(ret)?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat` with `O_CLOEXEC` added.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string and `dir` a live fd for the call.
    owned(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, 0) })
}

/// `fstatat(AT_SYMLINK_NOFOLLOW)`: the entry `name` in `dir` itself, never a symlink's target.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data, so all-zero is a valid value for the kernel to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `st` is a valid, writable stat buffer.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// `fstat` of an open fd.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data, so all-zero is a valid value for the kernel to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is live and `st` is a valid, writable stat buffer.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// An `O_PATH` fd on the object `name` in `dir` (a symlink itself, not its target) and the
/// `/proc/self/fd` name that reaches it, for syscalls with no `*at` form (xattrs, chmod
/// without following). The fd must stay open while the name is used.
pub fn proc_path(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<(CString, OwnedFd)> {
    let fd = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW)?;
    let path = cstr(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes())?;
    Ok((path, fd))
}

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

/// A path split for `*at` syscalls: its parent directory fd and its last component. The root
/// itself becomes the root fd and `.`, which every `*at` call resolves to the root.
pub struct Target {
    pub dir: OwnedFd,
    pub name: CString,
}

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
