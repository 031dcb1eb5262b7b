//! One shared mapping and the checked accessors every other `shm` module builds on.
//!
//! A [`SharedRegion`] is either a memfd mapped `MAP_SHARED` (what processes of a flow share: it
//! is inherited across `fork` or passed as a file descriptor, and the kernel frees it when the
//! last mapping and descriptor are gone, so a SIGKILL never leaks it), or a heap buffer, used by
//! tests that run under Miri. Both expose the same accessors.
//!
//! Invariant: the base address is 4096-aligned and `len` bytes from it stay valid for as long as
//! the `SharedRegion` lives. Accessors check bounds and alignment, so callers only have to prove
//! that the bytes they copy are not being written concurrently by a well-behaved peer (the ring
//! and arena protocols guarantee that).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::MmapRaw;

use crate::error::{EngineError, Result};

const BASE_ALIGN: usize = 4096;

// The mapping is only held so that dropping the region unmaps it; all access goes through
// `base`. The heap buffer is held as a raw pointer (from `Box::into_raw`) rather than a `Box`:
// a `Box` asserts unique access whenever it moves, which would invalidate `base` and every
// pointer derived from it.
enum Backing {
    Memfd {
        file: File,
        _map: MmapRaw,
    },
    /// Heap memory for single-process tests (Miri cannot map files). Freed in `Drop`.
    Heap {
        pages: *mut [AlignedPage],
    },
}

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct AlignedPage([u8; BASE_ALIGN]);

/// One mapping shared by the processes of a flow.
pub struct SharedRegion {
    backing: Backing,
    base: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory accessed only through atomics and raw copies whose
// synchronisation is the callers' protocol (ring and arena); the pointer stays valid for the
// lifetime of the value wherever it is sent.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; `&SharedRegion` only hands out atomics and copy operations.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Creates an anonymous memfd of `len` bytes and maps it. The pages are allocated lazily by
    /// the kernel on first touch, so a large, mostly idle region costs nothing.
    pub fn create(name: &str, len: usize) -> Result<Self> {
        let fd =
            rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC).map_err(EngineError::os("memfd_create"))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(EngineError::os("ftruncate"))?;
        Self::map(fd)
    }

    /// Maps an existing memfd received from the process that created it.
    pub fn attach(fd: OwnedFd) -> Result<Self> {
        Self::map(fd)
    }

    fn map(fd: OwnedFd) -> Result<Self> {
        let file = File::from(fd);
        let len = file.metadata().map_err(|e| EngineError::Os("fstat", e))?.len() as usize;
        if len == 0 {
            return Err(EngineError::Corrupt("shared region has zero length"));
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| EngineError::Os("mmap", e))?;
        let base = map.as_mut_ptr();
        debug_assert_eq!(base as usize % BASE_ALIGN, 0);
        Ok(Self { backing: Backing::Memfd { file, _map: map }, base, len })
    }

    /// A zeroed heap region, for tests that must run under Miri.
    pub fn heap(len: usize) -> Self {
        let count = len.div_ceil(BASE_ALIGN).max(1);
        let pages = Box::into_raw(vec![AlignedPage([0; BASE_ALIGN]); count].into_boxed_slice());
        let base = pages.cast::<u8>();
        Self { backing: Backing::Heap { pages }, base, len: count * BASE_ALIGN }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd, to pass to a process that does not inherit the mapping.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.backing {
            Backing::Memfd { file, .. } => Some(file.as_fd()),
            Backing::Heap { .. } => None,
        }
    }

    /// Gives the pages of `[offset, offset + len)` back to the kernel (the memory reads as zeros
    /// afterwards). Used for large freed extents so that shared memory shrinks when it is idle.
    pub fn discard(&self, offset: usize, len: usize) -> Result<()> {
        self.check(offset, len, 1)?;
        match &self.backing {
            Backing::Memfd { file, .. } => rustix::fs::fallocate(
                file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                offset as u64,
                len as u64,
            )
            .map_err(EngineError::os("fallocate")),
            Backing::Heap { .. } => Ok(()),
        }
    }

    fn check(&self, offset: usize, len: usize, align: usize) -> Result<()> {
        let end = offset.checked_add(len).ok_or(EngineError::Corrupt("offset overflow"))?;
        if end > self.len {
            return Err(EngineError::Corrupt("access outside the shared region"));
        }
        if offset % align != 0 {
            return Err(EngineError::Corrupt("misaligned shared access"));
        }
        Ok(())
    }

    /// The `AtomicU64` at `offset`. Panics if it is out of bounds or misaligned: offsets come from
    /// layouts computed at creation, so a bad one is a bug, not an input error.
    pub fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8, 8).expect("atomic_u64 offset");
        // SAFETY: in bounds and 8-aligned (checked above); the mapping lives as long as `&self`;
        // every bit pattern is a valid AtomicU64, and concurrent access through atomics is the
        // intended use of shared memory.
        unsafe { &*self.base.add(offset).cast::<AtomicU64>() }
    }

    /// The `AtomicU32` at `offset`; see [`Self::atomic_u64`].
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        self.check(offset, 4, 4).expect("atomic_u32 offset");
        // SAFETY: as in `atomic_u64`, for a 4-byte, 4-aligned location.
        unsafe { &*self.base.add(offset).cast::<AtomicU32>() }
    }

    /// A run of `count` consecutive `AtomicU32` starting at `offset`.
    pub fn atomic_u32_slice(&self, offset: usize, count: usize) -> &[AtomicU32] {
        self.check(offset, count * 4, 4).expect("atomic_u32_slice offset");
        // SAFETY: in bounds and aligned (checked above); AtomicU32 has the layout of u32, any bit
        // pattern is valid, and the slice borrows `&self` so the mapping outlives it.
        unsafe { std::slice::from_raw_parts(self.base.add(offset).cast::<AtomicU32>(), count) }
    }

    /// A run of `count` consecutive `AtomicU64` starting at `offset`.
    pub fn atomic_u64_slice(&self, offset: usize, count: usize) -> &[AtomicU64] {
        self.check(offset, count * 8, 8).expect("atomic_u64_slice offset");
        // SAFETY: in bounds and 8-aligned (checked above); AtomicU64 has the layout of u64, any
        // bit pattern is valid, and the slice borrows `&self` so the mapping outlives it.
        unsafe { std::slice::from_raw_parts(self.base.add(offset).cast::<AtomicU64>(), count) }
    }

    /// Copies `src` into the region at `offset`.
    ///
    /// The caller's protocol must guarantee that no other process reads or writes these bytes
    /// until they are published (ring tail, extent hand-over).
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check(offset, src.len(), 1)?;
        // SAFETY: destination is in bounds (checked); `src` is ordinary memory that cannot
        // overlap the mapping's unpublished bytes; the protocol gives this process exclusive
        // access to the destination until it publishes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(offset), src.len()) };
        Ok(())
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check(offset, dst.len(), 1)?;
        // SAFETY: source in bounds (checked); the protocol guarantees the bytes were published
        // with release ordering and are not rewritten until this process releases them.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies within the region (for example a payload from one ring to another).
    pub fn copy_within(&self, from: usize, to: usize, len: usize) -> Result<()> {
        self.check(from, len, 1)?;
        self.check(to, len, 1)?;
        // SAFETY: both ranges in bounds (checked); `copy` tolerates overlap; the protocol gives
        // this process read access to the source and exclusive access to the destination.
        unsafe { std::ptr::copy(self.base.add(from), self.base.add(to), len) };
        Ok(())
    }

    /// Reads a little-endian u64 that the protocol has published to this process.
    pub fn read_u64(&self, offset: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The address of `[offset, offset + len)`, for zero-copy views handed to a language runtime
    /// (a Python buffer). Returns an error when out of bounds; the caller owns the obligation to
    /// keep the region alive and the bytes published while the view exists.
    pub fn span_ptr(&self, offset: usize, len: usize) -> Result<*mut u8> {
        self.check(offset, len, 1)?;
        // SAFETY: in bounds (checked), so the offset pointer stays inside the allocation.
        Ok(unsafe { self.base.add(offset) })
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        if let Backing::Heap { pages } = self.backing {
            // SAFETY: `pages` came from `Box::into_raw` in `heap` and is freed only here, once;
            // no accessor outlives `&self`, so nothing uses `base` afterwards.
            drop(unsafe { Box::from_raw(pages) });
        }
    }
}

impl std::fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backing {
            Backing::Memfd { .. } => "memfd",
            Backing::Heap { .. } => "heap",
        };
        f.debug_struct("SharedRegion").field("kind", &kind).field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn heap_region_roundtrip() {
        let r = SharedRegion::heap(10_000);
        assert_eq!(r.len() % 4096, 0);
        r.write(100, b"hello").unwrap();
        let mut out = [0u8; 5];
        r.read(100, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        r.atomic_u64(64).store(7, Ordering::Relaxed);
        assert_eq!(r.atomic_u64(64).load(Ordering::Relaxed), 7);
        assert!(r.write(r.len() - 2, b"abc").is_err());
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot create a memfd")]
    fn memfd_region_is_shared_between_mappings() {
        let a = SharedRegion::create("aqueduct-test", 1 << 20).unwrap();
        let fd = a.fd().unwrap().try_clone_to_owned().unwrap();
        let b = SharedRegion::attach(fd).unwrap();
        a.atomic_u32(8).store(42, Ordering::Release);
        assert_eq!(b.atomic_u32(8).load(Ordering::Acquire), 42);
        a.write(4096, &[1, 2, 3]).unwrap();
        let mut out = [0u8; 3];
        b.read(4096, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3]);
        a.discard(0, 1 << 16).unwrap();
        assert_eq!(b.atomic_u32(8).load(Ordering::Acquire), 0, "punched pages read as zeros");
    }
}
