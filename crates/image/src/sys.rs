//! Thin wrappers over the `*at()` system calls the unpacker is built on.
//!
//! Every function returns `io::Result` with the OS error; the caller adds
//! which entry and which operation failed. Nothing here follows a symlink:
//! directories are resolved with `openat2(2)` confined beneath the root
//! ([`open_beneath`]), final components are created or changed with
//! `AT_SYMLINK_NOFOLLOW` / `O_NOFOLLOW` variants.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct open_how` of `openat2(2)` (linux/openat2.h), defined here rather
/// than taken from libc so the layout we pass is the one we read.
#[repr(C)]
#[derive(Debug, Default)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Refuse to resolve outside the starting directory (`..` past it, absolute
/// paths, absolute symlinks).
const RESOLVE_BENEATH: u64 = 0x08;
/// Refuse every symlink during resolution, including the last component.
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
/// Refuse `/proc/PID/fd/N`-style magic links.
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;

/// A path as a C string; a NUL byte inside is an error.
pub(crate) fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in name"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(owned)
}

/// Opens `rel` (relative, no `..`) beneath `root` with `openat2(2)`:
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`. A
/// symlink anywhere on the way fails with `ELOOP`, an escape with `EXDEV`.
/// An empty `rel` opens `root` itself.
pub(crate) fn open_beneath(root: BorrowedFd<'_>, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
    let bytes = rel.as_os_str().as_bytes();
    let path = cstr(if bytes.is_empty() { b"." } else { bytes })?;
    let how = OpenHow {
        // No O_NOFOLLOW: with O_PATH it would open a final symlink itself
        // instead of letting RESOLVE_NO_SYMLINKS refuse it.
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // EAGAIN: the kernel saw a concurrent rename or mount and could not
    // guarantee the resolution; retrying is what openat2(2) asks for.
    for _ in 0..16 {
        // SAFETY: `path` is a valid NUL-terminated string and `how` a valid
        // open_how whose size we pass; both outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        match owned(ret as libc::c_int) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            other => return other,
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// `openat(2)` of one name in `dir`; `O_NOFOLLOW | O_CLOEXEC` always added.
pub(crate) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the mode is passed as the variadic
    // argument openat expects when O_CREAT is set, ignored otherwise.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    owned(fd)
}

/// `fstatat(2)` without following a final symlink; `None` if it is absent.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a writable stat buffer and `name` a valid C string.
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    match check(ret) {
        // SAFETY: fstatat succeeded, so it filled the whole buffer.
        Ok(()) => Ok(Some(unsafe { st.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is a valid C string.
    let ret = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) };
    check(ret)
}

/// `unlinkat(2)`; `dir_flag` removes an (empty) directory.
pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, remove_dir: bool) -> io::Result<()> {
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `name` is a valid C string.
    let ret = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) };
    check(ret)
}

pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both are valid C strings.
    let ret = unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) };
    check(ret)
}

/// `linkat(2)` without `AT_SYMLINK_FOLLOW`: a symlink target is linked
/// itself, never followed.
pub(crate) fn linkat(
    old_dir: BorrowedFd<'_>,
    old_name: &CStr,
    new_dir: BorrowedFd<'_>,
    new_name: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are valid C strings.
    let ret = unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0,
        )
    };
    check(ret)
}

/// `mknodat(2)`; `kind` is `S_IFCHR`, `S_IFBLK` or `S_IFIFO`.
pub(crate) fn mknodat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    kind: libc::mode_t,
    mode: u32,
    major: u32,
    minor: u32,
) -> io::Result<()> {
    let dev = libc::makedev(major, minor);
    // SAFETY: `name` is a valid C string.
    let ret = unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            kind | (mode as libc::mode_t & 0o7777),
            dev,
        )
    };
    check(ret)
}

/// `fchownat(2)` with `AT_SYMLINK_NOFOLLOW` (lchown of one name).
pub(crate) fn lchown_at(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `name` is a valid C string.
    let ret = unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(ret)
}

pub(crate) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let ret = unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) };
    check(ret)
}

pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let ret = unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t & 0o7777) };
    check(ret)
}

/// `fchmodat(2)` of a name the caller just created and knows is not a
/// symlink (Linux's fchmodat cannot refuse to follow one before 6.6).
pub(crate) fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is a valid C string.
    let ret = unsafe {
        libc::fchmodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t & 0o7777,
            0,
        )
    };
    check(ret)
}

fn timespecs(secs: i64, nanos: u32) -> [libc::timespec; 2] {
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as libc::c_long,
    };
    [t, t]
}

/// Sets atime and mtime of one name, not following a final symlink.
pub(crate) fn utimes_at(dir: BorrowedFd<'_>, name: &CStr, secs: i64, nanos: u32) -> io::Result<()> {
    let times = timespecs(secs, nanos);
    // SAFETY: `name` is a valid C string and `times` two timespecs.
    let ret = unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(ret)
}

/// Sets atime and mtime of an open file.
pub(crate) fn futimens(fd: BorrowedFd<'_>, secs: i64, nanos: u32) -> io::Result<()> {
    let times = timespecs(secs, nanos);
    // SAFETY: `times` is two timespecs; `fd` is open.
    let ret = unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) };
    check(ret)
}

pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is a valid C string; `value` is a live slice whose
    // length we pass.
    let ret = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(ret)
}

// The binding keeps the SAFETY comment on a statement of its own.
#[allow(clippy::let_and_return)]
pub(crate) fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    let uid = unsafe { libc::geteuid() };
    uid
}

/// The names in a directory, without `.` and `..`. `dir` may be an
/// `O_PATH` descriptor: the listing goes through a fresh descriptor of its
/// own, so no offset is shared.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is an open directory descriptor whose ownership passes
    // to the DIR stream (closedir closes it).
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        let _closed = unsafe { OwnedFd::from_raw_fd(raw) };
        return Err(err);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; clearing it tells end-of-stream
        // (NULL, errno 0) from an error (NULL, errno set).
        let errno = unsafe { libc::__errno_location() };
        // SAFETY: `errno` points to this thread's errno.
        unsafe { *errno = 0 };
        // SAFETY: `stream` is a live DIR stream.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            // SAFETY: as above.
            let code = unsafe { *errno };
            break if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(code))
            };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is
        // NUL-terminated; we copy it before the next readdir call.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `stream` is live and closed exactly once here.
    let ret = unsafe { libc::closedir(stream) };
    result?;
    check(ret)?;
    Ok(names)
}

/// A path's file name as a C string.
pub(crate) fn name_of(name: &OsStr) -> io::Result<CString> {
    cstr(name.as_bytes())
}
