//! A single-producer single-consumer ring of variable-size records in shared memory.
//!
//! # Layout
//! A ring occupies `HEADER_BYTES + capacity` bytes at a 64-aligned offset of a region:
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0 | `magic: u32`, `version: u32`, `capacity: u64` | creator, once |
//! | 64 | `tail: u64` (bytes ever written), producer-space event (`waiters`, `seq`, `stamp`) | producer |
//! | 128 | `head: u64` (bytes ever consumed), consumer-data event (`waiters`, `seq`, `stamp`) | consumer |
//! | 192 | `capacity` bytes of records | producer, then consumer reads |
//!
//! `head` and `tail` only grow; the byte position of a counter `c` is `c % capacity`. The
//! producer and consumer each keep their own counter in a private variable and cache the other
//! side's, touching the shared line only when the cache says the ring is full or empty.
//!
//! # Records
//! Each record is an 8-byte header, `len: u32` then `tag: u32`, followed by `len` payload bytes,
//! padded to a multiple of 8. A record never wraps: when it does not fit before the end of the
//! buffer, the producer writes a padding record (tag [`TAG_PAD`]) covering the rest of the lap.
//! Records are at most `capacity / 2` bytes, so one always fits in an empty ring.
//!
//! # Ordering
//! The producer copies a record, then stores `tail` with `Release`; the consumer loads `tail`
//! with `Acquire` before reading. The consumer stores `head` with `Release` after it is done
//! with the bytes; the producer loads it with `Acquire` before overwriting them. Waking uses the
//! [`FutexEvent`] protocol on top of those stores.
//!
//! The peer is another process of the same flow, trusted but possibly killed at any instant: a
//! record is either fully published or invisible, and a corrupt length is reported as an error
//! rather than read out of bounds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::event::{FutexEvent, Spinner};
use super::region::SharedRegion;
use crate::error::{EngineError, Result};

pub const HEADER_BYTES: usize = 192;
const MAGIC: u32 = 0x4151_5249; // "AQRI"
                                // The wake-up stamps (offsets 80 and 144) live in what was zeroed padding before: a peer that
                                // does not write them is still understood (its wake-ups are simply not measured).
const VERSION: u32 = 1;
/// Bytes each record takes before its payload (payloads are padded to 8 bytes).
pub const RECORD_HEADER: usize = 8;
/// Tag of the padding record that skips to the start of the buffer.
pub const TAG_PAD: u32 = 0;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_CAPACITY: usize = 8;
const OFF_TAIL: usize = 64;
const OFF_SPACE_WAITERS: usize = 72;
const OFF_SPACE_SEQ: usize = 76;
const OFF_SPACE_STAMP: usize = 80;
const OFF_HEAD: usize = 128;
const OFF_DATA_WAITERS: usize = 136;
const OFF_DATA_SEQ: usize = 140;
const OFF_DATA_STAMP: usize = 144;

const fn pad8(n: usize) -> usize {
    (n + 7) & !7
}

/// Where a ring lives inside a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub offset: usize,
    pub capacity: usize,
}

impl RingLayout {
    /// `capacity` is rounded up to a multiple of 64 bytes.
    pub fn new(offset: usize, capacity: usize) -> Self {
        assert!(offset % 64 == 0, "ring offset must be 64-aligned");
        let capacity = capacity.max(256).div_ceil(64) * 64;
        Self { offset, capacity }
    }

    pub fn total_bytes(&self) -> usize {
        HEADER_BYTES + self.capacity
    }

    /// The largest payload one record can carry.
    pub fn max_payload(&self) -> usize {
        self.capacity / 2 - RECORD_HEADER
    }

    /// Writes the header of an empty ring. Call once, before any process uses it.
    pub fn init(&self, region: &SharedRegion) {
        region.atomic_u32(self.offset + OFF_MAGIC).store(MAGIC, Ordering::Relaxed);
        region.atomic_u32(self.offset + OFF_VERSION).store(VERSION, Ordering::Relaxed);
        region.atomic_u64(self.offset + OFF_CAPACITY).store(self.capacity as u64, Ordering::Relaxed);
        for off in [OFF_TAIL, OFF_HEAD, OFF_SPACE_STAMP, OFF_DATA_STAMP] {
            region.atomic_u64(self.offset + off).store(0, Ordering::Relaxed);
        }
        for off in [OFF_SPACE_WAITERS, OFF_SPACE_SEQ, OFF_DATA_WAITERS, OFF_DATA_SEQ] {
            region.atomic_u32(self.offset + off).store(0, Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::Release);
    }

    /// Checks the header written by `init` (a process attaching to a region it did not create).
    pub fn validate(&self, region: &SharedRegion) -> Result<()> {
        let ok = region.atomic_u32(self.offset + OFF_MAGIC).load(Ordering::Acquire) == MAGIC
            && region.atomic_u32(self.offset + OFF_VERSION).load(Ordering::Acquire) == VERSION
            && region.atomic_u64(self.offset + OFF_CAPACITY).load(Ordering::Acquire) == self.capacity as u64;
        ok.then_some(()).ok_or(EngineError::Corrupt("ring header does not match its layout"))
    }

    /// Discards unread records and forgets parked waiters. Only valid when neither endpoint's
    /// process is alive (the supervisor resets the rings of a dead worker's slot).
    pub fn reset(&self, region: &SharedRegion) {
        let tail = region.atomic_u64(self.offset + OFF_TAIL).load(Ordering::Acquire);
        region.atomic_u64(self.offset + OFF_HEAD).store(tail, Ordering::Release);
        region.atomic_u32(self.offset + OFF_SPACE_WAITERS).store(0, Ordering::Release);
        region.atomic_u32(self.offset + OFF_DATA_WAITERS).store(0, Ordering::Release);
    }

    fn data_event<'a>(&self, region: &'a SharedRegion) -> FutexEvent<'a> {
        FutexEvent::new(
            region.atomic_u32(self.offset + OFF_DATA_WAITERS),
            region.atomic_u32(self.offset + OFF_DATA_SEQ),
            region.atomic_u64(self.offset + OFF_DATA_STAMP),
        )
    }

    fn space_event<'a>(&self, region: &'a SharedRegion) -> FutexEvent<'a> {
        FutexEvent::new(
            region.atomic_u32(self.offset + OFF_SPACE_WAITERS),
            region.atomic_u32(self.offset + OFF_SPACE_SEQ),
            region.atomic_u64(self.offset + OFF_SPACE_STAMP),
        )
    }
}

/// The writing end. Exactly one process may hold a `Producer` for a ring at a time.
pub struct Producer {
    region: Arc<SharedRegion>,
    layout: RingLayout,
    tail: u64,
    cached_head: u64,
    published: u64,
    spinner: Spinner,
}

impl Producer {
    /// Attaches to a ring, resuming at its current tail.
    pub fn attach(region: Arc<SharedRegion>, layout: RingLayout) -> Result<Self> {
        layout.validate(&region)?;
        let tail = region.atomic_u64(layout.offset + OFF_TAIL).load(Ordering::Acquire);
        let cached_head = region.atomic_u64(layout.offset + OFF_HEAD).load(Ordering::Acquire);
        Ok(Self { region, layout, tail, cached_head, published: tail, spinner: Spinner::default() })
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    pub fn max_payload(&self) -> usize {
        self.layout.max_payload()
    }

    fn free(&mut self, need: usize) -> bool {
        let cap = self.layout.capacity as u64;
        if self.tail - self.cached_head + need as u64 <= cap {
            return true;
        }
        self.cached_head = self.region.atomic_u64(self.layout.offset + OFF_HEAD).load(Ordering::Acquire);
        self.tail - self.cached_head + need as u64 <= cap
    }

    fn data_at(&self, pos: u64) -> usize {
        self.layout.offset + HEADER_BYTES + (pos % self.layout.capacity as u64) as usize
    }

    /// Appends one record whose payload is the concatenation of `parts`, without publishing it.
    /// Returns `Ok(false)` when the ring has no room now; the caller may publish, wait for space
    /// and retry. A payload larger than [`RingLayout::max_payload`] is an error.
    pub fn try_write(&mut self, tag: u32, parts: &[&[u8]]) -> Result<bool> {
        debug_assert_ne!(tag, TAG_PAD);
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.layout.max_payload() {
            return Err(EngineError::RecordTooLarge { len, max: self.layout.max_payload() });
        }
        let need = RECORD_HEADER + pad8(len);
        let contiguous = self.layout.capacity - (self.tail % self.layout.capacity as u64) as usize;
        if need > contiguous {
            if !self.free(contiguous + need) {
                return Ok(false);
            }
            self.write_header(self.tail, (contiguous - RECORD_HEADER) as u32, TAG_PAD)?;
            self.tail += contiguous as u64;
        } else if !self.free(need) {
            return Ok(false);
        }
        self.write_header(self.tail, len as u32, tag)?;
        let mut at = self.data_at(self.tail) + RECORD_HEADER;
        for part in parts {
            self.region.write(at, part)?;
            at += part.len();
        }
        self.tail += need as u64;
        Ok(true)
    }

    fn write_header(&self, pos: u64, len: u32, tag: u32) -> Result<()> {
        let mut h = [0u8; RECORD_HEADER];
        h[..4].copy_from_slice(&len.to_le_bytes());
        h[4..].copy_from_slice(&tag.to_le_bytes());
        self.region.write(self.data_at(pos), &h)
    }

    /// Makes every written record visible to the consumer. Returns whether the consumer was
    /// parked (and has been woken).
    pub fn publish(&mut self) -> bool {
        if self.tail == self.published {
            return false;
        }
        self.region.atomic_u64(self.layout.offset + OFF_TAIL).store(self.tail, Ordering::Release);
        self.published = self.tail;
        let ev = self.layout.data_event(&self.region);
        let parked = ev.has_waiters();
        if parked {
            ev.notify();
        }
        parked
    }

    /// Publishes without waking the consumer, for consumers that are woken another way (the
    /// hub is woken through its doorbell).
    pub fn publish_quietly(&mut self) {
        if self.tail != self.published {
            self.region.atomic_u64(self.layout.offset + OFF_TAIL).store(self.tail, Ordering::Release);
            self.published = self.tail;
        }
    }

    /// Blocks until `need_payload` more bytes could be written, spinning then parking.
    pub fn wait_for_space(&mut self, need_payload: usize, spin: super::event::SpinPolicy) {
        let need = RECORD_HEADER + pad8(need_payload);
        let contiguous = self.layout.capacity - (self.tail % self.layout.capacity as u64) as usize;
        let want = if need > contiguous { contiguous + need } else { need };
        let region = self.region.clone();
        let ev = self.layout.space_event(&region);
        let mut spinner = self.spinner;
        spinner.wait(spin, ev, None, || self.free(want).then_some(()));
        self.spinner = spinner;
    }

    /// Bytes written but not yet consumed.
    pub fn backlog(&self) -> u64 {
        self.tail - self.region.atomic_u64(self.layout.offset + OFF_HEAD).load(Ordering::Acquire)
    }
}

/// One record as seen by the consumer: its payload stays in the ring until `release`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordView {
    pub tag: u32,
    /// Offset of the payload in the region.
    pub offset: usize,
    pub len: usize,
    next: u64,
}

/// The reading end. Exactly one process may hold a `Consumer` for a ring at a time.
pub struct Consumer {
    region: Arc<SharedRegion>,
    layout: RingLayout,
    head: u64,
    cached_tail: u64,
    released: u64,
    spinner: Spinner,
}

impl Consumer {
    pub fn attach(region: Arc<SharedRegion>, layout: RingLayout) -> Result<Self> {
        layout.validate(&region)?;
        let head = region.atomic_u64(layout.offset + OFF_HEAD).load(Ordering::Acquire);
        let cached_tail = region.atomic_u64(layout.offset + OFF_TAIL).load(Ordering::Acquire);
        Ok(Self { region, layout, head, cached_tail, released: head, spinner: Spinner::default() })
    }

    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    fn data_at(&self, pos: u64) -> usize {
        self.layout.offset + HEADER_BYTES + (pos % self.layout.capacity as u64) as usize
    }

    /// Whether a published record is waiting (refreshes the cached tail).
    pub fn has_data(&mut self) -> bool {
        if self.head != self.cached_tail {
            return true;
        }
        self.cached_tail = self.region.atomic_u64(self.layout.offset + OFF_TAIL).load(Ordering::Acquire);
        self.head != self.cached_tail
    }

    /// The next unread record, skipping padding; `None` when the ring is empty.
    pub fn peek(&mut self) -> Result<Option<RecordView>> {
        loop {
            if !self.has_data() {
                return Ok(None);
            }
            let at = self.data_at(self.head);
            let mut h = [0u8; RECORD_HEADER];
            self.region.read(at, &mut h)?;
            let len = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
            let tag = u32::from_le_bytes(h[4..].try_into().unwrap());
            let size = RECORD_HEADER + pad8(len);
            let contiguous = self.layout.capacity - (self.head % self.layout.capacity as u64) as usize;
            if size > contiguous || self.head + size as u64 > self.cached_tail {
                return Err(EngineError::Corrupt("ring record overruns the published data"));
            }
            if tag == TAG_PAD {
                self.head += size as u64;
                continue;
            }
            return Ok(Some(RecordView { tag, offset: at + RECORD_HEADER, len, next: self.head + size as u64 }));
        }
    }

    /// Marks `rec` (the record last returned by `peek`) as read. Its bytes stay valid until
    /// `release`.
    pub fn consume(&mut self, rec: &RecordView) {
        debug_assert!(rec.next > self.head);
        self.head = rec.next;
    }

    /// Copies a record's payload out.
    pub fn read_payload(&self, rec: &RecordView, dst: &mut Vec<u8>) -> Result<()> {
        dst.resize(rec.len, 0);
        self.region.read(rec.offset, dst)
    }

    /// Hands the consumed bytes back to the producer, waking it if it waits for space.
    pub fn release(&mut self) {
        if self.head == self.released {
            return;
        }
        self.region.atomic_u64(self.layout.offset + OFF_HEAD).store(self.head, Ordering::Release);
        self.released = self.head;
        let ev = self.layout.space_event(&self.region);
        if ev.has_waiters() {
            ev.notify();
        }
    }

    /// Blocks until a record is published or `deadline` passes, spinning then parking.
    pub fn wait_for_data(&mut self, spin: super::event::SpinPolicy, deadline: Option<std::time::Instant>) -> bool {
        let region = self.region.clone();
        let ev = self.layout.data_event(&region);
        let mut spinner = self.spinner;
        let got = spinner.wait(spin, ev, deadline, || self.has_data().then_some(())).is_some();
        self.spinner = spinner;
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::event::SpinPolicy;

    fn ring(cap: usize) -> (Producer, Consumer) {
        let region = Arc::new(SharedRegion::heap(HEADER_BYTES + cap + 4096));
        let layout = RingLayout::new(0, cap);
        layout.init(&region);
        (Producer::attach(region.clone(), layout).unwrap(), Consumer::attach(region, layout).unwrap())
    }

    fn pop(c: &mut Consumer) -> Option<(u32, Vec<u8>)> {
        let rec = c.peek().unwrap()?;
        let mut v = Vec::new();
        c.read_payload(&rec, &mut v).unwrap();
        c.consume(&rec);
        c.release();
        Some((rec.tag, v))
    }

    #[test]
    fn records_come_out_in_order_and_unpublished_ones_are_invisible() {
        let (mut p, mut c) = ring(1024);
        assert!(p.try_write(1, &[b"ab", b"cd"]).unwrap());
        assert!(p.try_write(2, &[b""]).unwrap());
        assert_eq!(c.peek().unwrap(), None, "nothing visible before publish");
        p.publish();
        assert_eq!(pop(&mut c), Some((1, b"abcd".to_vec())));
        assert_eq!(pop(&mut c), Some((2, vec![])));
        assert_eq!(pop(&mut c), None);
    }

    #[test]
    fn full_ring_refuses_then_accepts_after_release() {
        let (mut p, mut c) = ring(256);
        let big = vec![7u8; p.max_payload()];
        assert!(p.try_write(1, &[&big]).unwrap());
        assert!(p.try_write(2, &[&big]).unwrap(), "two half-ring records fill the ring exactly");
        assert!(!p.try_write(3, &[b"x"]).unwrap(), "a full ring refuses");
        p.publish();
        assert_eq!(pop(&mut c).unwrap(), (1, big.clone()));
        assert!(p.try_write(3, &[b"x"]).unwrap(), "room again after release");
        assert!(!p.try_write(4, &[&big]).unwrap(), "no contiguous room yet for a large record");
        p.publish();
        assert_eq!(pop(&mut c).unwrap(), (2, big.clone()));
        assert_eq!(pop(&mut c).unwrap(), (3, b"x".to_vec()));
        assert!(p.try_write(4, &[&big]).unwrap(), "wraps with padding once the ring drained");
        p.publish();
        assert_eq!(pop(&mut c).unwrap(), (4, big));
    }

    #[test]
    fn oversized_record_is_an_error() {
        let (mut p, _c) = ring(256);
        let too_big = vec![0u8; p.max_payload() + 1];
        assert!(matches!(p.try_write(1, &[&too_big]), Err(EngineError::RecordTooLarge { .. })));
    }

    #[test]
    fn threads_exchange_many_records_through_wraparound() {
        let (mut p, mut c) = ring(512);
        let n: u32 = if cfg!(miri) { 200 } else { 20_000 };
        let t = std::thread::spawn(move || {
            for i in 0..n {
                let body = vec![(i % 251) as u8; (i % 37) as usize];
                while !p.try_write(i + 1, &[&i.to_le_bytes(), &body]).unwrap() {
                    p.publish();
                    p.wait_for_space(4 + body.len(), SpinPolicy::default());
                }
                if i % 3 == 0 {
                    p.publish();
                }
            }
            p.publish();
        });
        let mut expect = 0u32;
        while expect < n {
            match c.peek().unwrap() {
                Some(rec) => {
                    let mut v = Vec::new();
                    c.read_payload(&rec, &mut v).unwrap();
                    c.consume(&rec);
                    assert_eq!(rec.tag, expect + 1);
                    assert_eq!(u32::from_le_bytes(v[..4].try_into().unwrap()), expect);
                    assert_eq!(v.len() - 4, (expect % 37) as usize);
                    assert!(v[4..].iter().all(|&b| b == (expect % 251) as u8));
                    expect += 1;
                    if expect % 5 == 0 {
                        c.release();
                    }
                }
                None => {
                    c.release();
                    c.wait_for_data(SpinPolicy::default(), None);
                }
            }
        }
        t.join().unwrap();
    }
}
