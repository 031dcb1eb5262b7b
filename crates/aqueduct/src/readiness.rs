//! Registering the engine's epoll descriptor with tokio: the crate's only `unsafe`. The Python
//! bindings' HTTP front registers its driver's descriptor with it too.

#![allow(unsafe_code)]

use std::os::fd::{BorrowedFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// An `AsyncFd` over a duplicate of `fd` (the engine's epoll descriptor), watched for
/// readability.
pub fn watch(fd: BorrowedFd<'_>) -> std::io::Result<AsyncFd<OwnedFd>> {
    let owned = fd.try_clone_to_owned()?;
    // SAFETY: `owned` is a descriptor this function just created and hands to the `AsyncFd`,
    // which owns it from here on: it stays open, refers to the same open file description, and
    // `as_raw_fd()` returns the same number until the `AsyncFd` is dropped or consumed.
    unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}
