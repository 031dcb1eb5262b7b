#![forbid(unsafe_code)]
//! The hub: every step's queue, batching, priorities, deadlines and the record of which worker
//! holds which task, in the main process.
//!
//! Workers never talk to each other. The hub sends each formed batch to exactly one idle
//! worker through that worker's inbound ring, and reads results from each worker's outbound
//! ring; a result names the step the task goes to next (the worker evaluated the steps'
//! conditions), and the hub either queues it there or hands it back to the caller. Because
//! every task passes through here:
//! - a batch is filled by the hub and then owned by one worker (`nprocs > 1` batches exactly);
//! - priorities and the starvation guard apply across all of a step's waiting tasks;
//! - expired tasks are dropped before dispatch and counted;
//! - on a worker's death the hub knows exactly which tasks it held, fails only those, and
//!   frees its shared memory.
//!
//! The hub has no thread. Its owner drives it: [`Hub::submit`] dispatches inline, and
//! [`Hub::poll`] drains the outbound rings, routes, dispatches and reports outcomes. Between
//! polls the owner sleeps on the doorbell eventfd (see [`crate::reactor`]), which workers only
//! ring when the hub announced it was going to sleep ([`Hub::prepare_sleep`]).
//!
//! # Pipelining
//! A worker that is busy while a *full* batch waits for it is sent that batch ahead of time (at
//! most [`pipeline_depth`] batches outstanding per worker), so it starts the next batch the
//! moment it finishes one instead of waiting for the hub's next poll. Partial batches are never
//! sent ahead: they still wait for an idle worker, so pipelining never makes batches smaller.
//! Only tasks of the highest priority level are sent ahead, so pipelining never lets a task
//! overtake a more urgent one. Through the slot's [`crate::gate::BatchGate`] the hub can take
//! back a batch the worker has not begun: a cancelled task in it is then dropped before any
//! handler sees it, and when the worker dies the batches it never began go back to the front
//! of the queue instead of failing. When a worker of a step falls idle while another worker of
//! it holds a batch it has not begun (it is still busy with an earlier, slow one), the hub takes
//! that batch back and gives it to the idle worker: a batch never waits behind a busy worker
//! while another worker of its step has nothing to do.
//!
//! # Hung workers
//! A step may set `handle_timeout`. The hub records when each worker's oldest batch could have
//! begun (when it was sent, or when the batch before it finished, whichever is later), wakes
//! itself through [`Hub::next_timer`] at that time plus the limit, and then reports the slot in
//! [`Hub::take_overdue`]; the engine kills the process, and on its exit the tasks of the batch
//! it was running fail with [`Failure::HandlerTimeout`] rather than [`Failure::WorkerDied`].
//!
//! # Bounds
//! A step holds at most `queue_capacity` submitted tasks waiting for it, counting both its queue
//! and the tasks sent ahead to busy workers (they are waiting just the same: the bound a user
//! sets is the bound they get, whatever the pipelining). Tasks forwarded from a batch
//! that already ran are never refused (refusing would lose them); instead no step is sent a new
//! batch while a step after it is at capacity, so the overshoot is bounded by the batches
//! already outstanding upstream, plus those a dead worker hands back: at most
//! [`pipeline_depth`] batches per worker.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::batch::{self, Decision};
use crate::clock::Nanos;
use crate::error::{EngineError, Result};
use crate::layout::FlowLayout;
use crate::message::*;
use crate::metrics::{Histogram, Series};
use crate::prio::PriorityQueue;
use crate::shm::event::SpinPolicy;
use crate::shm::ring::RECORD_HEADER;
use crate::shm::{Arena, BufRef, Consumer, Extent, Producer, SharedRegion};
use crate::stream::PartReceipt;

/// One step as the hub sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepSpec {
    pub nprocs: usize,
    pub batch_size: usize,
    pub batch_timeout: Duration,
    /// Tasks waiting for the step: queued in the hub, or sent ahead to a worker that has not
    /// begun their batch (see "Bounds").
    pub queue_capacity: usize,
    /// How long one batch may run in a worker; past it the worker is killed and replaced, and
    /// the batch's tasks fail with [`Failure::HandlerTimeout`]. `None`: no limit.
    pub handle_timeout: Option<Duration>,
}

#[derive(Clone, Debug)]
pub struct HubConfig {
    pub steps: Vec<StepSpec>,
    /// Number of priority levels; a task's priority is clamped to `priorities - 1`.
    pub priorities: usize,
    /// See [`crate::prio`]: one dispatch in `fair_every` goes to a waiting lower level.
    pub fair_every: u32,
    /// Bytes per ring (two rings per worker).
    pub ring_capacity: usize,
    /// Bodies above this size travel through the shared-memory pool instead of the ring.
    pub inline_max: usize,
    /// Record metrics (histograms, sample rings); off, recording costs nothing.
    pub metrics: bool,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            steps: Vec::new(),
            priorities: 1,
            fair_every: 10,
            ring_capacity: 1 << 20,
            inline_max: 64 << 10,
            metrics: true,
        }
    }
}

impl HubConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(m));
        if self.steps.is_empty() {
            return bad("a flow needs at least one step".into());
        }
        if !(1..=255).contains(&self.priorities) {
            return bad(format!("queue_priorities must be between 1 and 255, got {}", self.priorities));
        }
        if self.fair_every == 1 {
            return bad("fair_every must be 0 (strict priority) or at least 2".into());
        }
        for (i, s) in self.steps.iter().enumerate() {
            if s.nprocs < 1 {
                return bad(format!("step {}: nprocs must be >= 1, got {}", i + 1, s.nprocs));
            }
            if s.batch_size < 1 {
                return bad(format!("step {}: batch_size must be >= 1, got {}", i + 1, s.batch_size));
            }
            if s.batch_size > self.ring_capacity / 128 {
                return bad(format!("step {}: batch_size {} is too large for the ring", i + 1, s.batch_size));
            }
            if s.queue_capacity < 1 {
                return bad(format!("step {}: queue size must be >= 1", i + 1));
            }
        }
        let slots: usize = self.steps.iter().map(|s| s.nprocs).sum();
        if slots > 4096 {
            return bad(format!("{slots} worker processes is more than the engine supports (4096)"));
        }
        Ok(())
    }

    pub fn layout(&self) -> FlowLayout {
        let slots = self.steps.iter().map(|s| s.nprocs).sum();
        let positions = self.steps.iter().map(|s| s.batch_size).max().unwrap_or(1);
        FlowLayout::new(slots, self.ring_capacity, positions)
    }
}

/// A task body handed out by the hub.
#[derive(Debug)]
pub enum Payload<'a> {
    Inline(&'a [u8]),
    /// In the pool. The receiver owns one reference (the main process's) and must release it.
    Extent(Extent),
}

impl Payload<'_> {
    /// The bytes, copied out; an extent's reference is released (`arena`: the receiver's handle
    /// on the pool).
    pub fn into_vec(self, arena: &Arena) -> Vec<u8> {
        match self {
            Payload::Inline(b) => b.to_vec(),
            Payload::Extent(ext) => {
                let mut out = vec![0; ext.len as usize];
                let _ = arena.read(&ext, 0, &mut out);
                let _ = arena.unhold(&ext);
                out
            }
        }
    }
}

#[derive(Debug)]
pub enum Failure<'a> {
    /// The handler of `step` raised; the body is the worker's description of the exception.
    Handler { step: usize, body: Payload<'a> },
    /// The deadline passed before a handler of `step` saw the task.
    Expired { step: usize },
    /// The worker that held the task died.
    WorkerDied { step: usize, pid: u32 },
    /// The batch holding the task ran past the step's `handle_timeout`; its worker was killed.
    HandlerTimeout { step: usize, pid: u32 },
    /// The flow was stopped without finishing the task.
    Stopped,
    /// A forwarded body did not fit in the shared-memory pool.
    ArenaExhausted { step: usize },
}

#[derive(Debug)]
pub enum Outcome<'a> {
    /// The task is finished. `bufs` are its out-of-band buffers in the pool; the receiver owns
    /// one reference (the main process's) on each.
    Done {
        task_id: u64,
        body: Payload<'a>,
        bufs: Vec<BufRef>,
    },
    Failed {
        task_id: u64,
        failure: Failure<'a>,
    },
    /// A partial result of a task whose caller streams (see [`crate::stream`]); the task stays
    /// in flight. The receiver owns one reference on each buffer (and on an extent body), and
    /// gives `receipt` back with [`Hub::release_part`] once its caller has taken the part.
    Part {
        task_id: u64,
        body: Payload<'a>,
        bufs: Vec<BufRef>,
        receipt: PartReceipt,
    },
    WorkerReady {
        slot: usize,
        step: usize,
        pid: u32,
    },
    WorkerStartFailed {
        slot: usize,
        step: usize,
        pid: u32,
        message: String,
    },
    WorkerExited {
        slot: usize,
        step: usize,
        pid: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// No process.
    Vacant,
    /// Spawned, `on_start` running.
    Starting,
    Idle,
    Busy,
    /// Told to stop; exits after its batch.
    Stopping,
    Dead,
}

#[derive(Debug)]
enum Body {
    Inline(Vec<u8>),
    Extent(Extent),
}

#[derive(Debug)]
struct Queued {
    id: u64,
    priority: u8,
    deadline: Nanos,
    arrived: Nanos,
    body: Body,
    /// Out-of-band buffers; the hub holds one reference on each for as long as it has the task.
    bufs: Vec<BufRef>,
    /// [`FLAG_STREAM`] when the caller reads partial results.
    flags: u8,
}

/// Batches a worker of a step with `batch_size` may have outstanding: the one it handles and
/// the ones waiting in its ring. Small batches get a deeper pipeline (up to 8 tasks ahead), so a
/// worker of a `batch_size=1` step rarely runs dry, and parks, between two polls of the hub.
pub fn pipeline_depth(batch_size: usize) -> usize {
    8usize.div_ceil(batch_size).clamp(2, MAX_PIPELINE_DEPTH)
}

/// The deepest pipeline of any step (see [`pipeline_depth`]).
pub const MAX_PIPELINE_DEPTH: usize = 8;

/// A task in a batch sent to a worker. The body is kept until the batch is done, so that a
/// batch the worker never began can go back to the queue if the worker dies.
struct Held {
    task: Queued,
    resolved: bool,
}

struct SentBatch {
    /// The worker's batch counter value for this batch (compared with `batches_started`).
    seq: u64,
    tasks: Vec<Held>,
    /// When the batch could have begun at the earliest: when it was sent, or when the batch
    /// before it was reported done. Set once it is the slot's oldest batch.
    front_since: Option<Nanos>,
}

struct Slot {
    step: usize,
    state: SlotState,
    pid: u32,
    /// The worker's process index in the pool (whose references it holds).
    pool_index: u32,
    inbound: Producer,
    outbound: Consumer,
    /// Outstanding batches, oldest first.
    batches: VecDeque<SentBatch>,
    sent: u64,
    /// Batches written to the inbound ring but not yet published (see `publish_batches`).
    unpublished: bool,
    /// The worker was reported overdue (its batch ran past `handle_timeout`) and is to be killed.
    overran: bool,
    /// Told to stop while its inbound ring was full: the stop record goes out once there is room.
    stop_pending: bool,
    /// A replacement reported ready before the front end registered it
    /// ([`Hub::worker_spawned`]): possible when the engine is polled from another thread than
    /// the one that starts processes (the HTTP front's poller).
    ready_before_spawn: bool,
    /// Bumped when the slot's worker is gone: receipts of its parts then change nothing.
    epoch: u32,
}

impl Slot {
    fn held(&self) -> impl Iterator<Item = &Held> {
        self.batches.iter().flat_map(|b| b.tasks.iter())
    }

    /// Tasks sent ahead: in batches after the oldest, which the worker has not begun.
    fn tasks_ahead(&self) -> usize {
        self.batches.iter().skip(1).map(|b| b.tasks.len()).sum()
    }
}

/// Counters per step, read by metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    pub batches: u64,
    pub tasks: u64,
    pub expired: u64,
    pub failed: u64,
    pub worker_deaths: u64,
}

/// What the hub records about one step (see [`crate::metrics`]).
#[derive(Clone, Debug, Default)]
pub struct StepSeries {
    /// Tasks per batch sent.
    pub batch_size: Series,
    /// Microseconds the oldest task of a batch waited in the queue before the batch left.
    pub batch_wait_us: Series,
}

/// What the hub records about the results of one step going to one destination at one priority.
#[derive(Clone, Debug, Default)]
pub struct RouteSeries {
    /// Microseconds from the worker writing the result to the hub reading it.
    pub transfer_us: Series,
    /// Bytes of the result (body and buffers).
    pub size: Series,
}

/// A snapshot of a flow's metrics (see [`Hub::metrics`]).
#[derive(Clone, Debug, Default)]
pub struct FlowMetrics {
    pub steps: Vec<StepMetrics>,
    pub routes: Vec<RouteMetrics>,
}

/// Results of one step going to one destination at one priority.
#[derive(Clone, Debug, Default)]
pub struct RouteMetrics {
    pub step: usize,
    /// The next step, or [`ROUTE_DONE`] for the caller.
    pub to: u16,
    pub priority: u8,
    pub transfer_us: Histogram,
    pub transfer_samples: Vec<u32>,
    pub size: Histogram,
    pub size_samples: Vec<u32>,
}

#[derive(Clone, Debug, Default)]
pub struct StepMetrics {
    /// Per worker series ([`crate::metrics::WORKER_SERIES`]), summed over the step's workers:
    /// handle time per batch (µs), transfer time from the hub (µs), task size (bytes).
    pub worker: [Histogram; 3],
    /// New samples of the worker series since the last draining snapshot.
    pub worker_samples: [Vec<u32>; 3],
    pub batch_size: Histogram,
    pub batch_size_samples: Vec<u32>,
    pub batch_wait_us: Histogram,
    pub batch_wait_samples: Vec<u32>,
    /// Tasks waiting for the step (queued or sent ahead: see [`Hub::waiting`]).
    pub queue_len: usize,
    pub stats: StepStats,
}

struct Step {
    spec: StepSpec,
    series: StepSeries,
    queue: PriorityQueue<Queued>,
    /// Idle slots, most recently idle last: it is the likeliest still spinning, so it wakes
    /// fastest.
    idle: Vec<usize>,
    slots: Range<usize>,
    timer: Option<Nanos>,
    inline_max: usize,
    stats: StepStats,
}

pub struct Hub {
    region: Arc<SharedRegion>,
    layout: FlowLayout,
    arena: Arc<Arena>,
    steps: Vec<Step>,
    slots: Vec<Slot>,
    next_id: u64,
    in_flight: usize,
    cancelled: HashSet<u64>,
    deferred: Vec<(u64, Failure<'static>)>,
    scratch: Vec<u8>,
    accepting: bool,
    /// Slots with batches written but not published: publishing once per slot per dispatch
    /// round costs at most one wake-up system call per worker, however many batches it got.
    unpublished: Vec<usize>,
    metrics: bool,
    routes: HashMap<(usize, u16, u8), RouteSeries>,
    /// Per slot and worker series: ring samples already taken.
    worker_seen: Vec<[u32; 3]>,
    /// Slots whose batch ran past the step's `handle_timeout`, for the owner to kill.
    overdue: Vec<usize>,
    priorities: usize,
    /// When the owner last announced it would sleep (`prepare_sleep`), until it polls again: a
    /// doorbell stamp from before it is not a wake-up of this sleep.
    slept_at: Option<Nanos>,
}

impl Hub {
    /// Creates the flow's shared region and the hub that owns its main-process side. Large
    /// payloads go to `pool`, the main process's handle on the shared-memory pool.
    pub fn create(cfg: &HubConfig, pool: Arc<Arena>) -> Result<Self> {
        cfg.validate()?;
        let layout = cfg.layout();
        let region = Arc::new(SharedRegion::create("aqueduct-flow", layout.total_bytes())?);
        Self::with_region(cfg, region, pool)
    }

    /// A hub over heap memory, for tests that play the workers in the same process.
    pub fn create_in_heap(cfg: &HubConfig, pool: Arc<Arena>) -> Result<Self> {
        cfg.validate()?;
        let region = Arc::new(SharedRegion::heap(cfg.layout().total_bytes()));
        Self::with_region(cfg, region, pool)
    }

    fn with_region(cfg: &HubConfig, region: Arc<SharedRegion>, arena: Arc<Arena>) -> Result<Self> {
        if arena.me() != 0 {
            return Err(EngineError::Config("the hub needs the main process's handle on the pool".into()));
        }
        let layout = cfg.layout();
        layout.init(&region)?;
        let spin = SpinPolicy::for_host(layout.nslots + 1);
        layout.spin_us(&region).store(spin.to_word(), Ordering::Release);
        layout.metrics_enabled(&region).store(u32::from(cfg.metrics), Ordering::Release);
        let mut slots = Vec::with_capacity(layout.nslots);
        let mut steps = Vec::with_capacity(cfg.steps.len());
        for (step_index, spec) in cfg.steps.iter().enumerate() {
            let first_slot = slots.len();
            for _ in 0..spec.nprocs {
                let slot = slots.len();
                slots.push(Slot {
                    step: step_index,
                    state: SlotState::Vacant,
                    pid: 0,
                    pool_index: 0,
                    inbound: Producer::attach(region.clone(), layout.inbound(slot))?,
                    outbound: Consumer::attach(region.clone(), layout.outbound(slot))?,
                    batches: VecDeque::new(),
                    sent: 0,
                    unpublished: false,
                    overran: false,
                    stop_pending: false,
                    ready_before_spawn: false,
                    epoch: 0,
                });
            }
            // Every outstanding batch of inline bodies must fit in the inbound ring at once: each
            // batch's own record, a stop record, and one task record's worth of padding where
            // the ring wraps (a record never straddles the end). Found by a test writing bodies
            // of exactly this size: without the batch records and the wrap, the last batch could
            // be cut off mid-way.
            let depth = pipeline_depth(spec.batch_size);
            let reserved = 64 + depth * (RECORD_HEADER + 16) + RECORD_HEADER;
            let per_task = layout.ring_capacity.saturating_sub(reserved) / (spec.batch_size * depth + 1);
            let inline_max = per_task.saturating_sub(RECORD_HEADER + HEADER_LEN + 8) / 8 * 8;
            steps.push(Step {
                spec: spec.clone(),
                queue: PriorityQueue::new(cfg.priorities, spec.queue_capacity, cfg.fair_every),
                series: StepSeries::default(),
                idle: Vec::new(),
                slots: first_slot..slots.len(),
                timer: None,
                inline_max: inline_max.min(cfg.inline_max),
                stats: StepStats::default(),
            });
        }
        Ok(Self {
            region,
            layout,
            arena,
            steps,
            slots,
            next_id: 1,
            in_flight: 0,
            cancelled: HashSet::default(),
            deferred: Vec::new(),
            slept_at: None,
            scratch: Vec::new(),
            accepting: true,
            unpublished: Vec::new(),
            metrics: cfg.metrics,
            routes: HashMap::default(),
            worker_seen: vec![[0; 3]; layout.nslots],
            overdue: Vec::new(),
            priorities: cfg.priorities,
        })
    }

    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }
    pub fn layout(&self) -> &FlowLayout {
        &self.layout
    }
    /// How long this flow's processes spin before they park (see [`SpinPolicy::for_host`]).
    pub fn spin(&self) -> SpinPolicy {
        SpinPolicy::from_word(self.layout.spin_us(&self.region).load(Ordering::Acquire))
    }
    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }
    /// Priority levels of every step's queue.
    pub fn priorities(&self) -> usize {
        self.priorities
    }
    pub fn step_count(&self) -> usize {
        self.steps.len()
    }
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }
    pub fn slot_step(&self, slot: usize) -> usize {
        self.slots[slot].step
    }
    pub fn slot_state(&self, slot: usize) -> SlotState {
        self.slots[slot].state
    }
    pub fn slot_pid(&self, slot: usize) -> u32 {
        self.slots[slot].pid
    }
    /// Task ids the worker in `slot` holds right now (its current batch, minus finished ones).
    pub fn held_by(&self, slot: usize) -> Vec<u64> {
        self.slots[slot].held().filter(|h| !h.resolved).map(|h| h.task.id).collect()
    }
    /// Batches sent to the worker of `slot` and not finished yet.
    pub fn batches_outstanding(&self, slot: usize) -> usize {
        self.slots[slot].batches.len()
    }
    pub fn queue_len(&self, step: usize) -> usize {
        self.steps[step].queue.len()
    }
    pub fn queue_capacity(&self, step: usize) -> usize {
        self.steps[step].spec.queue_capacity
    }
    pub fn step_stats(&self, step: usize) -> StepStats {
        self.steps[step].stats
    }
    /// A snapshot of every metric. With `drain`, the sample rings are consumed (the StatsD
    /// exporter is their one reader); histograms and counters only ever grow.
    pub fn metrics(&mut self, drain: bool) -> FlowMetrics {
        let mut out = FlowMetrics::default();
        let waiting: Vec<usize> = (0..self.steps.len()).map(|step| self.waiting(step)).collect();
        for (st, waiting) in self.steps.iter_mut().zip(waiting) {
            let mut m = StepMetrics {
                batch_size: st.series.batch_size.hist.clone(),
                batch_wait_us: st.series.batch_wait_us.hist.clone(),
                queue_len: waiting,
                stats: st.stats,
                ..StepMetrics::default()
            };
            if drain {
                m.batch_size_samples = st.series.batch_size.drain();
                m.batch_wait_samples = st.series.batch_wait_us.drain();
            }
            for slot in st.slots.clone() {
                let wm = self.layout.slot_metrics(&self.region, slot);
                for series in 0..3 {
                    m.worker[series].merge(&wm.hist(series).snapshot());
                    if drain {
                        wm.ring(series).take_new(&mut self.worker_seen[slot][series], &mut m.worker_samples[series]);
                    }
                }
            }
            out.steps.push(m);
        }
        let mut keys: Vec<_> = self.routes.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            let r = self.routes.get_mut(&key).expect("listed");
            let (transfer_samples, size_samples) =
                if drain { (r.transfer_us.drain(), r.size.drain()) } else { (Vec::new(), Vec::new()) };
            out.routes.push(RouteMetrics {
                step: key.0,
                to: key.1,
                priority: key.2,
                transfer_us: r.transfer_us.hist.clone(),
                transfer_samples,
                size: r.size.hist.clone(),
                size_samples,
            });
        }
        out
    }

    /// Tasks submitted and not yet reported back.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
    pub fn is_accepting(&self) -> bool {
        self.accepting
    }
    /// After this, `submit` fails with [`EngineError::Stopped`].
    pub fn stop_accepting(&mut self) {
        self.accepting = false;
    }
    /// Inline-size limit for bodies entering `step`.
    pub fn inline_max(&self, step: usize) -> usize {
        self.steps[step].inline_max
    }

    /// Records that a process was started for `slot`, acting as process `pool_index` in the
    /// pool; it is given work once it reports ready.
    pub fn worker_spawned(&mut self, slot: usize, pid: u32, pool_index: u32) {
        let s = &mut self.slots[slot];
        s.pid = pid;
        s.pool_index = pool_index;
        s.stop_pending = false;
        if std::mem::take(&mut s.ready_before_spawn) {
            s.state = SlotState::Idle;
            self.steps[s.step].idle.push(slot);
        } else {
            s.state = SlotState::Starting;
        }
        self.layout.slot_pid(&self.region, slot).store(pid, Ordering::Release);
    }

    /// Queues a task at `step` and dispatches at once if a worker is idle.
    pub fn submit(&mut self, step: usize, priority: u8, deadline: Nanos, body: &[u8]) -> Result<u64> {
        self.submit_with_bufs(step, priority, deadline, body, Vec::new())
    }

    /// [`Hub::submit`] for a task with out-of-band buffers in the pool. On success the task
    /// takes over one reference (the main process's) on each; on failure the caller keeps them.
    pub fn submit_with_bufs(
        &mut self,
        step: usize,
        priority: u8,
        deadline: Nanos,
        body: &[u8],
        bufs: Vec<BufRef>,
    ) -> Result<u64> {
        let body = self.admit(step, body, &bufs)?;
        self.enqueue_new(step, priority, deadline, body, bufs)
    }

    /// [`Hub::submit_with_bufs`] for a body already in the pool (a task that arrived through a
    /// [`crate::port`]): on success the task takes over the main process's reference on `body`
    /// too.
    pub fn submit_extent(
        &mut self,
        step: usize,
        priority: u8,
        deadline: Nanos,
        body: Extent,
        bufs: Vec<BufRef>,
        streamed: bool,
    ) -> Result<u64> {
        self.inline_limit(step, &bufs)?;
        self.arena.check_buf(&BufRef::whole(body))?;
        let id = self.reserve_task_id();
        let flags = if streamed { FLAG_STREAM } else { 0 };
        self.enqueue(id, step, priority, deadline, Body::Extent(body), bufs, flags).map(|()| id)
    }

    /// Whether `step` exists and its queue has room for one more submitted task.
    pub fn has_room(&self, step: usize) -> bool {
        step < self.steps.len() && !self.step_full(step)
    }

    /// Tasks waiting for `step`: queued, or sent ahead to a worker that has not begun them.
    pub fn waiting(&self, step: usize) -> usize {
        let st = &self.steps[step];
        st.queue.len() + st.slots.clone().map(|i| self.slots[i].tasks_ahead()).sum::<usize>()
    }

    /// Whether `step` holds `queue_capacity` waiting tasks (see "Bounds").
    fn step_full(&self, step: usize) -> bool {
        self.waiting(step) >= self.steps[step].spec.queue_capacity
    }

    fn admit(&mut self, step: usize, body: &[u8], bufs: &[BufRef]) -> Result<Body> {
        let limit = self.inline_limit(step, bufs)?;
        self.to_body(body, limit)
    }

    /// Checks that a task may enter `step` now; returns the inline-size limit for its body.
    fn inline_limit(&self, step: usize, bufs: &[BufRef]) -> Result<usize> {
        if !self.accepting {
            return Err(EngineError::Stopped);
        }
        let st = self.steps.get(step).ok_or_else(|| EngineError::Config(format!("no step {step}")))?;
        if self.step_full(step) {
            return Err(EngineError::QueueFull { step, capacity: st.spec.queue_capacity });
        }
        for b in bufs {
            self.arena.check_buf(b)?;
        }
        st.inline_max.checked_sub(bufs.len() * BufRef::WIRE_LEN).ok_or_else(|| {
            EngineError::Config(format!("a task with {} out-of-band buffers does not fit in a ring record", bufs.len()))
        })
    }

    /// An owned body: inline when small enough, else copied into the pool.
    fn to_body(&self, body: &[u8], inline_limit: usize) -> Result<Body> {
        if body.len() <= inline_limit {
            return Ok(Body::Inline(body.to_vec()));
        }
        let ext = self.arena.alloc(body.len()).ok_or(EngineError::ArenaExhausted {
            requested: body.len(),
            capacity: self.arena.layout().capacity_bytes(),
        })?;
        self.arena.write(&ext, 0, body)?;
        Ok(Body::Extent(ext))
    }

    /// A task id that no other task of this hub has or will get, for a caller that names a
    /// task before it can be queued (the driver's waiting room); see [`Hub::submit_as`].
    pub fn reserve_task_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// [`Hub::submit_with_bufs`] under an id from [`Hub::reserve_task_id`]; `streamed`: the
    /// caller reads the task's partial results (see [`crate::stream`]).
    #[allow(clippy::too_many_arguments)]
    pub fn submit_as(
        &mut self,
        id: u64,
        step: usize,
        priority: u8,
        deadline: Nanos,
        body: &[u8],
        bufs: Vec<BufRef>,
        streamed: bool,
    ) -> Result<()> {
        let body = self.admit(step, body, &bufs)?;
        let flags = if streamed { FLAG_STREAM } else { 0 };
        self.enqueue(id, step, priority, deadline, body, bufs, flags)
    }

    fn enqueue_new(
        &mut self,
        step: usize,
        priority: u8,
        deadline: Nanos,
        body: Body,
        bufs: Vec<BufRef>,
    ) -> Result<u64> {
        let id = self.reserve_task_id();
        self.enqueue(id, step, priority, deadline, body, bufs, 0).map(|()| id)
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &mut self,
        id: u64,
        step: usize,
        priority: u8,
        deadline: Nanos,
        body: Body,
        bufs: Vec<BufRef>,
        flags: u8,
    ) -> Result<()> {
        let now = Nanos::now();
        let q = Queued { id, priority, deadline, arrived: now, body, bufs, flags };
        if self.steps[step].queue.push(priority as usize, q).is_err() {
            unreachable!("fullness checked by the caller");
        }
        self.in_flight += 1;
        self.dispatch(step, now)
    }

    /// Drops a task the caller gave up on. Queued tasks are removed; a task held by a worker is
    /// forgotten when its result comes back. Returns whether the task was still in flight.
    pub fn cancel(&mut self, task_id: u64) -> bool {
        for step in 0..self.steps.len() {
            let removed = self.steps[step].queue.remove_where(|q| q.id == task_id);
            if !removed.is_empty() {
                for q in removed {
                    self.drop_task(&q);
                }
                self.in_flight -= 1;
                return true;
            }
        }
        let Some(slot) = self.slots.iter().position(|s| s.held().any(|h| h.task.id == task_id && !h.resolved)) else {
            return false;
        };
        // Sent ahead and not begun yet: take the batch back, drop the task, requeue the rest.
        let in_last = self.slots[slot].batches.back().is_some_and(|b| b.tasks.iter().any(|h| h.task.id == task_id));
        if in_last {
            if let Some(batch) = self.recall_last(slot) {
                let step = self.slots[slot].step;
                for h in batch.tasks.into_iter().rev() {
                    if h.task.id == task_id {
                        self.drop_task(&h.task);
                    } else {
                        self.requeue(step, h);
                    }
                }
                self.in_flight -= 1;
                // The other tasks of the batch are queued again; send them on.
                let _ = self.dispatch(step, Nanos::now());
                return true;
            }
        }
        if self.cancelled.insert(task_id) {
            self.in_flight -= 1;
            self.mark_cancelled(slot, task_id);
            return true;
        }
        false
    }

    /// Takes back the newest batch sent to `slot` if the worker has not begun it (see
    /// [`crate::gate`]); the slot is idle again if that was its only batch.
    fn recall_last(&mut self, slot: usize) -> Option<SentBatch> {
        let seq = self.slots[slot].batches.back()?.seq;
        if !self.layout.slot_gate(&self.region, slot).recall(seq) {
            return None;
        }
        let s = &mut self.slots[slot];
        let batch = s.batches.pop_back().expect("checked");
        if s.batches.is_empty() && s.state == SlotState::Busy {
            s.state = SlotState::Idle;
            self.steps[s.step].idle.push(slot);
        }
        Some(batch)
    }

    /// With a worker of `step` idle and nothing to send it, takes back a batch sent ahead to a
    /// busy worker (one it has not begun, behind the one it is still running) and queues it
    /// again at the front, for the idle worker. Returns whether it did.
    fn take_back_for_idle(&mut self, step: usize) -> bool {
        if self.steps[step].idle.is_empty() {
            return false;
        }
        let busiest = self.steps[step]
            .slots
            .clone()
            .filter(|&i| self.slots[i].state == SlotState::Busy && self.slots[i].batches.len() >= 2)
            .max_by_key(|&i| self.slots[i].batches.len());
        let Some(batch) = busiest.and_then(|slot| self.recall_last(slot)) else { return false };
        for h in batch.tasks.into_iter().rev() {
            self.requeue(step, h);
        }
        true
    }

    /// Puts a task of a batch taken back (never begun) at the head of its step's queue, unless
    /// it needs no running any more: answered already (failed by a hard stop) or cancelled.
    fn requeue(&mut self, step: usize, h: Held) {
        if h.resolved || self.cancelled.remove(&h.task.id) {
            self.drop_task(&h.task);
        } else {
            let level = h.task.priority as usize;
            self.steps[step].queue.push_front(level, h.task);
        }
    }

    /// Releases the hub's references on a task's pool memory (its body, its buffers).
    fn drop_task(&self, task: &Queued) {
        if let Body::Extent(e) = &task.body {
            let _ = self.arena.unhold(e);
        }
        self.release_bufs(&task.bufs);
    }

    fn release_bufs(&self, bufs: &[BufRef]) {
        for b in bufs {
            let _ = self.arena.unhold(&b.extent());
        }
    }

    /// The earliest time a partial batch becomes due, if one is waiting.
    /// The earliest time the hub must run again by itself: a partial batch becomes due, or a
    /// running batch reaches its step's `handle_timeout`.
    pub fn next_timer(&self) -> Option<Nanos> {
        let batch_due = self.steps.iter().filter_map(|s| s.timer).min();
        let overdue_at = self.slots.iter().filter(|s| !s.overran).filter_map(|s| self.overdue_at(s)).min();
        match (batch_due, overdue_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the oldest batch of slot `s` passes its step's `handle_timeout`, if it is limited.
    fn overdue_at(&self, s: &Slot) -> Option<Nanos> {
        let limit = self.steps[s.step].spec.handle_timeout?;
        let since = s.batches.front()?.front_since?;
        Some(Nanos(since.0.saturating_add(u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX))))
    }

    /// How long the oldest batch of `slot` has been running (at most), if it has one.
    pub fn batch_running_for(&self, slot: usize, now: Nanos) -> Option<Duration> {
        let since = self.slots[slot].batches.front()?.front_since?;
        Some(Duration::from_nanos(now.0.saturating_sub(since.0)))
    }

    /// Whether the worker in `slot` ran past its step's `handle_timeout` and is being killed.
    pub fn overran(&self, slot: usize) -> bool {
        self.slots[slot].overran
    }

    /// Slots found running a batch past their step's `handle_timeout` since the last call: the
    /// owner kills their processes (their exit then fails the batch, see [`Hub::worker_exited`]).
    pub fn take_overdue(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.overdue)
    }

    fn find_overdue(&mut self, now: Nanos) {
        for slot in 0..self.slots.len() {
            let s = &self.slots[slot];
            if s.overran || !matches!(s.state, SlotState::Busy | SlotState::Stopping) {
                continue;
            }
            // Only a batch the worker has begun is running; one not begun goes back to the
            // queue if the worker dies, so it is no reason to kill it.
            let begun = s.batches.front().is_some_and(|b| b.seq < self.layout.slot_gate(&self.region, slot).begun());
            if begun && self.overdue_at(s).is_some_and(|at| now >= at) {
                self.slots[slot].overran = true;
                self.overdue.push(slot);
            }
        }
    }

    /// Whether any worker has published records the hub has not read.
    pub fn has_pending(&mut self) -> bool {
        self.slots.iter_mut().any(|s| s.outbound.has_data()) || !self.deferred.is_empty()
    }

    /// Raises the doorbell flag before the owner sleeps. Returns `false` (and lowers it again)
    /// when records arrived meanwhile: the owner must poll instead of sleeping.
    pub fn prepare_sleep(&mut self) -> bool {
        let region = self.region.clone();
        let flag = self.layout.doorbell_waiting(&region);
        flag.store(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.has_pending() {
            flag.store(0, Ordering::SeqCst);
            return false;
        }
        self.slept_at = Some(Nanos::now());
        true
    }

    /// Lowers the doorbell flag after waking: workers stop ringing while the hub is awake.
    pub fn woke(&self) {
        self.layout.doorbell_waiting(&self.region).store(0, Ordering::SeqCst);
    }

    /// After the doorbell woke the owner: records what the wake-up cost, when a worker's ring
    /// did it while the owner slept (a port client's ring carries no stamp).
    pub fn woken_by_doorbell(&mut self) {
        let rung_at = self.layout.doorbell_rung_at(&self.region).swap(0, Ordering::Acquire);
        let slept_at = self.slept_at.take();
        if rung_at != 0 && slept_at.is_some_and(|slept| rung_at >= slept.0) {
            crate::shm::event::record_wake_up(Nanos::now().saturating_sub(Nanos(rung_at)));
        }
    }

    /// The owner polls again without having been woken (a submit, its spin): workers stop
    /// ringing, and a ring meanwhile measured nothing about a wake-up.
    pub fn resumed(&mut self) {
        self.woke();
        self.slept_at = None;
        self.layout.doorbell_rung_at(&self.region).store(0, Ordering::Relaxed);
    }

    /// Reads every worker's published records, routes results, forms and sends due batches,
    /// and reports outcomes. Returns how many outcomes were reported.
    pub fn poll(&mut self, now: Nanos, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        let mut reported = 0;
        for (task_id, failure) in std::mem::take(&mut self.deferred) {
            out(Outcome::Failed { task_id, failure });
            reported += 1;
        }
        for slot in 0..self.slots.len() {
            reported += self.drain_slot(slot, now, out)?;
            if self.slots[slot].stop_pending {
                self.send_stop(slot)?;
            }
        }
        self.dispatch_all(now)?;
        for (task_id, failure) in std::mem::take(&mut self.deferred) {
            out(Outcome::Failed { task_id, failure });
            reported += 1;
        }
        self.find_overdue(now);
        Ok(reported)
    }

    fn drain_slot(&mut self, slot: usize, now: Nanos, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        let mut reported = 0;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| -> Result<()> {
            while let Some(rec) = self.slots[slot].outbound.peek()? {
                self.slots[slot].outbound.read_payload(&rec, &mut scratch)?;
                self.slots[slot].outbound.consume(&rec);
                match rec.tag {
                    TAG_READY => {
                        let s = &mut self.slots[slot];
                        if s.state == SlotState::Starting {
                            s.state = SlotState::Idle;
                            self.steps[s.step].idle.push(slot);
                        } else if matches!(s.state, SlotState::Dead | SlotState::Vacant) {
                            s.ready_before_spawn = true; // becomes idle when registered
                        }
                        out(Outcome::WorkerReady { slot, step: s.step, pid: s.pid });
                        reported += 1;
                    }
                    TAG_START_FAILED => {
                        let s = &mut self.slots[slot];
                        s.state = SlotState::Stopping;
                        let message = String::from_utf8_lossy(&scratch).into_owned();
                        out(Outcome::WorkerStartFailed { slot, step: s.step, pid: s.pid, message });
                        reported += 1;
                    }
                    TAG_RESULT => {
                        let header = TaskHeader::decode(&scratch)?;
                        reported += self.on_result(slot, header, &scratch[HEADER_LEN..], now, out)?;
                    }
                    TAG_PART => {
                        let header = TaskHeader::decode(&scratch)?;
                        reported += self.on_part(slot, header, &scratch[HEADER_LEN..], out)?;
                    }
                    TAG_BATCH_DONE => {
                        let seq = u64::from_le_bytes(
                            scratch
                                .get(..8)
                                .ok_or(EngineError::Protocol("short batch-done record"))?
                                .try_into()
                                .unwrap(),
                        );
                        self.on_batch_done(slot, seq)?;
                    }
                    _ => return Err(EngineError::Protocol("unknown record from a worker")),
                }
            }
            self.slots[slot].outbound.release();
            Ok(())
        })();
        self.scratch = scratch;
        result.map(|_| reported)
    }

    fn on_result(
        &mut self,
        slot: usize,
        header: TaskHeader,
        rest: &[u8],
        now: Nanos,
        out: &mut dyn FnMut(Outcome<'_>),
    ) -> Result<usize> {
        let (step, from) = (self.slots[slot].step, self.slots[slot].pool_index);
        let held = self.slots[slot]
            .batches
            .iter_mut()
            .flat_map(|b| b.tasks.iter_mut())
            .find(|h| h.task.id == header.task_id)
            .ok_or(EngineError::Protocol("result for a task the worker does not hold"))?;
        // A task already answered for: failed by a non-graceful stop while the worker still
        // ran it. Its result is dropped (its memory released below); a second result for a task
        // the worker itself answered is a protocol error.
        let already_failed = held.resolved;
        // The hub's record, not the worker's header, says whether the caller streams.
        let flags = held.task.flags;
        if already_failed && self.accepting {
            return Err(EngineError::Protocol("a second result for one task"));
        }
        held.resolved = true;
        let (bufs, inline) = self.take_over(&header, rest, from)?;
        if self.metrics {
            let size =
                inline.len() as u64 + header.extent.map_or(0, |e| e.len) + bufs.iter().map(|b| b.len).sum::<u64>();
            let route = self.routes.entry((step, header.route, header.priority)).or_default();
            route.transfer_us.record(now.0.saturating_sub(header.sent_at.0) / 1000);
            route.size.record(size);
        }
        let release_all = |hub: &Self| {
            if let Some(ext) = header.extent {
                let _ = hub.arena.unhold(&ext);
            }
            hub.release_bufs(&bufs);
        };
        if already_failed || self.cancelled.remove(&header.task_id) {
            release_all(self);
            return Ok(0);
        }
        let payload = || match header.extent {
            Some(ext) => Payload::Extent(ext),
            None => Payload::Inline(inline),
        };
        let task_id = header.task_id;
        match header.status {
            Status::Expired => {
                release_all(self);
                self.steps[step].stats.expired += 1;
                self.in_flight -= 1;
                out(Outcome::Failed { task_id, failure: Failure::Expired { step } });
            }
            Status::Error => {
                self.release_bufs(&bufs);
                self.steps[step].stats.failed += 1;
                self.in_flight -= 1;
                out(Outcome::Failed { task_id, failure: Failure::Handler { step, body: payload() } });
            }
            Status::Ok if header.route == ROUTE_DONE => {
                self.in_flight -= 1;
                out(Outcome::Done { task_id, body: payload(), bufs });
            }
            Status::Ok => {
                let next = header.route as usize;
                if next <= step || next >= self.steps.len() {
                    release_all(self);
                    return Err(EngineError::Protocol("a result routed to a step that is not downstream"));
                }
                let limit = self.steps[next].inline_max.saturating_sub(bufs.len() * BufRef::WIRE_LEN);
                let body = match header.extent {
                    Some(ext) => Body::Extent(ext),
                    None => match self.to_body(inline, limit) {
                        Ok(body) => body,
                        Err(_) => {
                            self.release_bufs(&bufs);
                            self.in_flight -= 1;
                            out(Outcome::Failed { task_id, failure: Failure::ArenaExhausted { step: next } });
                            return Ok(1);
                        }
                    },
                };
                let q = Queued {
                    id: task_id,
                    priority: header.priority,
                    deadline: header.deadline,
                    arrived: now,
                    body,
                    bufs,
                    flags,
                };
                self.steps[next].queue.push_unbounded(header.priority as usize, q);
                return Ok(0);
            }
        }
        Ok(1)
    }

    /// Reads the buffer table of a worker's message about a task (a result or a part) and takes
    /// the message over: its references (buffers, an extent body) become the main process's, so
    /// they survive the worker. Returns the buffers and the inline body.
    fn take_over<'r>(&self, header: &TaskHeader, rest: &'r [u8], from: u32) -> Result<(Vec<BufRef>, &'r [u8])> {
        let nbufs = header.nbufs as usize;
        let table =
            rest.get(..nbufs * BufRef::WIRE_LEN).ok_or(EngineError::Protocol("a message shorter than its buffers"))?;
        let mut bufs = Vec::with_capacity(nbufs);
        for wire in table.chunks_exact(BufRef::WIRE_LEN) {
            let b = BufRef::decode(wire)?;
            self.arena.check_buf(&b)?;
            bufs.push(b);
        }
        if let Some(ext) = header.extent {
            self.arena.adopt(&ext, from)?;
        }
        for b in &bufs {
            self.arena.adopt(&b.extent(), from)?;
        }
        Ok((bufs, &rest[table.len()..]))
    }

    /// A partial result from the worker in `slot`: handed on with a receipt, or dropped when
    /// its caller does not stream or is gone.
    fn on_part(
        &mut self,
        slot: usize,
        header: TaskHeader,
        rest: &[u8],
        out: &mut dyn FnMut(Outcome<'_>),
    ) -> Result<usize> {
        let s = &self.slots[slot];
        // Only the running batch (the oldest) sends parts.
        let batch = s.batches.front().ok_or(EngineError::Protocol("a part from a worker without a batch"))?;
        let pos = batch
            .tasks
            .iter()
            .position(|h| h.task.id == header.task_id)
            .ok_or(EngineError::Protocol("a part for a task the worker is not running"))?;
        let held = &batch.tasks[pos];
        let caller_gone = self.cancelled.contains(&header.task_id);
        let wanted = held.task.flags & FLAG_STREAM != 0 && !held.resolved && !caller_gone;
        let receipt = PartReceipt { slot: slot as u16, pos: pos as u16, epoch: s.epoch, seq: batch.seq };
        if caller_gone {
            // Cancelled while its batch waited behind another (sent ahead, and too late to take
            // back): the worker wrote the batch's words afresh when it began it. Tell it now.
            self.mark_cancelled(slot, header.task_id);
        }
        let from = s.pool_index;
        let (bufs, inline) = self.take_over(&header, rest, from)?;
        if !wanted {
            if let Some(ext) = header.extent {
                let _ = self.arena.unhold(&ext);
            }
            self.release_bufs(&bufs);
            // The worker counts it as sent: give its room back, or it could wait for ever.
            self.release_part(receipt);
            return Ok(0);
        }
        let body = match header.extent {
            Some(ext) => Payload::Extent(ext),
            None => Payload::Inline(inline),
        };
        out(Outcome::Part { task_id: header.task_id, body, bufs, receipt });
        Ok(1)
    }

    /// The caller of a part has taken it: its worker may send one more for that task. A
    /// receipt of a batch that has ended, or of a worker that is gone, changes nothing.
    pub fn release_part(&mut self, receipt: PartReceipt) {
        let slot = receipt.slot as usize;
        if slot >= self.slots.len() || self.slots[slot].epoch != receipt.epoch {
            return;
        }
        if (receipt.pos as usize) < self.layout.positions
            && self.layout.stream_word(&self.region, slot, receipt.pos as usize).take(receipt.seq)
        {
            self.layout.stream_event(&self.region, slot).notify();
        }
    }

    /// Tells the handler of a running task that its caller is gone (see [`crate::stream`]).
    fn mark_cancelled(&self, slot: usize, task_id: u64) {
        let Some(batch) = self.slots[slot].batches.front() else { return };
        let Some(pos) = batch.tasks.iter().position(|h| h.task.id == task_id) else { return };
        if self.layout.stream_word(&self.region, slot, pos).cancel(batch.seq) {
            self.layout.stream_event(&self.region, slot).notify();
        }
    }

    fn on_batch_done(&mut self, slot: usize, seq: u64) -> Result<()> {
        let s = &mut self.slots[slot];
        let (step, pid) = (s.step, s.pid);
        if s.batches.front().map(|b| b.seq) != Some(seq) {
            return Err(EngineError::Protocol("a worker finished a batch it was not given"));
        }
        let Some(batch) = s.batches.pop_front() else { return Ok(()) };
        if let Some(next) = s.batches.front_mut() {
            next.front_since = Some(Nanos::now());
        }
        if s.batches.is_empty() && s.state == SlotState::Busy {
            s.state = SlotState::Idle;
            self.steps[step].idle.push(slot);
        }
        for h in batch.tasks {
            self.drop_task(&h.task);
            if !h.resolved {
                // A worker always answers for every task; a missing answer is a protocol bug, and
                // the caller still gets an outcome instead of waiting forever.
                if !self.cancelled.remove(&h.task.id) {
                    self.in_flight -= 1;
                    self.deferred.push((h.task.id, Failure::WorkerDied { step, pid }));
                }
            }
        }
        Ok(())
    }

    fn dispatch_all(&mut self, now: Nanos) -> Result<()> {
        for step in 0..self.steps.len() {
            self.dispatch(step, now)?;
        }
        Ok(())
    }

    /// Whether a step after `step` is at capacity (then `step` gets no new batch).
    fn downstream_full(&self, step: usize) -> bool {
        (step + 1..self.steps.len()).any(|later| self.step_full(later))
    }

    /// A busy worker of `step` that can take a batch ahead of time, if a full batch waits.
    fn pipeline_target(&self, step: usize) -> Option<usize> {
        let st = &self.steps[step];
        let top = st.queue.levels() - 1;
        // Only a full batch, and only of the most urgent level: nothing can overtake it.
        if st.queue.level_len(top) < st.spec.batch_size || st.queue.len() != st.queue.level_len(top) {
            return None;
        }
        st.slots
            .clone()
            .filter(|&i| self.slots[i].state == SlotState::Busy && self.ring_has_room(i))
            .min_by_key(|&i| self.slots[i].batches.len())
    }

    /// Whether the inbound ring of `slot` has room for one more batch. It is sized for
    /// [`pipeline_depth`] batches; batches the hub took back stay in it until the worker skips
    /// them, so what counts is every batch written that the worker has not begun or skipped
    /// (not only those it still holds: a hung worker never skips its recalled ones).
    fn ring_has_room(&self, slot: usize) -> bool {
        let s = &self.slots[slot];
        let begun = self.layout.slot_gate(&self.region, slot).begun();
        // Written, not yet begun or skipped; plus the batch being handled, whose records the
        // worker releases only when it finishes it.
        let unread = s.sent.saturating_sub(begun);
        let running = s.batches.front().is_some_and(|b| b.seq < begun);
        unread + u64::from(running) < pipeline_depth(self.steps[s.step].spec.batch_size) as u64
    }

    fn dispatch(&mut self, step: usize, now: Nanos) -> Result<()> {
        let result = self.dispatch_batches(step, now);
        self.publish_batches();
        result
    }

    /// Makes every batch written this round visible, waking each parked worker once.
    fn publish_batches(&mut self) {
        for slot in std::mem::take(&mut self.unpublished) {
            let s = &mut self.slots[slot];
            s.unpublished = false;
            s.inbound.publish();
        }
    }

    fn dispatch_batches(&mut self, step: usize, now: Nanos) -> Result<()> {
        self.steps[step].timer = None;
        while !self.downstream_full(step) {
            let target = match self.steps[step].idle.last() {
                // An idle worker that has not yet skipped the batches taken back from it waits.
                Some(&slot) if !self.ring_has_room(slot) => break,
                Some(&slot) => slot,
                None => match self.pipeline_target(step) {
                    Some(slot) => slot,
                    None => break,
                },
            };
            let st = &self.steps[step];
            let oldest = st.queue.oldest().map(|q| q.arrived);
            match batch::decide(st.queue.len(), oldest, st.spec.batch_size, st.spec.batch_timeout, now) {
                Decision::Idle | Decision::WaitUntil(_) if self.take_back_for_idle(step) => continue,
                Decision::Idle => break,
                Decision::WaitUntil(t) => {
                    self.steps[step].timer = Some(t);
                    break;
                }
                Decision::Send(n) => {
                    let mut tasks = Vec::with_capacity(n);
                    while tasks.len() < n {
                        let Some((_, q)) = self.steps[step].queue.pop() else { break };
                        if q.deadline != Nanos::ZERO && now >= q.deadline {
                            self.steps[step].stats.expired += 1;
                            self.drop_task(&q);
                            self.in_flight -= 1;
                            self.deferred.push((q.id, Failure::Expired { step }));
                            continue;
                        }
                        tasks.push(q);
                    }
                    if tasks.is_empty() {
                        continue;
                    }
                    if self.steps[step].idle.last() == Some(&target) {
                        self.steps[step].idle.pop();
                    }
                    self.send_batch(target, tasks, now)?;
                }
            }
        }
        Ok(())
    }

    fn send_batch(&mut self, slot: usize, tasks: Vec<Queued>, now: Nanos) -> Result<()> {
        let step = self.slots[slot].step;
        let oldest = tasks.iter().map(|q| q.arrived).min().unwrap_or(now);
        let s = &mut self.slots[slot];
        let count = tasks.len() as u32;
        let mut ok = s.inbound.try_write(TAG_BATCH, &[&count.to_le_bytes(), &[0u8; 4], &s.sent.to_le_bytes()])?;
        let mut table = Vec::new();
        for q in &tasks {
            let mut h = TaskHeader::new(q.id, q.priority, q.deadline);
            h.flags = q.flags;
            h.sent_at = now;
            h.route = step as u16;
            h.nbufs = q.bufs.len() as u16;
            table.clear();
            for b in &q.bufs {
                table.extend_from_slice(&b.encode());
            }
            ok &= match &q.body {
                Body::Inline(b) => s.inbound.try_write(TAG_TASK, &[&h.encode(), &table, b])?,
                Body::Extent(e) => {
                    h.extent = Some(*e);
                    s.inbound.try_write(TAG_TASK, &[&h.encode(), &table])?
                }
            };
        }
        if !ok {
            // Cannot happen while inline bodies respect `inline_max` and the worker released its
            // ring before reporting its batch done.
            return Err(EngineError::Protocol("a batch did not fit in an idle worker's inbound ring"));
        }
        if !s.unpublished {
            s.unpublished = true;
            self.unpublished.push(slot);
        }
        s.state = SlotState::Busy;
        let front_since = s.batches.is_empty().then_some(now);
        s.batches.push_back(SentBatch {
            seq: s.sent,
            tasks: tasks.into_iter().map(|task| Held { task, resolved: false }).collect(),
            front_since,
        });
        s.sent += 1;
        let st = &mut self.steps[step];
        st.stats.batches += 1;
        st.stats.tasks += count as u64;
        if self.metrics {
            st.series.batch_size.record(count as u64);
            st.series.batch_wait_us.record(now.0.saturating_sub(oldest.0) / 1000);
        }
        Ok(())
    }

    /// Handles the death of the worker in `slot`: first takes every record it managed to
    /// publish (those results are valid), then fails the tasks it still held, frees the shared
    /// memory labelled with it and resets its rings for a replacement.
    pub fn worker_exited(&mut self, slot: usize, out: &mut dyn FnMut(Outcome<'_>)) -> Result<()> {
        let now = Nanos::now();
        // A corrupt tail from a process killed mid-write is not an error of the flow.
        let _ = self.drain_slot(slot, now, out);
        let started = self.layout.slot_gate(&self.region, slot).begun();
        let s = &mut self.slots[slot];
        let (step, pid) = (s.step, s.pid);
        let was_live = !matches!(s.state, SlotState::Vacant | SlotState::Dead);
        s.state = SlotState::Dead;
        s.ready_before_spawn = false;
        let overran = std::mem::take(&mut s.overran);
        self.overdue.retain(|&o| o != slot);
        let s = &mut self.slots[slot];
        let batches = std::mem::take(&mut s.batches);
        s.sent = 0;
        s.epoch = s.epoch.wrapping_add(1);
        let mut never_started = Vec::new();
        for batch in batches {
            if batch.seq >= started {
                never_started.extend(batch.tasks);
                continue;
            }
            for h in batch.tasks {
                self.drop_task(&h.task);
                if !h.resolved && !self.cancelled.remove(&h.task.id) {
                    self.in_flight -= 1;
                    let failure =
                        if overran { Failure::HandlerTimeout { step, pid } } else { Failure::WorkerDied { step, pid } };
                    out(Outcome::Failed { task_id: h.task.id, failure });
                }
            }
        }
        // Tasks the dead worker never began go back to the head of the queue, in order.
        for h in never_started.into_iter().rev() {
            self.requeue(step, h);
        }
        self.steps[step].idle.retain(|&i| i != slot);
        if was_live {
            self.steps[step].stats.worker_deaths += 1;
        }
        let pool_index = self.slots[slot].pool_index;
        if pool_index != 0 {
            self.arena.reap(pool_index);
            self.arena.release_index(pool_index);
            self.slots[slot].pool_index = 0;
        }
        self.layout.inbound(slot).reset(&self.region);
        self.layout.outbound(slot).reset(&self.region);
        self.layout.slot_gate(&self.region, slot).reset();
        let s = &mut self.slots[slot];
        s.inbound = Producer::attach(self.region.clone(), self.layout.inbound(slot))?;
        s.outbound = Consumer::attach(self.region.clone(), self.layout.outbound(slot))?;
        out(Outcome::WorkerExited { slot, step, pid });
        self.dispatch_all(now)
    }

    /// Tells the worker in `slot` to exit once its current batch is done.
    pub fn send_stop(&mut self, slot: usize) -> Result<()> {
        let s = &mut self.slots[slot];
        if matches!(s.state, SlotState::Vacant | SlotState::Dead) {
            return Ok(());
        }
        if s.inbound.try_write(TAG_STOP, &[])? {
            s.inbound.publish();
            s.stop_pending = false;
        } else {
            // Batches sent ahead fill the ring; as the worker takes them, `poll` sends the stop.
            s.stop_pending = true;
        }
        if s.state == SlotState::Idle {
            let step = s.step;
            self.steps[step].idle.retain(|&i| i != slot);
        }
        s.state = SlotState::Stopping;
        Ok(())
    }

    /// Fails every task still queued or held with [`Failure::Stopped`] (a non-graceful stop).
    pub fn fail_all(&mut self, out: &mut dyn FnMut(Outcome<'_>)) {
        self.accepting = false;
        for (task_id, failure) in std::mem::take(&mut self.deferred) {
            out(Outcome::Failed { task_id, failure });
        }
        for step in 0..self.steps.len() {
            for q in self.steps[step].queue.remove_where(|_| true) {
                self.drop_task(&q);
                out(Outcome::Failed { task_id: q.id, failure: Failure::Stopped });
            }
        }
        for s in &mut self.slots {
            for h in s.batches.iter_mut().flat_map(|b| b.tasks.iter_mut()).filter(|h| !h.resolved) {
                h.resolved = true;
                if !self.cancelled.remove(&h.task.id) {
                    out(Outcome::Failed { task_id: h.task.id, failure: Failure::Stopped });
                }
            }
        }
        self.in_flight = 0;
    }
}

/// The doorbell: an eventfd that workers write when the hub sleeps.
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    pub fn new() -> Result<Self> {
        let fd =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)
                .map_err(EngineError::os("eventfd"))?;
        Ok(Self { fd })
    }

    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Consumes pending rings (the eventfd is non-blocking).
    pub fn clear(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut buf);
    }

    pub fn ring(&self) {
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }
}
