//! The page arena: shared memory for payloads too large to copy through a ring.
//!
//! # Layout
//! At a 4096-aligned offset of the flow's region:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | header | `magic u32, version u32, page_size u32, npages u32` | written once |
//! | `owner[npages]` | `AtomicU32` | 0 = free, otherwise the label of the process that must free the page |
//! | `pages[npages]` | `AtomicU32` | at an extent's first page: its length in pages |
//! | `refs[npages]` | `AtomicU32` | at an extent's first page: live references to it |
//! | data | `npages * page_size` bytes | 4096-aligned |
//!
//! # Allocation
//! Any process of the flow allocates, lock-free: it scans `owner` from the start (first-fit)
//! for a run of free pages and claims each page with a CAS from 0 to its own label. First-fit
//! keeps reusing the same low pages, which are already faulted in and warm in cache; a
//! next-fit cursor would walk the whole arena and fault in fresh pages on every lap.
//! If a CAS loses a race it un-claims what it took and scans on. Every claimed page carries the
//! label, so a process killed halfway through a claim leaves pages the supervisor can find and
//! free ([`Arena::reclaim_owner`]).
//!
//! # Lifetime
//! An extent starts with one reference. Whoever takes a copy of the descriptor that outlives the
//! sender's (a message forwarded to another step, a zero-copy view) calls `retain`; `release`
//! frees the pages when the count reaches zero. The label records who is responsible for the
//! extent right now: the allocating worker until the hub has taken its message, the hub after.
//! When a worker dies, everything still labelled with it is garbage by construction.
//!
//! Frees store 0 with `Release` after the freeing process is done with the bytes; claims use an
//! `Acquire` CAS, so the next owner never sees stale accesses.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::region::SharedRegion;
use crate::error::{EngineError, Result};

const MAGIC: u32 = 0x4151_4152; // "AQAR"
const VERSION: u32 = 1;
const HEADER: usize = 64;
pub const FREE: u32 = 0;

/// Where an arena lives inside a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaLayout {
    pub offset: usize,
    pub page_size: usize,
    pub npages: usize,
}

impl ArenaLayout {
    /// An arena able to hold `bytes` of payload in pages of `page_size` (a power of two, at
    /// least 4096).
    pub fn new(offset: usize, bytes: usize, page_size: usize) -> Self {
        assert!(offset % 4096 == 0, "arena offset must be page-aligned");
        assert!(page_size.is_power_of_two() && page_size >= 4096, "page_size must be a power of two >= 4096");
        Self { offset, page_size, npages: bytes.div_ceil(page_size) }
    }

    fn owner_off(&self) -> usize {
        self.offset + HEADER
    }
    fn pages_off(&self) -> usize {
        self.owner_off() + 4 * self.npages
    }
    fn refs_off(&self) -> usize {
        self.pages_off() + 4 * self.npages
    }
    /// Offset of the first data byte in the region.
    pub fn data_off(&self) -> usize {
        (self.refs_off() + 4 * self.npages).div_ceil(4096) * 4096
    }
    pub fn total_bytes(&self) -> usize {
        self.data_off() + self.npages * self.page_size - self.offset
    }
    pub fn capacity_bytes(&self) -> usize {
        self.npages * self.page_size
    }

    pub fn init(&self, region: &SharedRegion) {
        region.atomic_u32(self.offset).store(MAGIC, Ordering::Relaxed);
        region.atomic_u32(self.offset + 4).store(VERSION, Ordering::Relaxed);
        region.atomic_u32(self.offset + 8).store(self.page_size as u32, Ordering::Relaxed);
        region.atomic_u32(self.offset + 12).store(self.npages as u32, Ordering::Relaxed);
        // A fresh memfd is zero-filled, which is the all-free state; clear anyway for reuse.
        for slice in [self.owner_off(), self.pages_off(), self.refs_off()] {
            for a in region.atomic_u32_slice(slice, self.npages) {
                a.store(0, Ordering::Relaxed);
            }
        }
        std::sync::atomic::fence(Ordering::Release);
    }

    pub fn validate(&self, region: &SharedRegion) -> Result<()> {
        let ok = region.atomic_u32(self.offset).load(Ordering::Acquire) == MAGIC
            && region.atomic_u32(self.offset + 4).load(Ordering::Acquire) == VERSION
            && region.atomic_u32(self.offset + 8).load(Ordering::Acquire) == self.page_size as u32
            && region.atomic_u32(self.offset + 12).load(Ordering::Acquire) == self.npages as u32;
        ok.then_some(()).ok_or(EngineError::Corrupt("arena header does not match its layout"))
    }
}

/// A descriptor of an allocated run of pages; this is what moves between processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub head: u32,
    pub pages: u32,
    /// Payload bytes used, at most `pages * page_size`.
    pub len: u64,
}

/// One process's handle on the arena.
pub struct Arena {
    region: Arc<SharedRegion>,
    layout: ArenaLayout,
}

impl Arena {
    pub fn attach(region: Arc<SharedRegion>, layout: ArenaLayout) -> Result<Self> {
        layout.validate(&region)?;
        Ok(Self { region, layout })
    }

    pub fn layout(&self) -> ArenaLayout {
        self.layout
    }

    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    fn owner(&self) -> &[AtomicU32] {
        self.region.atomic_u32_slice(self.layout.owner_off(), self.layout.npages)
    }
    fn pages(&self) -> &[AtomicU32] {
        self.region.atomic_u32_slice(self.layout.pages_off(), self.layout.npages)
    }
    fn refs(&self) -> &[AtomicU32] {
        self.region.atomic_u32_slice(self.layout.refs_off(), self.layout.npages)
    }

    /// Allocates an extent for `len` bytes labelled `label` (non-zero), or `None` when no run of
    /// free pages is large enough.
    pub fn alloc(&mut self, label: u32, len: usize) -> Option<Extent> {
        assert_ne!(label, FREE);
        let npages = self.layout.npages;
        let need = len.max(1).div_ceil(self.layout.page_size);
        if need > npages {
            return None;
        }
        let owner = self.region.atomic_u32_slice(self.layout.owner_off(), npages);
        let mut start = 0;
        let mut scanned = 0usize;
        // Each iteration either returns or advances `start` past at least one page, so the scan
        // visits every page a bounded number of times.
        while scanned <= npages + need {
            if start + need > npages {
                scanned += npages - start;
                start = 0;
                continue;
            }
            if let Some(busy) = (start..start + need).rev().find(|&i| owner[i].load(Ordering::Relaxed) != FREE) {
                scanned += busy + 1 - start;
                start = busy + 1;
                continue;
            }
            match (start..start + need)
                .find(|&i| owner[i].compare_exchange(FREE, label, Ordering::Acquire, Ordering::Relaxed).is_err())
            {
                None => {
                    self.pages()[start].store(need as u32, Ordering::Relaxed);
                    self.refs()[start].store(1, Ordering::Relaxed);
                    return Some(Extent { head: start as u32, pages: need as u32, len: len as u64 });
                }
                Some(lost) => {
                    for page in &owner[start..lost] {
                        page.store(FREE, Ordering::Release);
                    }
                    scanned += lost + 1 - start;
                    start = lost + 1;
                }
            }
        }
        None
    }

    fn check(&self, ext: &Extent) -> Result<()> {
        let end = ext.head as usize + ext.pages as usize;
        if ext.pages == 0 || end > self.layout.npages || ext.len > ext.pages as u64 * self.layout.page_size as u64 {
            return Err(EngineError::Corrupt("extent descriptor outside the arena"));
        }
        Ok(())
    }

    /// Region offset of the extent's first byte.
    pub fn offset_of(&self, ext: &Extent) -> Result<usize> {
        self.check(ext)?;
        Ok(self.layout.data_off() + ext.head as usize * self.layout.page_size)
    }

    pub fn write(&self, ext: &Extent, at: usize, bytes: &[u8]) -> Result<()> {
        if at + bytes.len() > ext.len as usize {
            return Err(EngineError::Corrupt("write past the end of an extent"));
        }
        self.region.write(self.offset_of(ext)? + at, bytes)
    }

    pub fn read(&self, ext: &Extent, at: usize, dst: &mut [u8]) -> Result<()> {
        if at + dst.len() > ext.len as usize {
            return Err(EngineError::Corrupt("read past the end of an extent"));
        }
        self.region.read(self.offset_of(ext)? + at, dst)
    }

    /// Adds a reference (a second holder of the descriptor).
    pub fn retain(&self, ext: &Extent) -> Result<()> {
        self.check(ext)?;
        self.refs()[ext.head as usize].fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Drops a reference; frees the pages when it was the last one. Returns whether it freed.
    pub fn release(&self, ext: &Extent) -> Result<bool> {
        self.check(ext)?;
        let prev = self.refs()[ext.head as usize].fetch_sub(1, Ordering::AcqRel);
        if prev == 0 {
            return Err(EngineError::Corrupt("extent released more often than retained"));
        }
        if prev == 1 {
            self.free(ext.head as usize, ext.pages as usize);
            return Ok(true);
        }
        Ok(false)
    }

    fn free(&self, head: usize, pages: usize) {
        self.pages()[head].store(0, Ordering::Relaxed);
        for page in &self.owner()[head..head + pages] {
            page.store(FREE, Ordering::Release);
        }
    }

    /// Moves responsibility for the extent to `label` (the hub takes over a worker's message).
    pub fn relabel(&self, ext: &Extent, label: u32) -> Result<()> {
        self.check(ext)?;
        for page in &self.owner()[ext.head as usize..(ext.head + ext.pages) as usize] {
            page.store(label, Ordering::Release);
        }
        Ok(())
    }

    /// Frees every page labelled `label`, whatever its reference count. Only valid once the
    /// process behind the label is dead and its published messages have been taken over.
    /// Returns the number of pages freed.
    pub fn reclaim_owner(&self, label: u32) -> usize {
        let mut freed = 0;
        for (i, page) in self.owner().iter().enumerate() {
            if page.load(Ordering::Acquire) == label {
                self.pages()[i].store(0, Ordering::Relaxed);
                self.refs()[i].store(0, Ordering::Relaxed);
                page.store(FREE, Ordering::Release);
                freed += 1;
            }
        }
        freed
    }

    /// Pages currently allocated (a gauge for metrics and leak tests).
    pub fn used_pages(&self) -> usize {
        self.owner().iter().filter(|p| p.load(Ordering::Relaxed) != FREE).count()
    }

    pub fn page_size(&self) -> usize {
        self.layout.page_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena(pages: usize) -> Arena {
        let layout = ArenaLayout::new(0, pages * 4096, 4096);
        let region = Arc::new(SharedRegion::heap(layout.total_bytes()));
        layout.init(&region);
        Arena::attach(region, layout).unwrap()
    }

    #[test]
    fn alloc_write_read_release() {
        let mut a = arena(8);
        let e = a.alloc(1, 5000).unwrap();
        assert_eq!(e.pages, 2);
        a.write(&e, 4000, &[9; 1000]).unwrap();
        let mut out = [0u8; 1000];
        a.read(&e, 4000, &mut out).unwrap();
        assert_eq!(out, [9; 1000]);
        assert!(a.write(&e, 4500, &[0; 1000]).is_err(), "bounded by the extent length");
        assert_eq!(a.used_pages(), 2);
        a.retain(&e).unwrap();
        assert!(!a.release(&e).unwrap());
        assert!(a.release(&e).unwrap());
        assert_eq!(a.used_pages(), 0);
        assert!(a.release(&e).is_err(), "double free is detected");
    }

    #[test]
    fn exhaustion_returns_none_and_frees_make_room() {
        let mut a = arena(4);
        let x = a.alloc(1, 3 * 4096).unwrap();
        assert!(a.alloc(1, 2 * 4096).is_none());
        let y = a.alloc(2, 4096).unwrap();
        a.release(&x).unwrap();
        let z = a.alloc(1, 2 * 4096).unwrap();
        assert_ne!(z.head, y.head);
        assert!(a.alloc(1, 5 * 4096).is_none(), "larger than the arena");
    }

    #[test]
    fn reclaim_frees_only_the_dead_label() {
        let mut a = arena(8);
        let _mine = a.alloc(1, 4096).unwrap();
        let _dead = a.alloc(3, 3 * 4096).unwrap();
        assert_eq!(a.reclaim_owner(3), 3);
        assert_eq!(a.used_pages(), 1);
    }

    #[test]
    fn concurrent_allocators_never_share_a_page() {
        let layout = ArenaLayout::new(0, 64 * 4096, 4096);
        let region = Arc::new(SharedRegion::heap(layout.total_bytes()));
        layout.init(&region);
        let rounds = if cfg!(miri) { 20 } else { 2000 };
        let threads: Vec<_> = (1..=3u32)
            .map(|label| {
                let mut a = Arena::attach(region.clone(), layout).unwrap();
                std::thread::spawn(move || {
                    for i in 0..rounds {
                        if let Some(e) = a.alloc(label, (i % 5 + 1) * 4096) {
                            let stamp = [label as u8; 64];
                            for p in 0..e.pages as usize {
                                a.write(&e, p * 4096, &stamp).unwrap();
                            }
                            for p in 0..e.pages as usize {
                                let mut got = [0u8; 64];
                                a.read(&e, p * 4096, &mut got).unwrap();
                                assert_eq!(got, stamp, "another allocator wrote into this extent");
                            }
                            a.release(&e).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(Arena::attach(region, layout).unwrap().used_pages(), 0);
    }
}
