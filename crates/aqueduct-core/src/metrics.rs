#![forbid(unsafe_code)]
//! Metrics: histograms, counters and sample rings that cost a few nanoseconds to record.
//!
//! Workers record into their slot of the flow region (atomics; one writer per slot), the hub
//! records in main-process memory, and the main process reads both when it exports: there is
//! no per-task message for metrics.
//!
//! # Histograms
//! Log-linear, two buckets per octave: bucket 0 holds 0, bucket `2k + 1` holds `[2^k, 1.5 * 2^k)`
//! and bucket `2k + 2` holds `[1.5 * 2^k, 2^(k+1))`, so any value is known within 25%. Times are
//! recorded in microseconds, sizes in bytes. Octave boundaries (`2^k`) are exact bucket bounds,
//! which is what the Prometheus exposition uses.
//!
//! # Sample rings
//! StatsD timings are individual samples. Each metric keeps the last [`RING`] samples in a ring
//! (a write counter, then the slots); an exporter takes what is new since its last look. When
//! more arrive between two exports than the ring holds, the exporter sees the most recent ones:
//! timings are then sampled, and the histogram still counts everything.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::shm::SharedRegion;

pub const BUCKETS: usize = 80;
pub const RING: usize = 64;

/// Bytes a shared histogram occupies: the buckets, then count and sum.
pub const HIST_BYTES: usize = (BUCKETS + 2) * 8;
/// Bytes a shared sample ring occupies: the write counter, then the slots.
pub const RING_BYTES: usize = (RING + 1) * 4;

/// The bucket of a value.
pub fn bucket_of(v: u64) -> usize {
    if v == 0 {
        return 0;
    }
    let k = 63 - v.leading_zeros() as usize;
    let half = if k == 0 { 0 } else { ((v >> (k - 1)) & 1) as usize };
    (2 * k + 1 + half).min(BUCKETS - 1)
}

/// The smallest value of the bucket after `i` (the exclusive upper bound of bucket `i`).
pub fn bucket_upper(i: usize) -> u64 {
    if i == 0 {
        return 1;
    }
    let k = (i - 1) / 2;
    if (i - 1) % 2 == 0 {
        // [2^k, 1.5 * 2^k): 2^0 has no half bucket, its upper bound is 2.
        if k == 0 {
            2
        } else {
            (1u64 << k) + (1u64 << (k - 1))
        }
    } else {
        1u64 << (k + 1).min(63)
    }
}

/// A histogram in process memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; BUCKETS],
    pub count: u64,
    pub sum: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { buckets: [0; BUCKETS], count: 0, sum: 0 }
    }
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.buckets[bucket_of(v)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
    }

    /// How many recorded values are below `bound` (exact when `bound` is a power of two).
    pub fn count_below(&self, bound: u64) -> u64 {
        (0..BUCKETS).filter(|&i| bucket_upper(i) <= bound).map(|i| self.buckets[i]).sum()
    }
}

/// A histogram in a shared region, written by one process with relaxed atomics.
#[derive(Clone, Copy)]
pub struct ShmHistogram<'a> {
    cells: &'a [AtomicU64],
}

impl<'a> ShmHistogram<'a> {
    /// The histogram at `offset`: its buckets, then count and sum, as consecutive u64 cells.
    pub fn at(region: &'a SharedRegion, offset: usize) -> Self {
        Self { cells: region_u64_slice(region, offset, BUCKETS + 2) }
    }

    pub fn record(&self, v: u64) {
        self.cells[bucket_of(v)].fetch_add(1, Ordering::Relaxed);
        self.cells[BUCKETS].fetch_add(1, Ordering::Relaxed);
        self.cells[BUCKETS + 1].fetch_add(v, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Histogram {
        let mut h = Histogram::default();
        for (i, b) in h.buckets.iter_mut().enumerate() {
            *b = self.cells[i].load(Ordering::Relaxed);
        }
        h.count = self.cells[BUCKETS].load(Ordering::Relaxed);
        h.sum = self.cells[BUCKETS + 1].load(Ordering::Relaxed);
        h
    }

    pub fn reset(&self) {
        for c in self.cells {
            c.store(0, Ordering::Relaxed);
        }
    }
}

fn region_u64_slice(region: &SharedRegion, offset: usize, count: usize) -> &[AtomicU64] {
    region.atomic_u64_slice(offset, count)
}

/// A ring of recent samples in a shared region (one writer).
#[derive(Clone, Copy)]
pub struct ShmRing<'a> {
    written: &'a AtomicU32,
    slots: &'a [AtomicU32],
}

impl<'a> ShmRing<'a> {
    pub fn at(region: &'a SharedRegion, offset: usize) -> Self {
        Self { written: region.atomic_u32(offset), slots: region.atomic_u32_slice(offset + 4, RING) }
    }

    pub fn push(&self, v: u64) {
        let n = self.written.load(Ordering::Relaxed);
        self.slots[n as usize % RING].store(v.min(u32::MAX as u64) as u32, Ordering::Relaxed);
        self.written.store(n.wrapping_add(1), Ordering::Release);
    }

    /// Samples written since `*seen` (at most the last [`RING`]); advances `*seen`.
    pub fn take_new(&self, seen: &mut u32, out: &mut Vec<u32>) {
        let n = self.written.load(Ordering::Acquire);
        let fresh = n.wrapping_sub(*seen).min(RING as u32);
        for i in (0..fresh).rev() {
            out.push(self.slots[n.wrapping_sub(i + 1) as usize % RING].load(Ordering::Relaxed));
        }
        *seen = n;
    }

    pub fn reset(&self) {
        self.written.store(0, Ordering::Release);
    }
}

/// A sample ring in process memory.
#[derive(Clone, Debug)]
pub struct Ring {
    samples: Vec<u32>,
    written: u64,
}

impl Default for Ring {
    fn default() -> Self {
        Self { samples: vec![0; RING], written: 0 }
    }
}

impl Ring {
    pub fn push(&mut self, v: u64) {
        self.samples[(self.written % RING as u64) as usize] = v.min(u32::MAX as u64) as u32;
        self.written += 1;
    }

    /// Samples written since `*seen` (at most the last [`RING`]); advances `*seen`.
    pub fn take_new(&self, seen: &mut u64, out: &mut Vec<u32>) {
        let fresh = (self.written - *seen).min(RING as u64);
        for i in (0..fresh).rev() {
            out.push(self.samples[((self.written - i - 1) % RING as u64) as usize]);
        }
        *seen = self.written;
    }
}

/// A histogram and its sample ring, recorded together.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub hist: Histogram,
    pub ring: Ring,
    pub seen: u64,
}

impl Series {
    pub fn record(&mut self, v: u64) {
        self.hist.record(v);
        self.ring.push(v);
    }

    /// Samples since the last call.
    pub fn drain(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        self.ring.take_new(&mut self.seen, &mut out);
        out
    }
}

/// What a worker records about its own work, in its slot: handle time per batch, and per task
/// the transfer time from the hub and the size of what it received.
pub const WORKER_SERIES: [&str; 3] = ["handle_us", "transfer_in_us", "size_in"];

/// Bytes of the worker metrics block in a slot header.
pub const WORKER_BLOCK: usize = WORKER_SERIES.len() * (HIST_BYTES + RING_BYTES);

/// The worker metrics block of one slot.
#[derive(Clone, Copy)]
pub struct WorkerMetrics<'a> {
    region: &'a SharedRegion,
    offset: usize,
}

impl<'a> WorkerMetrics<'a> {
    pub fn at(region: &'a SharedRegion, offset: usize) -> Self {
        Self { region, offset }
    }

    pub fn hist(&self, series: usize) -> ShmHistogram<'a> {
        ShmHistogram { cells: region_u64_slice(self.region, self.offset + series * HIST_BYTES, BUCKETS + 2) }
    }

    pub fn ring(&self, series: usize) -> ShmRing<'a> {
        ShmRing::at(self.region, self.offset + WORKER_SERIES.len() * HIST_BYTES + series * RING_BYTES)
    }

    pub fn record(&self, series: usize, v: u64) {
        self.hist(series).record(v);
        self.ring(series).push(v);
    }

    pub fn reset(&self) {
        for s in 0..WORKER_SERIES.len() {
            self.hist(s).reset();
            self.ring(s).reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_octaves_are_exact_bounds() {
        let mut last = 0;
        for v in [0u64, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 15, 16, 1000, 1 << 20, u64::MAX / 2] {
            let b = bucket_of(v);
            assert!(b >= last, "bucket of {v} went backwards");
            last = b;
            assert!(v < bucket_upper(b) || b == BUCKETS - 1, "{v} above its bucket's upper bound");
            assert!(b == 0 || v >= bucket_upper(b - 1), "{v} below its bucket's lower bound");
        }
        let mut h = Histogram::default();
        for v in 0..4096u64 {
            h.record(v);
        }
        for k in 0..12 {
            assert_eq!(h.count_below(1 << k), 1 << k, "values below 2^{k}");
        }
    }

    #[test]
    fn rings_return_only_new_samples_and_the_most_recent_when_lapped() {
        let mut ring = Ring::default();
        let mut seen = 0;
        let mut out = Vec::new();
        for v in 0..10 {
            ring.push(v);
        }
        ring.take_new(&mut seen, &mut out);
        assert_eq!(out, (0..10).collect::<Vec<u32>>());
        out.clear();
        for v in 0..(RING as u64 * 3) {
            ring.push(1000 + v);
        }
        ring.take_new(&mut seen, &mut out);
        assert_eq!(out.len(), RING);
        assert_eq!(*out.last().unwrap(), 1000 + RING as u32 * 3 - 1);
    }

    #[test]
    fn shared_histograms_and_rings_round_trip() {
        let region = SharedRegion::heap(8192);
        let m = WorkerMetrics::at(&region, 256);
        m.record(0, 100);
        m.record(0, 300);
        let h = m.hist(0).snapshot();
        assert_eq!((h.count, h.sum), (2, 400));
        let mut seen = 0;
        let mut out = Vec::new();
        m.ring(0).take_new(&mut seen, &mut out);
        assert_eq!(out, vec![100, 300]);
        m.reset();
        assert_eq!(m.hist(0).snapshot().count, 0);
    }
}

/// How a call ended, for [`OutcomeCounts`]: the names 1.15 exports (`tasks.complete`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallEnd {
    Complete = 0,
    Timeout = 1,
    Cancel = 2,
    Error = 3,
}

/// The names of [`CallEnd`], in index order.
pub const CALL_ENDS: [&str; 4] = ["complete", "timeout", "cancel", "error"];

/// Calls that ended, per entry step, priority and [`CallEnd`]: counted where a call's end is
/// decided (the driver for its own callers, the engine for port clients), never per front end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    /// `[step][priority][end]`.
    pub by_step: Vec<Vec<[u64; 4]>>,
}

impl OutcomeCounts {
    pub fn new(steps: usize, priorities: usize) -> Self {
        Self { by_step: vec![vec![[0; 4]; priorities]; steps] }
    }

    pub fn add(&mut self, step: usize, priority: u8, end: CallEnd) {
        if let Some(level) = self.by_step.get_mut(step).and_then(|s| s.get_mut(priority as usize)) {
            level[end as usize] += 1;
        }
    }

    /// Adds every count of `other` (same shape) into `self`.
    pub fn merge(&mut self, other: &OutcomeCounts) {
        for (mine, theirs) in self.by_step.iter_mut().zip(&other.by_step) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                for k in 0..4 {
                    m[k] += t[k];
                }
            }
        }
    }

    /// Totals per priority, summed over steps.
    pub fn by_priority(&self) -> Vec<[u64; 4]> {
        let levels = self.by_step.first().map_or(0, Vec::len);
        let mut out = vec![[0; 4]; levels];
        for step in &self.by_step {
            for (o, c) in out.iter_mut().zip(step) {
                for k in 0..4 {
                    o[k] += c[k];
                }
            }
        }
        out
    }
}
