//! Taking ownership of file descriptors a process inherited by number.
//!
//! A spawned worker receives the flow's memfd and doorbell eventfd as plain integers (an
//! environment variable, a pickled argument). Turning an integer into an `OwnedFd` is `unsafe`
//! because nothing proves the number is open and unowned; this module checks the first part
//! with `fcntl(F_GETFD)` and documents the second as the caller's contract.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{EngineError, Result};

/// Adopts the inherited descriptor `raw` and marks it close-on-exec.
///
/// The caller promises that `raw` was passed to this process for the engine and that no other
/// object owns it (it is adopted once).
pub fn adopt_inherited(raw: RawFd) -> Result<OwnedFd> {
    if raw < 0 {
        return Err(EngineError::Config(format!("invalid file descriptor {raw}")));
    }
    // SAFETY: `raw` is non-negative; the borrow only lives for the F_GETFD probe below, which
    // fails with EBADF instead of misbehaving if the descriptor is not open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    rustix::io::fcntl_getfd(borrowed).map_err(EngineError::os("fcntl(F_GETFD) on an inherited descriptor"))?;
    rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC).map_err(EngineError::os("fcntl(F_SETFD)"))?;
    // SAFETY: the descriptor is open (probed above) and, by this function's contract, owned by
    // nothing else in this process, so the `OwnedFd` becomes its single owner.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Clears close-on-exec so that a child started with `exec` inherits `fd`.
pub fn set_inheritable(fd: BorrowedFd<'_>, inheritable: bool) -> Result<()> {
    let flags = if inheritable { rustix::io::FdFlags::empty() } else { rustix::io::FdFlags::CLOEXEC };
    rustix::io::fcntl_setfd(fd, flags).map_err(EngineError::os("fcntl(F_SETFD)"))
}
