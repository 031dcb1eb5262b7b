//! The shared-memory pool: pages for payloads that move between processes as descriptors.
//!
//! One pool serves every flow of a main process and all their workers. It lives in its own memfd
//! region, so the kernel frees it when the last process holding it is gone (no name to unlink,
//! nothing a SIGKILL can leak).
//!
//! # Layout
//!
//! | field | type | meaning |
//! |---|---|---|
//! | header | `magic u32, version u32, page_size u32, npages u32, nprocs u32`; `warm_bytes u64` at 64, `warm_budget u64` at 72; at 128 the bitmap of process indices in use (`AtomicU32` words) | |
//! | `owner[npages]` | `AtomicU32` | [`FREE`], [`PUNCHED`] (free and given back to the kernel), or the label (process index + 1) of the allocating process |
//! | `len[npages]` | `AtomicU32` | at an extent's first page: its length in pages |
//! | `head[npages]` | `AtomicU32` | for every page of an extent: the index of its first page |
//! | `refs[npages]` | `AtomicU32` | at an extent's first page: references to it, in all processes |
//! | `holds[nprocs][npages]` | `AtomicU32` | at an extent's first page: the references held by each process |
//! | data | `npages * page_size` bytes | 4096-aligned |
//!
//! # References
//! Every reference is counted twice: in `refs` (what decides when to free) and in the holding
//! process's row of `holds` (what lets the supervisor undo a dead process's references). A
//! process changes only its own row, except that the hub *adopts* a reference from a worker's
//! message (one less for the worker, one more for the hub) and *reaps* the row of a dead worker
//! (subtracting it from `refs`). Counts are updated in the order that can only leak on a crash
//! in between, never free early: `holds` before `refs` when taking, `refs` before `holds` when
//! dropping.
//!
//! # Allocation
//! Lock-free first-fit: scan `owner` for a run of free pages and claim each with a CAS from
//! free to the caller's label; on a lost race, un-claim and scan on. First-fit keeps reusing
//! the same low pages, which are already faulted in: copying 16 MiB into warm pages takes
//! 0.5 ms here, into fresh ones 13 ms. Freed extents stay resident while the pool's warm bytes
//! are under its budget; beyond it their pages go back to the kernel (`fallocate` punch-hole),
//! so shared memory shrinks when it is idle.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::region::SharedRegion;
use crate::error::{EngineError, Result};

const MAGIC: u32 = 0x4151_5052; // "AQPR"
const VERSION: u32 = 3;
const HEADER: usize = 4096;
/// A free page whose memory is resident.
pub const FREE: u32 = 0;
/// A free page whose memory was given back to the kernel.
pub const PUNCHED: u32 = u32::MAX;

const OFF_PAGE_SIZE: usize = 8;
const OFF_NPAGES: usize = 12;
const OFF_NPROCS: usize = 16;
const OFF_WARM: usize = 64;
const OFF_WARM_BUDGET: usize = 72;
/// The bitmap of process indices in use. It is in shared memory, not in the creating process,
/// because any process of the tree may hand out indices: the process that forked the workers
/// and a flow server forked from it later both do.
const OFF_INDEX_BITMAP: usize = 128;
/// The most processes the header's bitmap can track.
pub const MAX_NPROCS: usize = (HEADER - OFF_INDEX_BITMAP) * 8;

/// Where the pool's tables and data are in its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaLayout {
    pub page_size: usize,
    pub npages: usize,
    pub nprocs: usize,
}

impl ArenaLayout {
    /// A pool of `bytes` of payload in pages of `page_size` (a power of two, at least 4096),
    /// shared by at most `nprocs` processes.
    pub fn new(bytes: usize, page_size: usize, nprocs: usize) -> Self {
        assert!(page_size.is_power_of_two() && page_size >= 4096, "page_size must be a power of two >= 4096");
        assert!((1..=MAX_NPROCS).contains(&nprocs), "nprocs must be in 1..={MAX_NPROCS}");
        Self { page_size, npages: bytes.div_ceil(page_size).max(1), nprocs }
    }

    fn owner_off(&self) -> usize {
        HEADER
    }
    fn len_off(&self) -> usize {
        self.owner_off() + 4 * self.npages
    }
    fn head_off(&self) -> usize {
        self.len_off() + 4 * self.npages
    }
    fn refs_off(&self) -> usize {
        self.head_off() + 4 * self.npages
    }
    fn holds_off(&self, process: usize) -> usize {
        self.refs_off() + 4 * self.npages * (1 + process)
    }
    /// Offset of the first data byte in the region.
    pub fn data_off(&self) -> usize {
        self.holds_off(self.nprocs).div_ceil(4096) * 4096
    }
    pub fn total_bytes(&self) -> usize {
        self.data_off() + self.npages * self.page_size
    }
    pub fn capacity_bytes(&self) -> usize {
        self.npages * self.page_size
    }
}

/// A run of pages: what moves between processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub head: u32,
    pub pages: u32,
    /// Payload bytes used, at most `pages * page_size`.
    pub len: u64,
}

/// A byte range inside an extent (an out-of-band buffer of a pickled task).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufRef {
    /// The extent's first page and length in pages.
    pub head: u32,
    pub pages: u32,
    /// The range, in bytes from the extent's start.
    pub offset: u64,
    pub len: u64,
}

impl BufRef {
    pub const WIRE_LEN: usize = 24;

    pub fn whole(extent: Extent) -> Self {
        Self { head: extent.head, pages: extent.pages, offset: 0, len: extent.len }
    }

    /// The extent the range lies in (its references are counted per extent).
    pub fn extent(&self) -> Extent {
        Extent { head: self.head, pages: self.pages, len: self.offset + self.len }
    }

    pub fn encode(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[0..4].copy_from_slice(&self.head.to_le_bytes());
        b[4..8].copy_from_slice(&self.pages.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes a descriptor; its bounds are checked by [`Arena::check_buf`] before use.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < Self::WIRE_LEN {
            return Err(EngineError::Protocol("short buffer descriptor"));
        }
        let head = u32::from_le_bytes(b[0..4].try_into().unwrap());
        let pages = u32::from_le_bytes(b[4..8].try_into().unwrap());
        let offset = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let len = u64::from_le_bytes(b[16..24].try_into().unwrap());
        Ok(Self { head, pages, offset, len })
    }
}

/// One process's handle on the pool, acting as process `me` (0 is the main process).
pub struct Arena {
    region: Arc<SharedRegion>,
    layout: ArenaLayout,
    me: u32,
}

impl Arena {
    /// Creates a pool region and returns the main process's handle on it (process 0).
    /// `warm_budget` is how many bytes of freed pages stay resident for reuse.
    pub fn create(layout: ArenaLayout, warm_budget: u64) -> Result<Self> {
        let region = Arc::new(SharedRegion::create("aqueduct-pool", layout.total_bytes())?);
        Self::init(region, layout, warm_budget)
    }

    /// A pool over heap memory, for tests that run under Miri.
    pub fn create_in_heap(layout: ArenaLayout, warm_budget: u64) -> Result<Self> {
        Self::init(Arc::new(SharedRegion::heap(layout.total_bytes())), layout, warm_budget)
    }

    fn init(region: Arc<SharedRegion>, layout: ArenaLayout, warm_budget: u64) -> Result<Self> {
        region.atomic_u32(0).store(MAGIC, Ordering::Relaxed);
        region.atomic_u32(4).store(VERSION, Ordering::Relaxed);
        region.atomic_u32(OFF_PAGE_SIZE).store(layout.page_size as u32, Ordering::Relaxed);
        region.atomic_u32(OFF_NPAGES).store(layout.npages as u32, Ordering::Relaxed);
        region.atomic_u32(OFF_NPROCS).store(layout.nprocs as u32, Ordering::Relaxed);
        region.atomic_u64(OFF_WARM).store(0, Ordering::Relaxed);
        region.atomic_u64(OFF_WARM_BUDGET).store(warm_budget, Ordering::Relaxed);
        // Fresh pages have never been touched: they count as given back to the kernel.
        for page in region.atomic_u32_slice(layout.owner_off(), layout.npages) {
            page.store(PUNCHED, Ordering::Relaxed);
        }
        for word in region.atomic_u32_slice(OFF_INDEX_BITMAP, layout.nprocs.div_ceil(32)) {
            word.store(0, Ordering::Relaxed);
        }
        // Process 0 is the creator.
        region.atomic_u32(OFF_INDEX_BITMAP).store(1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        Ok(Self { region, layout, me: 0 })
    }

    /// Attaches to a pool created by the main process, as process `me`.
    pub fn attach(region: Arc<SharedRegion>, me: u32) -> Result<Self> {
        let u32_at = |off: usize| region.atomic_u32(off).load(Ordering::Acquire) as usize;
        if region.len() < HEADER || u32_at(0) != MAGIC as usize || u32_at(4) != VERSION as usize {
            return Err(EngineError::Corrupt("not an aqueduct shared-memory pool, or another version"));
        }
        let layout =
            ArenaLayout::new(u32_at(OFF_NPAGES) * u32_at(OFF_PAGE_SIZE), u32_at(OFF_PAGE_SIZE), u32_at(OFF_NPROCS));
        if region.len() < layout.total_bytes() || me as usize >= layout.nprocs {
            return Err(EngineError::Corrupt("pool region smaller than its layout, or process index out of range"));
        }
        Ok(Self { region, layout, me })
    }

    /// Another handle on the same pool acting as process `me` (tests play several processes).
    pub fn as_process(&self, me: u32) -> Self {
        assert!((me as usize) < self.layout.nprocs);
        Self { region: self.region.clone(), layout: self.layout, me }
    }

    pub fn layout(&self) -> ArenaLayout {
        self.layout
    }
    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }
    pub fn me(&self) -> u32 {
        self.me
    }
    pub fn page_size(&self) -> usize {
        self.layout.page_size
    }

    fn index_bitmap(&self) -> &[AtomicU32] {
        self.region.atomic_u32_slice(OFF_INDEX_BITMAP, self.layout.nprocs.div_ceil(32))
    }

    /// Reserves a process index for a new process of the tree (a worker, a client of a flow
    /// server); `None` when all are taken.
    pub fn reserve_index(&self) -> Option<u32> {
        let nprocs = self.layout.nprocs;
        for (w, word) in self.index_bitmap().iter().enumerate() {
            let mut current = word.load(Ordering::Acquire);
            loop {
                let bit = (!current).trailing_zeros() as usize;
                if bit >= 32 || w * 32 + bit >= nprocs {
                    break;
                }
                match word.compare_exchange_weak(current, current | (1 << bit), Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Some((w * 32 + bit) as u32),
                    Err(now) => current = now,
                }
            }
        }
        None
    }

    /// Returns a process index once its process is reaped (index 0, the creator's, stays).
    pub fn release_index(&self, index: u32) {
        let index = index as usize;
        if index == 0 || index >= self.layout.nprocs {
            return;
        }
        self.index_bitmap()[index / 32].fetch_and(!(1 << (index % 32)), Ordering::AcqRel);
    }

    fn table(&self, off: usize) -> &[AtomicU32] {
        self.region.atomic_u32_slice(off, self.layout.npages)
    }
    fn owner(&self) -> &[AtomicU32] {
        self.table(self.layout.owner_off())
    }
    fn len_table(&self) -> &[AtomicU32] {
        self.table(self.layout.len_off())
    }
    fn head_table(&self) -> &[AtomicU32] {
        self.table(self.layout.head_off())
    }
    fn refs(&self) -> &[AtomicU32] {
        self.table(self.layout.refs_off())
    }
    fn holds(&self, process: u32) -> &[AtomicU32] {
        self.table(self.layout.holds_off(process as usize))
    }
    fn warm(&self) -> &AtomicU64 {
        self.region.atomic_u64(OFF_WARM)
    }

    fn label(&self) -> u32 {
        self.me + 1
    }

    /// Allocates an extent of `len` bytes holding one reference for this process, or `None`
    /// when no run of free pages is large enough.
    pub fn alloc(&self, len: usize) -> Option<Extent> {
        let npages = self.layout.npages;
        let need = len.max(1).div_ceil(self.layout.page_size);
        if need > npages {
            return None;
        }
        let owner = self.owner();
        let label = self.label();
        let is_free = |v: u32| v == FREE || v == PUNCHED;
        let mut start = 0;
        while start + need <= npages {
            if let Some(busy) = (start..start + need).rev().find(|&i| !is_free(owner[i].load(Ordering::Relaxed))) {
                start = busy + 1;
                continue;
            }
            let mut claimed = Vec::with_capacity(need);
            for page in &owner[start..start + need] {
                let current = page.load(Ordering::Relaxed);
                if !is_free(current)
                    || page.compare_exchange(current, label, Ordering::Acquire, Ordering::Relaxed).is_err()
                {
                    break;
                }
                claimed.push(current);
            }
            if claimed.len() < need {
                let lost = start + claimed.len();
                for (page, was) in owner[start..lost].iter().zip(&claimed) {
                    page.store(*was, Ordering::Release);
                }
                start = lost + 1;
                continue;
            }
            let warm_pages = claimed.iter().filter(|&&was| was == FREE).count();
            if warm_pages > 0 {
                let bytes = (warm_pages * self.layout.page_size) as u64;
                let _ =
                    self.warm().fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| Some(w.saturating_sub(bytes)));
            }
            let heads = self.head_table();
            for page in &heads[start..start + need] {
                page.store(start as u32, Ordering::Relaxed);
            }
            self.len_table()[start].store(need as u32, Ordering::Relaxed);
            // holds before refs: a crash in between can only leak.
            self.holds(self.me)[start].store(1, Ordering::Release);
            self.refs()[start].store(1, Ordering::Release);
            return Some(Extent { head: start as u32, pages: need as u32, len: len as u64 });
        }
        None
    }

    fn check(&self, ext: &Extent) -> Result<()> {
        let end = ext.head as usize + ext.pages as usize;
        if ext.pages == 0 || end > self.layout.npages || ext.len > ext.pages as u64 * self.layout.page_size as u64 {
            return Err(EngineError::Corrupt("extent descriptor outside the pool"));
        }
        Ok(())
    }

    /// Checks that a buffer descriptor lies inside the pool.
    pub fn check_buf(&self, buf: &BufRef) -> Result<()> {
        let end = buf.offset.checked_add(buf.len).ok_or(EngineError::Corrupt("buffer descriptor overflows"))?;
        self.check(&Extent { head: buf.head, pages: buf.pages, len: end })?;
        if end > buf.pages as u64 * self.layout.page_size as u64 {
            return Err(EngineError::Corrupt("buffer descriptor outside its extent"));
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

    /// Address and length of a buffer, for a zero-copy view (see `SharedRegion::span_ptr`).
    pub fn buf_ptr(&self, buf: &BufRef) -> Result<*mut u8> {
        self.check_buf(buf)?;
        self.region.span_ptr(self.offset_of(&buf.extent())? + buf.offset as usize, buf.len as usize)
    }

    /// Takes one more reference for this process.
    pub fn hold(&self, ext: &Extent) -> Result<()> {
        self.check(ext)?;
        let head = ext.head as usize;
        self.holds(self.me)[head].fetch_add(1, Ordering::AcqRel);
        self.refs()[head].fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Drops one of this process's references; frees the extent when it was the last one
    /// anywhere. Returns whether it freed.
    pub fn unhold(&self, ext: &Extent) -> Result<bool> {
        self.check(ext)?;
        let head = ext.head as usize;
        let prev = self.refs()[head].fetch_sub(1, Ordering::AcqRel);
        let _ =
            self.holds(self.me)[head].fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| Some(h.saturating_sub(1)));
        match prev {
            0 => Err(EngineError::Corrupt("extent released more often than held")),
            1 => {
                self.free(head);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Moves one reference from process `from` to this process (the hub taking over a
    /// worker's message). The total does not change.
    pub fn adopt(&self, ext: &Extent, from: u32) -> Result<()> {
        self.check(ext)?;
        let head = ext.head as usize;
        self.holds(self.me)[head].fetch_add(1, Ordering::AcqRel);
        let _ = self.holds(from)[head].fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| Some(h.saturating_sub(1)));
        Ok(())
    }

    /// Moves one of this process's references to process `to` (the engine handing a result
    /// to a port's client: if the client dies before taking it, reaping its row frees it).
    pub fn transfer(&self, ext: &Extent, to: u32) -> Result<()> {
        self.check(ext)?;
        if to as usize >= self.layout.nprocs {
            return Err(EngineError::Corrupt("process index out of range"));
        }
        let head = ext.head as usize;
        self.holds(to)[head].fetch_add(1, Ordering::AcqRel);
        let _ =
            self.holds(self.me)[head].fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| Some(h.saturating_sub(1)));
        Ok(())
    }

    fn free(&self, head: usize) {
        let pages = (self.len_table()[head].swap(0, Ordering::AcqRel) as usize).max(1);
        let pages = pages.min(self.layout.npages - head);
        let bytes = (pages * self.layout.page_size) as u64;
        let budget = self.region.atomic_u64(OFF_WARM_BUDGET).load(Ordering::Relaxed);
        let keep_warm = self
            .warm()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w + bytes <= budget).then_some(w + bytes))
            .is_ok();
        let state = if keep_warm {
            FREE
        } else {
            let off = self.layout.data_off() + head * self.layout.page_size;
            if self.region.discard(off, pages * self.layout.page_size).is_ok() {
                PUNCHED
            } else {
                FREE
            }
        };
        for page in &self.owner()[head..head + pages] {
            page.store(state, Ordering::Release);
        }
    }

    /// Undoes every reference of the dead process `process` and frees what no one else holds,
    /// including pages it had claimed but not finished allocating. Only valid once the process
    /// is dead and its published messages have been adopted. Returns the pages freed.
    pub fn reap(&self, process: u32) -> usize {
        let before = self.used_pages();
        let holds = self.holds(process);
        let refs = self.refs();
        for head in 0..self.layout.npages {
            let h = holds[head].swap(0, Ordering::AcqRel);
            if h == 0 {
                continue;
            }
            let prev =
                refs[head].fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| Some(r.saturating_sub(h))).unwrap();
            if prev <= h && self.len_table()[head].load(Ordering::Acquire) != 0 {
                self.free(head);
            }
        }
        let label = process + 1;
        for (i, page) in self.owner().iter().enumerate() {
            if page.load(Ordering::Acquire) == label {
                let head = self.head_table()[i].load(Ordering::Acquire) as usize;
                let unfinished = head >= self.layout.npages || refs[head].load(Ordering::Acquire) == 0;
                if unfinished {
                    page.store(FREE, Ordering::Release);
                }
            }
        }
        before.saturating_sub(self.used_pages())
    }

    /// The extent containing `[addr, addr + len)` if that range lies in this pool's data, with
    /// the range's offset in the extent: how a buffer already in shared memory is recognised
    /// and sent as a descriptor instead of being copied.
    pub fn locate(&self, addr: usize, len: usize) -> Option<BufRef> {
        let base = self.region.span_ptr(self.layout.data_off(), 0).ok()? as usize;
        let end = base + self.layout.capacity_bytes();
        if addr < base || addr.checked_add(len)? > end {
            return None;
        }
        let page = (addr - base) / self.layout.page_size;
        let owner = self.owner()[page].load(Ordering::Acquire);
        if owner == FREE || owner == PUNCHED {
            return None;
        }
        let head = self.head_table()[page].load(Ordering::Acquire) as usize;
        let pages = self.len_table()[head].load(Ordering::Acquire) as usize;
        let ext_start = base + head * self.layout.page_size;
        let ext_end = ext_start + pages * self.layout.page_size;
        if pages == 0 || addr + len > ext_end {
            return None;
        }
        Some(BufRef { head: head as u32, pages: pages as u32, offset: (addr - ext_start) as u64, len: len as u64 })
    }

    /// Pages currently allocated.
    pub fn used_pages(&self) -> usize {
        self.owner().iter().filter(|p| !matches!(p.load(Ordering::Relaxed), FREE | PUNCHED)).count()
    }

    /// Bytes of freed pages kept resident for reuse.
    pub fn warm_bytes(&self) -> u64 {
        self.warm().load(Ordering::Relaxed)
    }

    /// References process `process` holds on the extent starting at `head` (for tests).
    pub fn holds_of(&self, process: u32, head: u32) -> u32 {
        self.holds(process)[head as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena(pages: usize, warm: u64) -> Arena {
        Arena::create_in_heap(ArenaLayout::new(pages * 4096, 4096, 4), warm).unwrap()
    }

    #[test]
    fn alloc_write_read_release() {
        let a = arena(8, u64::MAX);
        let e = a.alloc(5000).unwrap();
        assert_eq!(e.pages, 2);
        a.write(&e, 4000, &[9; 1000]).unwrap();
        let mut out = [0u8; 1000];
        a.read(&e, 4000, &mut out).unwrap();
        assert_eq!(out, [9; 1000]);
        assert!(a.write(&e, 4500, &[0; 1000]).is_err(), "bounded by the extent length");
        assert_eq!(a.used_pages(), 2);
        a.hold(&e).unwrap();
        assert!(!a.unhold(&e).unwrap());
        assert!(a.unhold(&e).unwrap());
        assert_eq!(a.used_pages(), 0);
        assert!(a.unhold(&e).is_err(), "double free is detected");
    }

    #[test]
    fn process_indices_are_shared_by_every_handle() {
        let a = Arena::create_in_heap(ArenaLayout::new(4096, 4096, 40), 0).unwrap();
        // Another process of the tree (here: another handle) sees the same reservations.
        let b = a.as_process(3);
        let mut got: Vec<u32> =
            (0..39).map(|i| if i % 2 == 0 { a.reserve_index() } else { b.reserve_index() }.unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, (1..40).collect::<Vec<_>>(), "each index once, 0 kept by the creator");
        assert_eq!(a.reserve_index(), None);
        b.release_index(33);
        b.release_index(0);
        assert_eq!(a.reserve_index(), Some(33));
        assert_eq!(a.reserve_index(), None, "index 0 is never released");
    }

    #[test]
    fn exhaustion_returns_none_and_frees_make_room() {
        let a = arena(4, u64::MAX);
        let x = a.alloc(3 * 4096).unwrap();
        assert!(a.alloc(2 * 4096).is_none());
        let y = a.alloc(4096).unwrap();
        a.unhold(&x).unwrap();
        let z = a.alloc(2 * 4096).unwrap();
        assert_ne!(z.head, y.head);
        assert!(a.alloc(5 * 4096).is_none(), "larger than the pool");
    }

    #[test]
    fn references_from_several_processes_and_reaping_a_dead_one() {
        let main = arena(8, u64::MAX);
        let worker = main.as_process(1);
        let e = worker.alloc(4096).unwrap(); // the worker's reference, for its message
        main.adopt(&e, 1).unwrap(); // the hub takes the message over
        assert_eq!((main.holds_of(0, e.head), main.holds_of(1, e.head)), (1, 0));
        worker.hold(&e).unwrap(); // the worker keeps a view too, then dies
        let lost = worker.alloc(2 * 4096).unwrap(); // and an allocation it never sent
        assert_eq!(main.reap(1), 2, "the dead worker's own allocation is freed");
        assert_eq!(main.used_pages(), 1, "the adopted extent survives");
        assert!(main.unhold(&e).unwrap(), "the hub's was the last reference");
        let _ = lost;
        assert_eq!(main.used_pages(), 0);
    }

    #[test]
    fn locate_finds_buffers_inside_extents() {
        let a = arena(8, u64::MAX);
        let e = a.alloc(3 * 4096).unwrap();
        let base = a.buf_ptr(&BufRef::whole(e)).unwrap() as usize;
        let found = a.locate(base + 5000, 100).unwrap();
        assert_eq!((found.head, found.offset, found.len), (e.head, 5000, 100));
        assert!(a.locate(base + 3 * 4096 - 10, 100).is_none(), "crosses the end of the extent");
        let mut outside = [0u8; 16];
        assert!(a.locate(outside.as_mut_ptr() as usize, 16).is_none());
        let wire = BufRef::decode(&found.encode()).unwrap();
        assert_eq!(wire, found);
    }

    #[test]
    fn freed_pages_stay_warm_up_to_the_budget() {
        let a = arena(8, 2 * 4096);
        let x = a.alloc(2 * 4096).unwrap();
        let y = a.alloc(2 * 4096).unwrap();
        a.unhold(&x).unwrap();
        assert_eq!(a.warm_bytes(), 2 * 4096);
        a.unhold(&y).unwrap();
        assert_eq!(a.warm_bytes(), 2 * 4096, "over budget: given back to the kernel");
        let z = a.alloc(2 * 4096).unwrap();
        assert_eq!(z.head, x.head, "first fit reuses the warm pages");
        assert_eq!(a.warm_bytes(), 0);
    }

    #[test]
    fn concurrent_allocators_never_share_a_page() {
        let main = Arena::create_in_heap(ArenaLayout::new(64 * 4096, 4096, 4), u64::MAX).unwrap();
        let rounds = if cfg!(miri) { 20 } else { 2000 };
        let threads: Vec<_> = (1..=3u32)
            .map(|p| {
                let a = main.as_process(p);
                std::thread::spawn(move || {
                    for i in 0..rounds {
                        if let Some(e) = a.alloc((i % 5 + 1) * 4096) {
                            let stamp = [p as u8; 64];
                            for page in 0..e.pages as usize {
                                a.write(&e, page * 4096, &stamp).unwrap();
                            }
                            for page in 0..e.pages as usize {
                                let mut got = [0u8; 64];
                                a.read(&e, page * 4096, &mut got).unwrap();
                                assert_eq!(got, stamp, "another allocator wrote into this extent");
                            }
                            a.unhold(&e).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(main.used_pages(), 0);
    }
}
