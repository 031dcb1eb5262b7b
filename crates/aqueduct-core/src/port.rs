#![forbid(unsafe_code)]
//! Ports: how a process that did not start the flow submits tasks straight into its engine.
//!
//! Several web server processes share one flow (gunicorn `--preload`, `uvicorn --workers`):
//! the flow runs in one process, and each web process is a *client* of its engine through a
//! port. A port is a memfd region holding two rings, requests (client to engine) and responses
//! (engine to client). The engine drains requests in the same poll that drains its workers'
//! results and puts the tasks straight into the step queues; results of those tasks go back
//! into the client's response ring. No code of the flow's process runs per task beyond the
//! engine itself, and no byte of a task is copied more than across a ring.
//!
//! Payloads in the shared-memory pool move by descriptor, as between steps. The engine adopts
//! the references a request carries (they become its own, like a worker's result) and
//! *transfers* those of a response to the client's row of the pool before writing it. So at
//! every instant each reference is counted in the row of a process that will release it, and a
//! client that dies leaves nothing that reaping its row does not free.
//!
//! Waking follows the worker protocol: a side about to sleep raises its flag in the port header,
//! and the other side, after publishing, rings the sleeper's eventfd only if the flag is up. The
//! client rings the engine's own doorbell; the engine rings the port's bell, which the client's
//! event loop watches. When a response does not fit in a full response ring the engine keeps it
//! and raises `engine_blocked`; the client rings the engine once it has made room.
//!
//! # Layout
//! | offset | field |
//! |---|---|
//! | 0 | `magic u32`, `version u32`, `ring capacity u64` |
//! | 64 | `engine_sleeping u32`, `client_sleeping u32`, `engine_blocked u32` |
//! | 128 | request ring, then the response ring (64-aligned) |
//!
//! # Records
//! Task ids in a port are the client's own. Requests: [`TAG_SUBMIT`] (a [`TaskHeader`] whose
//! `route` is the entry step and whose flags say whether the client reads partial results
//! ([`FLAG_STREAM`]), the buffer table, the body inline or as the header's extent),
//! [`TAG_CANCEL`] (`task_id u64`) and [`TAG_PART_TAKEN`] (`task_id u64`: the client's caller
//! took one part of that task). Responses: [`TAG_DONE`] (header, buffer table, body),
//! [`TAG_PART`] (the same, for a partial result) and [`TAG_FAILED`] (header, then `kind u8,
//! 0u8, step u16, pid u32`, then for `handler` the pickled exception and for `rejected` a UTF-8
//! reason, inline or as the header's extent).
//!
//! # Streams
//! The engine keeps the receipts of the parts it sent each task ([`crate::stream`]) and gives
//! one back for each `TAG_PART_TAKEN`: a client names only its own tasks, never a receipt, so
//! it cannot open another stream's window. Receipts still out when the task ends, is cancelled
//! or the port closes are dropped with it (the batch they belong to is over, or the task's
//! cancelled bit frees its worker).

use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::clock::Nanos;
use crate::error::{EngineError, Result};
use crate::hub::{Doorbell, Failure, Hub, Outcome, Payload};
use crate::message::{TaskHeader, FLAG_STREAM, HEADER_LEN};
use crate::shm::{Arena, BufRef, Consumer, Extent, Producer, RingLayout, SharedRegion};
use crate::stream::PartReceipt;

/// Client to engine: a task to queue at the step named by the header's `route`.
pub const TAG_SUBMIT: u32 = 32;
/// Client to engine: the client gave up on a task (payload: its `task_id u64`).
pub const TAG_CANCEL: u32 = 33;
/// Engine to client: a task finished.
pub const TAG_DONE: u32 = 34;
/// Engine to client: a task failed.
pub const TAG_FAILED: u32 = 35;
/// Engine to client: a partial result of a task submitted with [`FLAG_STREAM`].
pub const TAG_PART: u32 = 36;
/// Client to engine: the caller took one part of a task (payload: its `task_id u64`).
pub const TAG_PART_TAKEN: u32 = 37;

const MAGIC: u32 = 0x4151_5054; // "AQPT"
const VERSION: u32 = 2;
const OFF_CAPACITY: usize = 8;
const OFF_ENGINE_SLEEPING: usize = 64;
const OFF_CLIENT_SLEEPING: usize = 68;
const OFF_ENGINE_BLOCKED: usize = 72;
const RINGS_AT: usize = 128;
/// Bytes of a failure record between the header and the detail.
const FAILURE_PREFIX: usize = 8;
/// Step number of failures that belong to no step (the flow stopped, the request was refused).
pub const NO_STEP: u16 = u16::MAX;

/// Where a port's rings are in its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortLayout {
    pub requests: RingLayout,
    pub responses: RingLayout,
}

impl PortLayout {
    /// Two rings of `capacity` bytes each.
    pub fn new(capacity: usize) -> Self {
        let requests = RingLayout::new(RINGS_AT, capacity);
        let responses = RingLayout::new((RINGS_AT + requests.total_bytes()).div_ceil(64) * 64, requests.capacity);
        Self { requests, responses }
    }

    pub fn total_bytes(&self) -> usize {
        self.responses.offset + self.responses.total_bytes()
    }

    fn init(&self, region: &SharedRegion) {
        region.atomic_u32(0).store(MAGIC, Ordering::Relaxed);
        region.atomic_u32(4).store(VERSION, Ordering::Relaxed);
        region.atomic_u64(OFF_CAPACITY).store(self.requests.capacity as u64, Ordering::Relaxed);
        for off in [OFF_ENGINE_SLEEPING, OFF_CLIENT_SLEEPING, OFF_ENGINE_BLOCKED] {
            region.atomic_u32(off).store(0, Ordering::Relaxed);
        }
        self.requests.init(region);
        self.responses.init(region);
    }

    /// The layout of a port region created by an engine (a client attaching to it).
    pub fn read(region: &SharedRegion) -> Result<Self> {
        if region.len() < RINGS_AT
            || region.atomic_u32(0).load(Ordering::Acquire) != MAGIC
            || region.atomic_u32(4).load(Ordering::Acquire) != VERSION
        {
            return Err(EngineError::Corrupt("not an aqueduct port, or another version"));
        }
        let layout = Self::new(region.atomic_u64(OFF_CAPACITY).load(Ordering::Acquire) as usize);
        if region.len() < layout.total_bytes() {
            return Err(EngineError::Corrupt("port region smaller than its layout"));
        }
        Ok(layout)
    }
}

fn flag(region: &SharedRegion, off: usize) -> &AtomicU32 {
    region.atomic_u32(off)
}

/// Why a task submitted through a port failed: the `kind` of a [`TAG_FAILED`] record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FailureKind {
    /// The handler raised; the detail is the pickled exception.
    Handler = 0,
    Expired = 1,
    /// The worker holding the task died; `pid` says which.
    WorkerDied = 2,
    /// The flow stopped (or is stopping) without finishing the task.
    Stopped = 3,
    ArenaExhausted = 4,
    /// The engine refused the request (a step that does not exist, a corrupt descriptor); the
    /// detail says why.
    Rejected = 5,
    /// The task's batch ran past its step's `handle_timeout`; `pid` is the worker killed for it.
    HandlerTimeout = 6,
}

impl FailureKind {
    /// The name the Python layer uses for it (as in the engine's own outcomes).
    pub fn name(self) -> &'static str {
        match self {
            Self::Handler => "handler",
            Self::Expired => "expired",
            Self::WorkerDied => "died",
            Self::Stopped => "stopped",
            Self::ArenaExhausted => "shm_exhausted",
            Self::Rejected => "rejected",
            Self::HandlerTimeout => "handler_timeout",
        }
    }
}

impl TryFrom<u8> for FailureKind {
    type Error = EngineError;
    fn try_from(v: u8) -> Result<Self> {
        Ok(match v {
            0 => Self::Handler,
            1 => Self::Expired,
            2 => Self::WorkerDied,
            3 => Self::Stopped,
            4 => Self::ArenaExhausted,
            5 => Self::Rejected,
            6 => Self::HandlerTimeout,
            _ => return Err(EngineError::Protocol("unknown failure kind")),
        })
    }
}

/// A response as a client reads it. Pool references it names (an extent body, the buffers)
/// are the client's own: it must release them.
#[derive(Debug)]
pub enum Response<'a> {
    Done { task_id: u64, body: Payload<'a>, bufs: Vec<BufRef> },
    Part { task_id: u64, body: Payload<'a>, bufs: Vec<BufRef> },
    Failed { task_id: u64, kind: FailureKind, step: u16, pid: u32, detail: Option<Payload<'a>> },
}

/// Decodes the buffer table that follows a header in `rest`; returns the buffers and what
/// follows the table.
fn buffer_table(nbufs: u16, rest: &[u8]) -> Result<(Vec<BufRef>, &[u8])> {
    let len = nbufs as usize * BufRef::WIRE_LEN;
    let table = rest.get(..len).ok_or(EngineError::Protocol("record shorter than its buffer table"))?;
    let bufs = table.chunks_exact(BufRef::WIRE_LEN).map(BufRef::decode).collect::<Result<Vec<_>>>()?;
    Ok((bufs, &rest[len..]))
}

/// A record's body: the header's extent if it names one, else the inline bytes.
fn body_of(extent: Option<Extent>, inline: &[u8]) -> Payload<'_> {
    match extent {
        Some(ext) => Payload::Extent(ext),
        None => Payload::Inline(inline),
    }
}

/// The client's task id that a [`TAG_CANCEL`] or [`TAG_PART_TAKEN`] record carries.
fn task_id_record(payload: &[u8], short: &'static str) -> Result<u64> {
    let id = payload.get(..8).ok_or(EngineError::Protocol(short))?;
    Ok(u64::from_le_bytes(id.try_into().expect("8 bytes")))
}

fn encode_table(bufs: &[BufRef]) -> Vec<u8> {
    bufs.iter().flat_map(|b| b.encode()).collect()
}

// ------------------------------------------------------------------------------------ engine

/// A task the engine took from a port: whom to answer, and what to count it under.
#[derive(Clone, Copy, Debug)]
pub struct Remote {
    pub port: usize,
    /// The client's id for the task.
    pub client_id: u64,
    /// The step it entered and its priority.
    pub step: u16,
    pub priority: u8,
}

/// The engine's end of one port.
pub struct EnginePort {
    region: Arc<SharedRegion>,
    requests: Consumer,
    responses: Producer,
    bell: Doorbell,
    /// The client's process index in the pool.
    pool_index: u32,
    /// The client's task ids of tasks in the hub, and their hub ids.
    tasks: HashMap<u64, u64>,
    /// Receipts of the parts sent for each streaming task (by the client's id) that its
    /// caller has not taken yet.
    parts_out: HashMap<u64, VecDeque<PartReceipt>>,
    /// Receipts of parts that could not be sent (no room in the pool), given back to the hub
    /// at the next drain.
    unsent_parts: Vec<PartReceipt>,
    /// Responses that did not fit in the ring yet, in order (their references already
    /// transferred to the client).
    overflow: VecDeque<(u32, Vec<u8>)>,
    /// The step whose queue the request at the head of the ring waits for room in.
    waiting_for_room: Option<usize>,
    /// Responses written since the last publish.
    wrote: bool,
    scratch: Vec<u8>,
}

impl EnginePort {
    /// Creates a port region (a memfd) with rings of `capacity` bytes for the client that acts
    /// as process `pool_index` of the pool.
    pub fn create(capacity: usize, pool_index: u32) -> Result<Self> {
        let layout = PortLayout::new(capacity);
        let region = Arc::new(SharedRegion::create("aqueduct-port", layout.total_bytes())?);
        Self::with_region(region, layout, pool_index)
    }

    /// A port over heap memory, for tests that play the client in the same process.
    pub fn create_in_heap(capacity: usize, pool_index: u32) -> Result<Self> {
        let layout = PortLayout::new(capacity);
        Self::with_region(Arc::new(SharedRegion::heap(layout.total_bytes())), layout, pool_index)
    }

    fn with_region(region: Arc<SharedRegion>, layout: PortLayout, pool_index: u32) -> Result<Self> {
        layout.init(&region);
        // The engine may be asleep already: until its next `prepare_sleep`, clients must ring.
        flag(&region, OFF_ENGINE_SLEEPING).store(1, Ordering::SeqCst);
        Ok(Self {
            requests: Consumer::attach(region.clone(), layout.requests)?,
            responses: Producer::attach(region.clone(), layout.responses)?,
            region,
            bell: Doorbell::new()?,
            pool_index,
            tasks: HashMap::default(),
            parts_out: HashMap::default(),
            unsent_parts: Vec::new(),
            overflow: VecDeque::new(),
            waiting_for_room: None,
            wrote: false,
            scratch: Vec::new(),
        })
    }

    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    /// The eventfd the client's event loop watches.
    pub fn bell(&self) -> &Doorbell {
        &self.bell
    }

    pub fn pool_index(&self) -> u32 {
        self.pool_index
    }

    /// Hub ids of this client's tasks in flight.
    pub fn hub_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.tasks.values().copied()
    }

    /// Whether requests wait in the ring (perhaps for room in their queue).
    pub fn has_requests(&mut self) -> bool {
        self.requests.has_data()
    }

    /// Whether requests wait that the engine can take now: a request waiting for room in its
    /// queue does not keep the engine awake (the completion that makes room wakes it).
    pub fn has_takeable_requests(&mut self, hub: &Hub) -> bool {
        self.requests.has_data() && self.waiting_for_room.is_none_or(|step| hub.has_room(step))
    }

    /// Raises or lowers the flag that makes the client ring the engine's doorbell.
    pub fn set_engine_sleeping(&self, sleeping: bool) {
        flag(&self.region, OFF_ENGINE_SLEEPING).store(u32::from(sleeping), Ordering::SeqCst);
    }

    /// Takes up to `max` requests that can enter the hub now: tasks are queued (and `remote`
    /// learns `hub id -> (port, client id)`), cancellations applied. A task whose step queue is
    /// full stays in the ring, and so does everything after it, until a later drain. Returns how
    /// many records were taken.
    pub fn drain(
        &mut self,
        port: usize,
        hub: &mut Hub,
        remote: &mut HashMap<u64, Remote>,
        max: usize,
    ) -> Result<usize> {
        self.waiting_for_room = None;
        for receipt in self.unsent_parts.drain(..) {
            hub.release_part(receipt);
        }
        let mut taken = 0;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| -> Result<()> {
            while taken < max {
                let Some(rec) = self.requests.peek()? else { break };
                match rec.tag {
                    TAG_SUBMIT => {
                        let mut h = [0u8; HEADER_LEN];
                        if rec.len < HEADER_LEN {
                            return Err(EngineError::Protocol("request shorter than its header"));
                        }
                        self.region.read(rec.offset, &mut h)?;
                        let header = TaskHeader::decode(&h)?;
                        let step = header.route as usize;
                        if hub.is_accepting() && step < hub.step_count() && !hub.has_room(step) {
                            self.waiting_for_room = Some(step);
                            break;
                        }
                        self.requests.read_payload(&rec, &mut scratch)?;
                        self.requests.consume(&rec);
                        taken += 1;
                        self.submit(port, hub, remote, header, &scratch[HEADER_LEN..])?;
                    }
                    TAG_CANCEL => {
                        self.requests.read_payload(&rec, &mut scratch)?;
                        self.requests.consume(&rec);
                        taken += 1;
                        let client_id = task_id_record(&scratch, "short cancel record")?;
                        self.parts_out.remove(&client_id);
                        if let Some(hub_id) = self.tasks.remove(&client_id) {
                            remote.remove(&hub_id);
                            hub.cancel(hub_id);
                        }
                    }
                    TAG_PART_TAKEN => {
                        self.requests.read_payload(&rec, &mut scratch)?;
                        self.requests.consume(&rec);
                        taken += 1;
                        let client_id = task_id_record(&scratch, "short part-taken record")?;
                        let receipt = self.parts_out.get_mut(&client_id).and_then(VecDeque::pop_front);
                        if let Some(receipt) = receipt {
                            hub.release_part(receipt);
                        }
                    }
                    _ => return Err(EngineError::Protocol("unknown record from a port client")),
                }
            }
            Ok(())
        })();
        self.requests.release();
        self.scratch = scratch;
        result.map(|_| taken)
    }

    fn submit(
        &mut self,
        port: usize,
        hub: &mut Hub,
        remote: &mut HashMap<u64, Remote>,
        header: TaskHeader,
        rest: &[u8],
    ) -> Result<()> {
        let arena = hub.arena().clone();
        let client_id = header.task_id;
        let (bufs, inline) = buffer_table(header.nbufs, rest)?;
        // Refuse descriptors outside the pool before taking them over: they stay in the
        // client's row, where reaping it settles them.
        let checked = bufs
            .iter()
            .try_for_each(|b| arena.check_buf(b))
            .and_then(|_| header.extent.map_or(Ok(()), |e| arena.check_buf(&BufRef::whole(e))));
        if let Err(e) = checked {
            return self.fail(
                &arena,
                client_id,
                FailureKind::Rejected,
                NO_STEP,
                0,
                Some(Payload::Inline(e.to_string().as_bytes())),
            );
        }
        for ext in header.extent.iter().copied().chain(bufs.iter().map(BufRef::extent)) {
            arena.adopt(&ext, self.pool_index)?;
        }
        let step = header.route as usize;
        let streamed = header.flags & FLAG_STREAM != 0;
        let submitted = match header.extent {
            Some(ext) => hub.submit_extent(step, header.priority, header.deadline, ext, bufs.clone(), streamed),
            None => {
                let id = hub.reserve_task_id();
                hub.submit_as(id, step, header.priority, header.deadline, inline, bufs.clone(), streamed).map(|()| id)
            }
        };
        match submitted {
            Ok(hub_id) => {
                self.tasks.insert(client_id, hub_id);
                remote.insert(hub_id, Remote { port, client_id, step: header.route, priority: header.priority });
                Ok(())
            }
            Err(e) => {
                for ext in header.extent.iter().copied().chain(bufs.iter().map(BufRef::extent)) {
                    let _ = arena.unhold(&ext);
                }
                let (kind, step) = match e {
                    EngineError::Stopped => (FailureKind::Stopped, NO_STEP),
                    EngineError::ArenaExhausted { .. } => (FailureKind::ArenaExhausted, step as u16),
                    _ => (FailureKind::Rejected, NO_STEP),
                };
                let reason = e.to_string();
                self.fail(&arena, client_id, kind, step, 0, Some(Payload::Inline(reason.as_bytes())))
            }
        }
    }

    /// Answers for one of this port's tasks with the hub's outcome for it. References the
    /// outcome carries pass to the client.
    pub fn respond(&mut self, arena: &Arena, client_id: u64, outcome: Outcome<'_>) -> Result<()> {
        if let Outcome::Part { body, bufs, receipt, .. } = outcome {
            return self.part(arena, client_id, body, bufs, receipt);
        }
        self.tasks.remove(&client_id);
        self.parts_out.remove(&client_id);
        match outcome {
            Outcome::Done { body, bufs, .. } => self.done(arena, client_id, body, bufs),
            Outcome::Failed { failure, .. } => {
                let step = |s: usize| s as u16;
                match failure {
                    Failure::Handler { step: s, body } => {
                        self.fail(arena, client_id, FailureKind::Handler, step(s), 0, Some(body))
                    }
                    Failure::Expired { step: s } => self.fail(arena, client_id, FailureKind::Expired, step(s), 0, None),
                    Failure::WorkerDied { step: s, pid } => {
                        self.fail(arena, client_id, FailureKind::WorkerDied, step(s), pid, None)
                    }
                    Failure::HandlerTimeout { step: s, pid } => {
                        self.fail(arena, client_id, FailureKind::HandlerTimeout, step(s), pid, None)
                    }
                    Failure::Stopped => self.fail(arena, client_id, FailureKind::Stopped, NO_STEP, 0, None),
                    Failure::ArenaExhausted { step: s } => {
                        self.fail(arena, client_id, FailureKind::ArenaExhausted, step(s), 0, None)
                    }
                }
            }
            _ => Err(EngineError::Protocol("a worker event is not a task outcome")),
        }
    }

    fn done(&mut self, arena: &Arena, client_id: u64, body: Payload<'_>, bufs: Vec<BufRef>) -> Result<()> {
        self.result(TAG_DONE, arena, client_id, body, bufs)
    }

    /// A part for a streaming task: sent as a result is, its receipt kept until the client's
    /// caller takes it. A part that cannot be placed (the pool is full) is dropped, with its
    /// receipt given back: the task's result, or its failure, still comes.
    fn part(
        &mut self,
        arena: &Arena,
        client_id: u64,
        body: Payload<'_>,
        bufs: Vec<BufRef>,
        receipt: PartReceipt,
    ) -> Result<()> {
        self.parts_out.entry(client_id).or_default().push_back(receipt);
        self.result(TAG_PART, arena, client_id, body, bufs)
    }

    fn result(&mut self, tag: u32, arena: &Arena, client_id: u64, body: Payload<'_>, bufs: Vec<BufRef>) -> Result<()> {
        let mut header = TaskHeader::new(client_id, 0, Nanos::ZERO);
        header.nbufs = bufs.len() as u16;
        let table = encode_table(&bufs);
        let inline = match self.place(arena, body, HEADER_LEN + table.len()) {
            Ok(Placed::Inline(b)) => Some(b),
            Ok(Placed::Extent(ext)) => {
                header.extent = Some(ext);
                None
            }
            Err(_) => {
                for b in &bufs {
                    let _ = arena.unhold(&b.extent());
                }
                if tag == TAG_PART {
                    // Dropped: its room is given back at the next drain, and the task's result,
                    // or its failure, still comes.
                    if let Some(receipt) = self.parts_out.get_mut(&client_id).and_then(VecDeque::pop_back) {
                        self.unsent_parts.push(receipt);
                    }
                    return Ok(());
                }
                return self.fail(arena, client_id, FailureKind::ArenaExhausted, NO_STEP, 0, None);
            }
        };
        for b in &bufs {
            arena.transfer(&b.extent(), self.pool_index)?;
        }
        self.write(tag, &[&header.encode(), &table, inline.as_deref().unwrap_or_default()])
    }

    fn fail(
        &mut self,
        arena: &Arena,
        client_id: u64,
        kind: FailureKind,
        step: u16,
        pid: u32,
        detail: Option<Payload<'_>>,
    ) -> Result<()> {
        let mut header = TaskHeader::new(client_id, 0, Nanos::ZERO);
        let mut prefix = [0u8; FAILURE_PREFIX];
        prefix[0] = kind as u8;
        prefix[2..4].copy_from_slice(&step.to_le_bytes());
        prefix[4..8].copy_from_slice(&pid.to_le_bytes());
        let inline = match detail.map(|d| self.place(arena, d, HEADER_LEN + FAILURE_PREFIX)) {
            None => None,
            Some(Ok(Placed::Inline(b))) => Some(b),
            Some(Ok(Placed::Extent(ext))) => {
                header.extent = Some(ext);
                None
            }
            // No room for a large exception description: the failure itself still goes back.
            Some(Err(_)) => None,
        };
        self.write(TAG_FAILED, &[&header.encode(), &prefix, inline.as_deref().unwrap_or_default()])
    }

    /// Puts a body where the client can read it: inline when it fits in a response record after
    /// `used` bytes, else in the pool (the reference moves to the client).
    fn place(&self, arena: &Arena, body: Payload<'_>, used: usize) -> Result<Placed> {
        let max = self.responses.max_payload().saturating_sub(used);
        match body {
            Payload::Inline(b) if b.len() <= max => Ok(Placed::Inline(b.to_vec())),
            Payload::Inline(b) => {
                let ext = arena.alloc(b.len()).ok_or(EngineError::ArenaExhausted {
                    requested: b.len(),
                    capacity: arena.layout().capacity_bytes(),
                })?;
                arena.write(&ext, 0, b)?;
                arena.transfer(&ext, self.pool_index)?;
                Ok(Placed::Extent(ext))
            }
            Payload::Extent(ext) => {
                arena.transfer(&ext, self.pool_index)?;
                Ok(Placed::Extent(ext))
            }
        }
    }

    fn write(&mut self, tag: u32, parts: &[&[u8]]) -> Result<()> {
        if self.overflow.is_empty() && self.responses.try_write(tag, parts)? {
            self.wrote = true;
            return Ok(());
        }
        self.overflow.push_back((tag, parts.concat()));
        self.write_overflow()
    }

    /// Writes kept responses while the ring has room. While some remain, `engine_blocked` stays
    /// raised so that the client rings once it has made room: the client lowers the flag when
    /// it rings, so it is raised again after every attempt that leaves responses behind, and
    /// the ring is checked once more after raising it (the client may have made room just
    /// before).
    fn write_overflow(&mut self) -> Result<()> {
        let blocked = flag(&self.region, OFF_ENGINE_BLOCKED);
        let mut raised = false;
        loop {
            while let Some((tag, bytes)) = self.overflow.front() {
                if !self.responses.try_write(*tag, &[bytes])? {
                    break;
                }
                self.wrote = true;
                self.overflow.pop_front();
            }
            if self.overflow.is_empty() {
                blocked.store(0, Ordering::SeqCst);
                return Ok(());
            }
            if raised {
                return Ok(());
            }
            blocked.store(1, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            raised = true;
        }
    }

    /// Publishes the responses written since the last call and rings the client if it sleeps.
    pub fn publish(&mut self) -> Result<()> {
        if !self.overflow.is_empty() {
            self.write_overflow()?;
        }
        if !self.wrote {
            return Ok(());
        }
        self.wrote = false;
        self.responses.publish_quietly();
        std::sync::atomic::fence(Ordering::SeqCst);
        let sleeping = flag(&self.region, OFF_CLIENT_SLEEPING);
        if sleeping.load(Ordering::SeqCst) != 0 && sleeping.swap(0, Ordering::SeqCst) != 0 {
            self.bell.ring();
        }
        Ok(())
    }
}

enum Placed {
    Inline(Vec<u8>),
    Extent(Extent),
}

// ------------------------------------------------------------------------------------ client

/// A client's end of a port.
pub struct PortClient {
    region: Arc<SharedRegion>,
    requests: Producer,
    responses: Consumer,
    arena: Arc<Arena>,
    engine_bell: Doorbell,
    bell: Doorbell,
    inline_max: usize,
    scratch: Vec<u8>,
}

impl PortClient {
    /// Attaches to a port region; `arena` is this process's handle on the pool (as the process
    /// index the engine gave it), `engine_bell` the engine's doorbell, `bell` the port's.
    pub fn attach(region: Arc<SharedRegion>, arena: Arc<Arena>, engine_bell: Doorbell, bell: Doorbell) -> Result<Self> {
        let layout = PortLayout::read(&region)?;
        let requests = Producer::attach(region.clone(), layout.requests)?;
        let responses = Consumer::attach(region.clone(), layout.responses)?;
        let inline_max = (requests.max_payload() - HEADER_LEN).min(64 << 10);
        // Sleeping is the client's normal state: it never spins, its event loop watches the bell.
        flag(&region, OFF_CLIENT_SLEEPING).store(1, Ordering::SeqCst);
        Ok(Self { region, requests, responses, arena, engine_bell, bell, inline_max, scratch: Vec::new() })
    }

    pub fn bell(&self) -> &Doorbell {
        &self.bell
    }

    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    /// Writes a task for `step` (not yet published: see [`PortClient::flush`]). On success the
    /// message takes over this process's reference on each of `bufs`. Returns `Ok(false)` when
    /// the request ring is full; the caller keeps its references and retries after responses
    /// came back.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        task_id: u64,
        step: u16,
        priority: u8,
        deadline: Nanos,
        body: &[u8],
        bufs: &[BufRef],
        streamed: bool,
    ) -> Result<bool> {
        let mut header = TaskHeader::new(task_id, priority, deadline);
        header.route = step;
        if streamed {
            header.flags |= FLAG_STREAM;
        }
        header.nbufs =
            u16::try_from(bufs.len()).map_err(|_| EngineError::Config("more than 65535 out-of-band buffers".into()))?;
        let table = encode_table(bufs);
        if body.len() + table.len() <= self.inline_max {
            return self.requests.try_write(TAG_SUBMIT, &[&header.encode(), &table, body]);
        }
        let ext = self.arena.alloc(body.len()).ok_or(EngineError::ArenaExhausted {
            requested: body.len(),
            capacity: self.arena.layout().capacity_bytes(),
        })?;
        self.arena.write(&ext, 0, body)?;
        header.extent = Some(ext);
        let written = self.requests.try_write(TAG_SUBMIT, &[&header.encode(), &table]);
        if !matches!(written, Ok(true)) {
            let _ = self.arena.unhold(&ext);
        }
        written
    }

    /// Asks the engine to drop a task (its result, if already on its way, is to be ignored).
    /// `Ok(false)`: the ring is full; retry later.
    pub fn cancel(&mut self, task_id: u64) -> Result<bool> {
        self.requests.try_write(TAG_CANCEL, &[&task_id.to_le_bytes()])
    }

    /// Tells the engine the caller took one part of a streaming task, so that its worker may
    /// send another. `Ok(false)`: the ring is full; retry later.
    pub fn part_taken(&mut self, task_id: u64) -> Result<bool> {
        self.requests.try_write(TAG_PART_TAKEN, &[&task_id.to_le_bytes()])
    }

    /// Publishes what was written and rings the engine if it sleeps.
    pub fn flush(&mut self) {
        self.requests.publish_quietly();
        std::sync::atomic::fence(Ordering::SeqCst);
        let sleeping = flag(&self.region, OFF_ENGINE_SLEEPING);
        if sleeping.load(Ordering::SeqCst) != 0 && sleeping.swap(0, Ordering::SeqCst) != 0 {
            self.engine_bell.ring();
        }
    }

    /// Reads every published response. Returns how many there were.
    pub fn poll(&mut self, out: &mut dyn FnMut(Response<'_>)) -> Result<usize> {
        self.bell.clear();
        let mut n = 0;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| -> Result<()> {
            while let Some(rec) = self.responses.peek()? {
                self.responses.read_payload(&rec, &mut scratch)?;
                self.responses.consume(&rec);
                let header = TaskHeader::decode(&scratch)?;
                let rest = &scratch[HEADER_LEN..];
                match rec.tag {
                    TAG_DONE => {
                        let (bufs, inline) = buffer_table(header.nbufs, rest)?;
                        out(Response::Done { task_id: header.task_id, body: body_of(header.extent, inline), bufs });
                    }
                    TAG_PART => {
                        let (bufs, inline) = buffer_table(header.nbufs, rest)?;
                        out(Response::Part { task_id: header.task_id, body: body_of(header.extent, inline), bufs });
                    }
                    TAG_FAILED => {
                        let prefix = rest.get(..FAILURE_PREFIX).ok_or(EngineError::Protocol("short failure record"))?;
                        let kind = FailureKind::try_from(prefix[0])?;
                        let step = u16::from_le_bytes([prefix[2], prefix[3]]);
                        let pid = u32::from_le_bytes(prefix[4..8].try_into().unwrap());
                        let inline = &rest[FAILURE_PREFIX..];
                        let detail =
                            (header.extent.is_some() || !inline.is_empty()).then(|| body_of(header.extent, inline));
                        out(Response::Failed { task_id: header.task_id, kind, step, pid, detail });
                    }
                    _ => return Err(EngineError::Protocol("unknown record from the engine")),
                }
                n += 1;
            }
            Ok(())
        })();
        self.responses.release();
        self.scratch = scratch;
        std::sync::atomic::fence(Ordering::SeqCst);
        let blocked = flag(&self.region, OFF_ENGINE_BLOCKED);
        if blocked.load(Ordering::SeqCst) != 0 && blocked.swap(0, Ordering::SeqCst) != 0 {
            self.engine_bell.ring();
        }
        result.map(|_| n)
    }

    /// Raises the flag that makes the engine ring the bell. Returns `false` when responses
    /// arrived meanwhile: poll again instead of sleeping.
    pub fn prepare_sleep(&mut self) -> bool {
        let sleeping = flag(&self.region, OFF_CLIENT_SLEEPING);
        sleeping.store(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        !self.responses.has_data()
    }

    /// The largest body sent inline; larger ones go through the pool.
    pub fn inline_max(&self) -> usize {
        self.inline_max
    }
}
