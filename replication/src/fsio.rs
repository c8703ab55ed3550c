//! File-descriptor primitives both daemons build on: C strings, errno results, `*at` calls
//! that never follow a final symlink, and `/proc/self/fd` names for syscalls with no `*at`
//! form. None of them resolves a multi-component path: how a path becomes a directory fd is
//! each daemon's own business (the master's inode table, the slave's confinement).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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
