#![forbid(unsafe_code)]
//! The layout of a flow's shared region: one header, then one slot per worker. (Large payloads
//! live in the process-wide pool, [`crate::shm::arena`], not here.)
//!
//! | offset | content |
//! |---|---|
//! | 0 | flow header: `magic u32, version u32, nslots u32, ring_capacity u32, positions u32` (the largest batch), `spin_us u32` at 28 (`u32::MAX`: adaptive), `metrics_enabled u32` at 32; at 64 the hub's doorbell flag, at 72 when a worker last rang the doorbell (`u64` ns) |
//! | 4096 + i * stride | slot `i`: a 4096-byte slot header (`pid: u32` at 0, the batch gate `u64` at 8, the worker's metrics at 256), the inbound ring (hub to worker), the outbound ring (worker to hub), the stream block (an event, then one [`crate::stream::StreamWord`] per batch position) |
//!
//! A process that attaches to a region it did not create reads the parameters from the header
//! and recomputes the same layout, then checks every magic number.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::{EngineError, Result};
use crate::gate::BatchGate;
use crate::metrics::{WorkerMetrics, WORKER_BLOCK};
use crate::shm::event::{FutexEvent, EVENT_BYTES};
use crate::shm::{RingLayout, SharedRegion};
use crate::stream::StreamWord;

const MAGIC: u32 = 0x4151_464c; // "AQFL"
const VERSION: u32 = 2;
const FLOW_HEADER: usize = 4096;
const SLOT_HEADER: usize = 4096;
const OFF_DOORBELL_WAITING: usize = 64;
const OFF_DOORBELL_RUNG_AT: usize = 72;
const OFF_SPIN_US: usize = 28;
const OFF_METRICS_ENABLED: usize = 32;
const SLOT_METRICS: usize = 256;
const _: () = assert!(SLOT_METRICS + WORKER_BLOCK <= SLOT_HEADER, "worker metrics fit the slot header");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLayout {
    pub nslots: usize,
    pub ring_capacity: usize,
    /// Batch positions per slot in the stream block: the largest batch any step sends.
    pub positions: usize,
    slot_stride: usize,
}

impl FlowLayout {
    pub fn new(nslots: usize, ring_capacity: usize, positions: usize) -> Self {
        let ring = RingLayout::new(0, ring_capacity);
        let positions = positions.max(1);
        let stream = EVENT_BYTES + 8 * positions;
        let slot_stride = (SLOT_HEADER + 2 * ring.total_bytes() + stream).div_ceil(4096) * 4096;
        Self { nslots, ring_capacity: ring.capacity, positions, slot_stride }
    }

    pub fn total_bytes(&self) -> usize {
        FLOW_HEADER + self.nslots * self.slot_stride
    }

    fn slot_off(&self, slot: usize) -> usize {
        assert!(slot < self.nslots, "slot {slot} out of range");
        FLOW_HEADER + slot * self.slot_stride
    }

    /// Hub to worker.
    pub fn inbound(&self, slot: usize) -> RingLayout {
        RingLayout::new(self.slot_off(slot) + SLOT_HEADER, self.ring_capacity)
    }

    /// Worker to hub.
    pub fn outbound(&self, slot: usize) -> RingLayout {
        let inbound = self.inbound(slot);
        RingLayout::new(inbound.offset + inbound.total_bytes(), self.ring_capacity)
    }

    fn stream_block(&self, slot: usize) -> usize {
        let outbound = self.outbound(slot);
        outbound.offset + outbound.total_bytes()
    }

    /// The event a worker parks on while a stream of its batch has no room: the hub notifies it
    /// when a caller consumed a part or went away.
    pub fn stream_event<'a>(&self, region: &'a SharedRegion, slot: usize) -> FutexEvent<'a> {
        let at = self.stream_block(slot);
        FutexEvent::new(region.atomic_u32(at), region.atomic_u32(at + 4), region.atomic_u64(at + 8))
    }

    /// The stream word of batch position `pos` in `slot` (see [`crate::stream`]).
    pub fn stream_word<'a>(&self, region: &'a SharedRegion, slot: usize, pos: usize) -> StreamWord<'a> {
        assert!(pos < self.positions, "batch position {pos} out of range");
        StreamWord::new(region.atomic_u64(self.stream_block(slot) + EVENT_BYTES + 8 * pos))
    }

    /// The worker's pid, written by the hub when it registers the process.
    pub fn slot_pid<'a>(&self, region: &'a SharedRegion, slot: usize) -> &'a AtomicU32 {
        region.atomic_u32(self.slot_off(slot))
    }

    /// The worker's metrics block (see [`crate::metrics::WorkerMetrics`]).
    pub fn slot_metrics<'a>(&self, region: &'a SharedRegion, slot: usize) -> WorkerMetrics<'a> {
        WorkerMetrics::at(region, self.slot_off(slot) + SLOT_METRICS)
    }

    /// Whether processes of this flow record metrics (written once at creation).
    pub fn metrics_enabled<'a>(&self, region: &'a SharedRegion) -> &'a AtomicU32 {
        region.atomic_u32(OFF_METRICS_ENABLED)
    }

    /// The slot's [`BatchGate`]: which batches the worker has begun, and which the hub took back.
    pub fn slot_gate<'a>(&self, region: &'a SharedRegion, slot: usize) -> BatchGate<'a> {
        BatchGate::new(region.atomic_u64(self.slot_off(slot) + 8))
    }

    /// Writes every header of a fresh region.
    pub fn init(&self, region: &SharedRegion) -> Result<()> {
        if region.len() < self.total_bytes() {
            return Err(EngineError::Config("shared region smaller than its layout".into()));
        }
        let u32_at = |off: usize| region.atomic_u32(off);
        u32_at(0).store(MAGIC, Ordering::Relaxed);
        u32_at(4).store(VERSION, Ordering::Relaxed);
        u32_at(8).store(self.nslots as u32, Ordering::Relaxed);
        u32_at(12).store(self.ring_capacity as u32, Ordering::Relaxed);
        u32_at(16).store(self.positions as u32, Ordering::Relaxed);
        for slot in 0..self.nslots {
            self.inbound(slot).init(region);
            self.outbound(slot).init(region);
        }
        std::sync::atomic::fence(Ordering::Release);
        Ok(())
    }

    /// Recomputes the layout of a region created elsewhere and validates it.
    pub fn read(region: &SharedRegion) -> Result<Self> {
        if region.len() < FLOW_HEADER {
            return Err(EngineError::Corrupt("region smaller than a flow header"));
        }
        let u32_at = |off: usize| region.atomic_u32(off).load(Ordering::Acquire) as usize;
        if u32_at(0) != MAGIC as usize || u32_at(4) != VERSION as usize {
            return Err(EngineError::Corrupt("not an aqueduct flow region, or another version"));
        }
        let layout = Self::new(u32_at(8), u32_at(12), u32_at(16));
        if region.len() < layout.total_bytes() {
            return Err(EngineError::Corrupt("region smaller than its recorded layout"));
        }
        for slot in 0..layout.nslots {
            layout.inbound(slot).validate(region)?;
            layout.outbound(slot).validate(region)?;
        }
        Ok(layout)
    }

    /// The spin policy the hub chose for this flow's processes ([`crate::shm::event::SpinPolicy::to_word`]),
    /// written once at creation.
    pub fn spin_us<'a>(&self, region: &'a SharedRegion) -> &'a AtomicU32 {
        region.atomic_u32(OFF_SPIN_US)
    }

    /// The flag the hub raises before it sleeps; workers ring the doorbell only when it is up.
    pub fn doorbell_waiting<'a>(&self, region: &'a SharedRegion) -> &'a AtomicU32 {
        region.atomic_u32(OFF_DOORBELL_WAITING)
    }

    /// When a worker last rang the doorbell (`CLOCK_MONOTONIC` ns, 0 once the hub has read it):
    /// the hub learns what waking it costs.
    pub fn doorbell_rung_at<'a>(&self, region: &'a SharedRegion) -> &'a AtomicU64 {
        region.atomic_u64(OFF_DOORBELL_RUNG_AT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_roundtrips_through_the_header() {
        let l = FlowLayout::new(3, 64 * 1024, 300);
        let region = SharedRegion::heap(l.total_bytes());
        l.init(&region).unwrap();
        assert_eq!(FlowLayout::read(&region).unwrap(), l);
        assert!(l.outbound(2).offset + l.outbound(2).total_bytes() <= l.total_bytes());
        assert!(l.inbound(1).offset >= l.outbound(0).offset + l.outbound(0).total_bytes());
        // The stream block of a slot ends before the next slot begins.
        assert!(l.stream_block(0) + EVENT_BYTES + 8 * 300 <= l.slot_off(1));
        l.stream_word(&region, 2, 299).begin(7);
    }

    #[test]
    fn foreign_bytes_are_rejected() {
        let region = SharedRegion::heap(8192);
        assert!(FlowLayout::read(&region).is_err());
    }
}
