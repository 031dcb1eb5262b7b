#![forbid(unsafe_code)]
//! The worker's end of the transport: receive a batch, answer for each task, report the batch
//! done.
//!
//! A worker owns one slot of the flow region: it consumes the slot's inbound ring and produces
//! into its outbound ring. It waits for work by spinning briefly and then parking on the
//! inbound ring's futex (see [`SpinPolicy`]), so an idle worker costs no CPU. It wakes the hub
//! through the doorbell eventfd only when the hub has announced it is going to sleep.
//!
//! Task bodies stay in the inbound ring (or the arena) until [`WorkerEndpoint::finish_batch`],
//! so a runtime can read them in place while it handles the batch.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::Nanos;
use crate::error::{EngineError, Result};
use crate::hub::Doorbell;
use crate::layout::FlowLayout;
use crate::message::*;
use crate::shm::event::SpinPolicy;
use crate::shm::{Arena, BufRef, Consumer, Extent, Producer, SharedRegion};
use crate::stream::{has_room, StreamState};

/// Where a task's body is, in the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLoc {
    pub offset: usize,
    pub len: usize,
}

#[derive(Clone, Debug)]
pub struct TaskRef {
    pub header: TaskHeader,
    pub body: BodyLoc,
    /// Out-of-band buffers in the pool. The hub holds a reference on each until this batch is
    /// finished; a worker that keeps one longer takes its own ([`Arena::hold`]).
    pub bufs: Vec<BufRef>,
}

/// What became of a partial result ([`WorkerEndpoint::send_part`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartSent {
    /// On its way to the caller.
    Sent,
    /// The caller does not read partial results (it awaits the result only): dropped.
    NotStreamed,
    /// The caller went away (cancelled, timed out): dropped. The handler may stop working on
    /// the task.
    Cancelled,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A batch of this many tasks is ready in [`WorkerEndpoint::tasks`].
    Batch(usize),
    /// The hub asked this worker to exit.
    Stop,
    /// Nothing arrived before the timeout.
    Timeout,
}

pub struct WorkerEndpoint {
    region: Arc<SharedRegion>,
    layout: FlowLayout,
    slot: usize,
    inbound: Consumer,
    outbound: Producer,
    arena: Arc<Arena>,
    doorbell: Doorbell,
    spin: SpinPolicy,
    batch: Vec<TaskRef>,
    batch_seq: u64,
    /// Parts sent per position of the current batch.
    parts_sent: Vec<u32>,
    inline_max: usize,
    metrics: bool,
}

impl WorkerEndpoint {
    /// Attaches to `slot` of a flow region created by the hub; `arena` is this process's handle
    /// on the pool (its own process index).
    pub fn attach(region: Arc<SharedRegion>, arena: Arc<Arena>, slot: usize, doorbell: Doorbell) -> Result<Self> {
        let layout = FlowLayout::read(&region)?;
        if slot >= layout.nslots {
            return Err(EngineError::Config(format!("slot {slot} does not exist ({} slots)", layout.nslots)));
        }
        let inbound = Consumer::attach(region.clone(), layout.inbound(slot))?;
        let outbound = Producer::attach(region.clone(), layout.outbound(slot))?;
        let inline_max = (outbound.max_payload() - HEADER_LEN).min(64 << 10);
        let spin = SpinPolicy::from_word(layout.spin_us(&region).load(Ordering::Acquire));
        let metrics = layout.metrics_enabled(&region).load(Ordering::Acquire) != 0;
        Ok(Self {
            region,
            layout,
            slot,
            inbound,
            outbound,
            arena,
            doorbell,
            spin,
            batch: Vec::new(),
            batch_seq: 0,
            parts_sent: Vec::new(),
            inline_max,
            metrics,
        })
    }

    pub fn set_spin(&mut self, spin: SpinPolicy) {
        self.spin = spin;
    }

    pub fn slot(&self) -> usize {
        self.slot
    }

    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    /// Bodies above this size are sent through the arena.
    pub fn inline_max(&self) -> usize {
        self.inline_max
    }

    fn send(&mut self, tag: u32, parts: &[&[u8]]) -> Result<()> {
        let len = parts.iter().map(|p| p.len()).sum();
        while !self.outbound.try_write(tag, parts)? {
            self.flush();
            self.outbound.wait_for_space(len, self.spin);
        }
        Ok(())
    }

    /// Publishes what was written and rings the doorbell if the hub sleeps.
    pub fn flush(&mut self) {
        self.outbound.publish_quietly();
        std::sync::atomic::fence(Ordering::SeqCst);
        let waiting = self.layout.doorbell_waiting(&self.region);
        if waiting.load(Ordering::SeqCst) != 0 && waiting.swap(0, Ordering::SeqCst) != 0 {
            self.layout.doorbell_rung_at(&self.region).store(crate::clock::Nanos::now().0, Ordering::Release);
            self.doorbell.ring();
        }
    }

    /// Reports that start-up finished; the hub starts sending batches.
    pub fn ready(&mut self) -> Result<()> {
        self.send(TAG_READY, &[])?;
        self.flush();
        Ok(())
    }

    /// Reports that start-up failed, with a description of why.
    pub fn start_failed(&mut self, message: &str) -> Result<()> {
        let bytes = message.as_bytes();
        let max = self.outbound.max_payload();
        self.send(TAG_START_FAILED, &[&bytes[..bytes.len().min(max)]])?;
        self.flush();
        Ok(())
    }

    /// Waits for the next batch (or a stop request) for at most `timeout`.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Received> {
        debug_assert!(self.batch.is_empty(), "finish_batch before receiving the next one");
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if !self.inbound.wait_for_data(self.spin, deadline) {
                return Ok(Received::Timeout);
            }
            let rec = self.inbound.peek()?.ok_or(EngineError::Protocol("woken without a record"))?;
            self.inbound.consume(&rec);
            match rec.tag {
                TAG_STOP => {
                    self.inbound.release();
                    return Ok(Received::Stop);
                }
                TAG_BATCH => {
                    let mut head = [0u8; 16];
                    if rec.len < head.len() {
                        return Err(EngineError::Protocol("short batch record"));
                    }
                    self.region.read(rec.offset, &mut head)?;
                    let count = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
                    let seq = u64::from_le_bytes(head[8..].try_into().unwrap());
                    if count > self.layout.positions {
                        return Err(EngineError::Protocol("a batch larger than the flow's largest batch size"));
                    }
                    // The batch's stream words before the gate: a hub that finds the batch
                    // begun (and so marks a task cancelled in place) finds them written.
                    for pos in 0..count {
                        self.layout.stream_word(&self.region, self.slot, pos).begin(seq);
                    }
                    // Begin the batch, unless the hub took it back (a cancelled task in it).
                    let begun = self.layout.slot_gate(&self.region, self.slot).begin(seq)?;
                    for _ in 0..count {
                        let rec = self.inbound.peek()?.ok_or(EngineError::Protocol("batch shorter than announced"))?;
                        if rec.tag != TAG_TASK {
                            return Err(EngineError::Protocol("expected a task record"));
                        }
                        self.inbound.consume(&rec);
                        if !begun {
                            continue;
                        }
                        let mut h = [0u8; HEADER_LEN];
                        if rec.len < HEADER_LEN {
                            return Err(EngineError::Protocol("task record shorter than its header"));
                        }
                        self.region.read(rec.offset, &mut h)?;
                        let header = TaskHeader::decode(&h)?;
                        let table_len = header.nbufs as usize * BufRef::WIRE_LEN;
                        if rec.len < HEADER_LEN + table_len {
                            return Err(EngineError::Protocol("task record shorter than its buffer table"));
                        }
                        let mut table = vec![0u8; table_len];
                        self.region.read(rec.offset + HEADER_LEN, &mut table)?;
                        let mut bufs = Vec::with_capacity(header.nbufs as usize);
                        for wire in table.chunks_exact(BufRef::WIRE_LEN) {
                            let b = BufRef::decode(wire)?;
                            self.arena.check_buf(&b)?;
                            bufs.push(b);
                        }
                        let body = match header.extent {
                            Some(ext) => BodyLoc { offset: usize::MAX, len: ext.len as usize },
                            None => BodyLoc {
                                offset: rec.offset + HEADER_LEN + table_len,
                                len: rec.len - HEADER_LEN - table_len,
                            },
                        };
                        self.batch.push(TaskRef { header, body, bufs });
                    }
                    if begun {
                        self.batch_seq = seq;
                        self.parts_sent.clear();
                        self.parts_sent.resize(count, 0);
                        if self.metrics {
                            self.record_arrivals();
                        }
                        return Ok(Received::Batch(count));
                    }
                    self.inbound.release();
                }
                _ => return Err(EngineError::Protocol("unexpected record from the hub")),
            }
        }
    }

    /// Transfer time from the hub and size of each task of the batch just received.
    fn record_arrivals(&self) {
        let m = self.layout.slot_metrics(&self.region, self.slot);
        let now = Nanos::now();
        for t in &self.batch {
            m.record(1, now.0.saturating_sub(t.header.sent_at.0) / 1000);
            let size = t.body.len as u64 + t.bufs.iter().map(|b| b.len).sum::<u64>();
            m.record(2, size);
        }
    }

    /// Records how long the handler took for the current batch (call before `finish_batch`).
    pub fn record_handle_time(&self, elapsed: Duration) {
        if self.metrics {
            self.layout.slot_metrics(&self.region, self.slot).record(0, elapsed.as_micros() as u64);
        }
    }

    pub fn tasks(&self) -> &[TaskRef] {
        &self.batch
    }

    /// The sequence number of the current batch (valid while `tasks()` is not empty).
    pub fn batch_seq(&self) -> u64 {
        self.batch_seq
    }

    /// Copies the body of task `i` of the current batch.
    pub fn read_body(&self, i: usize, dst: &mut Vec<u8>) -> Result<()> {
        dst.resize(self.batch[i].body.len, 0);
        self.read_body_into(i, dst)
    }

    /// Copies the body of task `i` of the current batch into `dst`, which is exactly its length
    /// (`tasks()[i].body.len`): one copy, straight into the caller's buffer (a Python `bytes`).
    pub fn read_body_into(&self, i: usize, dst: &mut [u8]) -> Result<()> {
        let t = &self.batch[i];
        if dst.len() != t.body.len {
            return Err(EngineError::Protocol("a body read into a buffer of another length"));
        }
        match t.header.extent {
            Some(ext) => self.arena.read(&ext, 0, dst),
            None => self.region.read(t.body.offset, dst),
        }
    }

    /// Answers for task `i` of the current batch. `route` is the next step, or
    /// [`ROUTE_DONE`]. Large bodies go to the pool.
    pub fn send_result(&mut self, i: usize, status: Status, route: u16, body: &[u8]) -> Result<()> {
        self.send_result_with_bufs(i, status, route, body, &[])
    }

    /// [`Self::send_result`] with out-of-band buffers: this process hands over one reference
    /// on each (taken with [`Arena::hold`] or [`Arena::alloc`]) to the message.
    pub fn send_result_with_bufs(
        &mut self,
        i: usize,
        status: Status,
        route: u16,
        body: &[u8],
        bufs: &[BufRef],
    ) -> Result<()> {
        self.write_task_record(TAG_RESULT, i, status, route, body, bufs)
    }

    /// One record about task `i` (a result or a part): its header, buffer table and body, the
    /// body in the pool when it is too large for the ring.
    fn write_task_record(
        &mut self,
        tag: u32,
        i: usize,
        status: Status,
        route: u16,
        body: &[u8],
        bufs: &[BufRef],
    ) -> Result<()> {
        let mut h = self.batch[i].header;
        h.status = status;
        h.route = route;
        h.sent_at = Nanos::now();
        h.extent = None;
        h.nbufs =
            u16::try_from(bufs.len()).map_err(|_| EngineError::Config("more than 65535 out-of-band buffers".into()))?;
        let mut table = Vec::with_capacity(bufs.len() * BufRef::WIRE_LEN);
        for b in bufs {
            table.extend_from_slice(&b.encode());
        }
        let inline_max = self.inline_max.saturating_sub(table.len());
        if body.len() > inline_max {
            let ext = self.alloc(body.len())?;
            self.arena.write(&ext, 0, body)?;
            h.extent = Some(ext);
            self.send(tag, &[&h.encode(), &table])
        } else {
            self.send(tag, &[&h.encode(), &table, body])
        }
    }

    /// Whether task `i` of the current batch streams (its caller reads partial results) and
    /// whether that caller is gone.
    pub fn stream_state(&self, i: usize) -> (bool, bool) {
        let streamed = self.batch[i].header.flags & FLAG_STREAM != 0;
        let cancelled = self.word_state(i).is_some_and(|s| s.cancelled);
        (streamed, cancelled)
    }

    fn word_state(&self, i: usize) -> Option<StreamState> {
        self.layout.stream_word(&self.region, self.slot, i).read(self.batch_seq)
    }

    /// Sends a partial result of task `i` of the current batch (see [`crate::stream`]): after
    /// waiting, if [`crate::stream::STREAM_WINDOW`] parts of it are not yet taken by its caller,
    /// until one is or the caller goes away. `bufs` as for [`Self::send_result_with_bufs`]; on
    /// anything but [`PartSent::Sent`] their references are released here.
    pub fn send_part(&mut self, i: usize, body: &[u8], bufs: &[BufRef]) -> Result<PartSent> {
        let streamed =
            self.batch.get(i).ok_or(EngineError::Protocol("a part for a task not in the batch"))?.header.flags
                & FLAG_STREAM
                != 0;
        let outcome = if !streamed { Some(PartSent::NotStreamed) } else { self.wait_for_room(i) };
        if let Some(dropped) = outcome {
            for b in bufs {
                let _ = self.arena.unhold(&b.extent());
            }
            return Ok(dropped);
        }
        self.write_task_record(TAG_PART, i, Status::Ok, ROUTE_DONE, body, bufs)?;
        self.parts_sent[i] += 1;
        self.flush();
        Ok(PartSent::Sent)
    }

    /// Waits until task `i` may send a part: `None` when it may, `Some(Cancelled)` when its
    /// caller is gone.
    fn wait_for_room(&mut self, i: usize) -> Option<PartSent> {
        let sent = self.parts_sent[i];
        let state = |this: &Self| this.word_state(i).unwrap_or(StreamState { cancelled: true, taken: 0 });
        let ready = |this: &Self| {
            let s = state(this);
            (s.cancelled || has_room(sent, s)).then_some(s.cancelled)
        };
        let cancelled = match ready(self) {
            Some(c) => c,
            None => {
                // The caller is behind: what this worker wrote must reach the hub before it
                // waits, or the caller could be waiting for it.
                self.flush();
                let ev = self.layout.stream_event(&self.region, self.slot);
                // Woken by the hub when a part is taken or the caller goes away; the timeout
                // only re-checks the word, as a guard against a lost wake-up.
                loop {
                    let recheck = Some(Instant::now() + Duration::from_millis(100));
                    if let Some(c) = SpinPolicy::NONE.wait_until(ev, recheck, || ready(self)) {
                        break c;
                    }
                }
            }
        };
        cancelled.then_some(PartSent::Cancelled)
    }

    /// Allocates a pool extent held by this process.
    pub fn alloc(&mut self, len: usize) -> Result<Extent> {
        self.arena
            .alloc(len)
            .ok_or(EngineError::ArenaExhausted { requested: len, capacity: self.arena.layout().capacity_bytes() })
    }

    /// Ends the current batch: gives the inbound bytes back and tells the hub this worker is idle.
    pub fn finish_batch(&mut self) -> Result<()> {
        self.batch.clear();
        self.inbound.release();
        self.send(TAG_BATCH_DONE, &[&self.batch_seq.to_le_bytes()])?;
        self.flush();
        Ok(())
    }
}
