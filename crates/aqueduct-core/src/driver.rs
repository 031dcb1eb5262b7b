#![forbid(unsafe_code)]
//! The driver: what the *host* decides around the engine, written once for every front end
//! (the Python `Flow`, the Rust `Flow`, and whatever comes next).
//!
//! The [`Engine`] moves tasks: queues, batches, workers, deaths. The driver owns the calls
//! made into it and the policies a service needs around them:
//!
//! - **Calls.** Each call carries a token of the front end's choosing (`C`: a Python future, a
//!   oneshot sender) and gets exactly one [`Event::Done`] or [`Event::Failed`], whatever
//!   happens: a result, a handler error, a death, its deadline, a cancel (no event: the caller
//!   asked), a stop.
//! - **Caller deadlines**, on the engine's timerfd (one heap here, no timer per call): a call
//!   whose deadline passes fails with [`Fault::Timeout`] wherever its task is, and the task is
//!   dropped from the engine.
//! - **The waiting room.** With [`Admission::Wait`], a call that finds its step's queue full
//!   waits here, per step and priority, and enters the engine in order (most urgent level first)
//!   as room frees up, until its deadline. A full step never holds back another step's calls.
//!   With [`Admission::Reject`] the submission fails at once.
//! - **Outcome counters** per entry step and priority ([`OutcomeCounts`]), together with the
//!   engine's for port clients: one count of every call, whichever front end made it.
//! - **Supervision policy.** Deaths and restarts per step, the [`RestartPolicy`] window with a
//!   backoff between quick successive restarts, and when to give up ([`Event::GiveUp`]). The
//!   front end starts processes (how is its business: a zygote, `spawn`, `current_exe`) when
//!   the driver says [`Event::Respawn`].
//! - **Stopping.** [`Driver::begin_stop`]: no new calls, waiting calls fail, and a graceful stop
//!   lets the calls in flight finish within a grace period ([`Event::Drained`] or
//!   [`Event::GraceExpired`]); then [`Driver::stop_workers`] and [`Event::AllExited`].
//! - **Health** from one source: [`Driver::health`].
//!
//! The driver has no thread and does no I/O of its own: its owner calls [`Driver::poll`] when
//! the engine's descriptor is readable, exactly as for the engine.

use rustc_hash::FxHashMap as HashMap;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use crate::clock::Nanos;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::hub::{Failure, Outcome, Payload, SlotState};
use crate::metrics::{CallEnd, Histogram, OutcomeCounts};
use crate::shm::event::SpinWindow;
use crate::shm::BufRef;
use crate::stream::PartReceipt;

/// What a submission that finds its step's queue full does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Waits in the driver's waiting room until there is room or its deadline passes.
    Wait,
    /// Fails at once with [`EngineError::QueueFull`].
    Reject,
}

/// How many times a step's workers may be replaced after dying.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RestartPolicy {
    /// Replacements allowed per step within any `window`; one more death gives up.
    pub max_restarts: usize,
    pub window: Duration,
    /// A handler's exception gives up too (aqueduct 1.15, where it ended the worker).
    pub stop_on_handler_error: bool,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self { max_restarts: 5, window: Duration::from_secs(60), stop_on_handler_error: false }
    }
}

/// The first replacement within a window starts at once; each further one waits twice as long
/// as the one before, from this, so a worker that dies on start-up cannot make the host fork in
/// a tight loop.
pub const RESTART_BACKOFF: Duration = Duration::from_millis(25);
/// The longest wait before a replacement.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a call failed.
#[derive(Debug)]
pub enum Fault<'a> {
    /// The engine's report: a handler error, a death, a drop before dispatch, a stop.
    Engine(Failure<'a>),
    /// The call's deadline passed while its task was in the flow.
    Timeout,
    /// The call's deadline passed while it waited for room in a full queue.
    TimeoutWaiting,
    /// A streaming call waited longer than its idle limit for the next part (or the result).
    IdleTimeout,
    /// The flow stopped before the call could enter it (it was in the waiting room).
    NotRunning,
}

/// Why the driver gave up on the flow: the front end stops it, hard.
#[derive(Clone, Debug, PartialEq)]
pub enum GiveUp {
    /// A step's workers died more often than the restart policy allows.
    TooManyDeaths { step: usize, deaths: usize, window: Duration, max_restarts: usize },
    /// A handler raised and the policy says to stop.
    HandlerError { step: usize },
    /// A replacement could not be started (the front end said so).
    CannotRestart { step: usize },
}

/// What a poll reports to the front end.
#[derive(Debug)]
pub enum Event<'a, C> {
    /// The call's task is finished: its body, and its out-of-band buffers (one main-process
    /// reference on each, now the front end's; an extent body too).
    Done {
        call: C,
        body: Payload<'a>,
        bufs: Vec<BufRef>,
    },
    Failed {
        call: C,
        step: usize,
        fault: Fault<'a>,
    },
    /// A partial result of a streaming call ([`Driver::submit_stream`]); the call goes on. The
    /// front end owns one reference on each buffer (and an extent body), and gives `receipt`
    /// back with [`Driver::release_part`] when its caller has taken the part: until then the
    /// worker may run at most [`crate::stream::STREAM_WINDOW`] parts ahead.
    Part {
        call: &'a C,
        body: Payload<'a>,
        bufs: Vec<BufRef>,
        receipt: PartReceipt,
    },
    Ready {
        slot: usize,
        step: usize,
        pid: u32,
    },
    StartFailed {
        slot: usize,
        step: usize,
        pid: u32,
        message: String,
    },
    /// A worker exited; `expected` when the flow is stopping (not a death).
    Exited {
        slot: usize,
        step: usize,
        pid: u32,
        expected: bool,
    },
    /// Start a replacement for `slot` now, then call [`Driver::worker_spawned`].
    Respawn {
        slot: usize,
        step: usize,
    },
    /// The worker of `slot` is not a process (an executor's) and its batch ran past the step's
    /// `handle_timeout`: end it now, as the engine kills a process. Its exit (through its
    /// `ExitNotifier`) fails the batch and brings a replacement.
    StopWorker {
        slot: usize,
        step: usize,
    },
    GiveUp(GiveUp),
    /// A graceful stop: nothing is left in flight. Call [`Driver::stop_workers`].
    Drained,
    /// A graceful stop ran out of grace (or was escalated): every call left was failed.
    GraceExpired,
    /// Every worker told to stop by [`Driver::stop_workers`] has exited.
    AllExited,
}

/// Where the flow is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverState {
    Running,
    /// A graceful stop waits for the calls in flight.
    Draining,
    /// The workers were told to stop (or killed).
    Stopping,
}

/// One step's health (see [`Driver::health`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepHealth {
    /// Workers started and not seen exiting.
    pub alive: usize,
    /// Workers that finished `on_start` and serve.
    pub ready: usize,
    pub deaths: usize,
    pub restarts: usize,
    /// Tasks waiting for the step in the engine (queued, or sent ahead to a busy worker).
    pub waiting: usize,
    /// Calls waiting in the driver for room in the step's queue.
    pub waiting_room: usize,
    /// Tasks held by the step's workers.
    pub in_flight: usize,
    /// How long the longest-running batch of the step has run.
    pub longest_batch: Option<Duration>,
    /// Workers killed for running past `handle_timeout`, not yet gone.
    pub overdue: usize,
}

/// Calls' deadlines, earliest first: one heap for every caller (the driver's, a port client's),
/// so that a call costs O(log n) to time and nothing to forget. Entries of calls that ended
/// otherwise stay until they come up (or until they outnumber the live calls, when they are
/// dropped in bulk).
#[derive(Default)]
pub struct Deadlines {
    heap: BinaryHeap<Reverse<(Nanos, u64)>>,
}

impl Deadlines {
    /// Adds call `id`'s deadline; `live` says which ids are still pending (for the clean-up).
    pub fn push(&mut self, at: Nanos, id: u64, pending: usize, live: impl Fn(u64) -> bool) {
        if self.heap.len() > 64 && self.heap.len() > 2 * pending {
            self.heap.retain(|Reverse((_, id))| live(*id));
        }
        self.heap.push(Reverse((at, id)));
    }

    /// The earliest deadline still in the heap (perhaps of a call that has ended).
    pub fn next(&self) -> Option<Nanos> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The next id whose deadline is at or before `now`, if any (the caller checks it is live).
    pub fn pop_due(&mut self, now: Nanos) -> Option<u64> {
        match self.heap.peek() {
            Some(&Reverse((at, id))) if at <= now => {
                self.heap.pop();
                Some(id)
            }
            _ => None,
        }
    }

    pub fn clear(&mut self) {
        self.heap.clear();
    }
}

struct Call<C> {
    token: C,
    step: u16,
    priority: u8,
    deadline: Nanos,
    /// `Some` while the call waits for room: what it will submit.
    parked: Option<(Vec<u8>, Vec<BufRef>)>,
    /// `Some` for a streaming call.
    stream: Option<CallStream>,
}

/// What the driver keeps of a streaming call.
struct CallStream {
    /// The longest wait for the next part (or the result); `None`: no limit.
    idle: Option<Duration>,
    /// When the current wait for a part runs out.
    idle_due: Nanos,
    submitted: Nanos,
    /// Parts delivered so far, and how many of them the caller has taken: while it has some
    /// to read, it is not waiting, and the idle limit does not run out.
    parts: u64,
    taken: u64,
    /// See [`StreamOpen::optional`].
    optional: bool,
}

/// How a streaming call is opened ([`Driver::submit_stream`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamOpen {
    /// The longest wait for the next part (or the result); `None`: no limit.
    pub idle: Option<Duration>,
    /// The caller takes parts if the handler sends any, but does not ask for them (the HTTP
    /// front: a route's handler decides whether its response streams). Such a call counts as
    /// an open stream, and its idle limit runs, from its first part on: before it, the call is
    /// bound by its deadline only, as one that does not stream.
    pub optional: bool,
}

/// Streams entering one step (see [`Driver::stream_stats`]).
#[derive(Clone, Debug, Default)]
pub struct StreamStats {
    /// Streaming calls not answered yet.
    pub open: usize,
    /// Parts delivered to callers, since the flow started.
    pub parts: u64,
    /// Time from submission to the first part, µs, per stream that had one.
    pub first_part_us: Histogram,
}

impl<C> Call<C> {
    /// When this call's idle limit runs out, if it has one (an optional stream's runs from its
    /// first part: until then the call may be answered whole, as a call that does not stream).
    fn idle_due(&self) -> Option<Nanos> {
        self.stream.as_ref().filter(|s| s.idle.is_some() && !(s.optional && s.parts == 0)).map(|s| s.idle_due)
    }
}

#[derive(Clone, Default)]
struct SlotBook {
    spawned: bool,
    alive: bool,
    pid: u32,
    /// Told to stop by `stop_workers`.
    stopping: bool,
}

/// The calls and policies, apart from the engine so that the engine's callbacks can update
/// them while the engine is borrowed.
struct Book<C> {
    calls: HashMap<u64, Call<C>>,
    deadlines: Deadlines,
    /// `[step][priority]`: ids of waiting calls, in arrival order (finished ones skipped).
    rooms: Vec<Vec<VecDeque<u64>>>,
    parked: usize,
    counts: OutcomeCounts,
    slots: Vec<SlotBook>,
    slot_step: Vec<usize>,
    deaths: Vec<usize>,
    restarts: Vec<usize>,
    /// Per step: when recent replacements were started (for the policy's window).
    recent: Vec<VecDeque<Nanos>>,
    /// Replacements waiting out their backoff: (due, slot).
    respawns: Vec<(Nanos, usize)>,
    policy: RestartPolicy,
    state: DriverState,
    gave_up: bool,
    grace_end: Option<Nanos>,
    /// `stop_workers` was called and `AllExited` not yet reported.
    awaiting_exits: bool,
    /// Receipts of parts whose call had ended: given back after the poll.
    orphan_receipts: Vec<PartReceipt>,
    /// Per entry step (`open` is counted when asked).
    streams: Vec<StreamStats>,
}

impl<C> Book<C> {
    fn end(&mut self, call: &Call<C>, end: CallEnd) {
        self.counts.add(call.step as usize, call.priority, end);
    }

    /// Turns an engine outcome into events.
    fn on_outcome(&mut self, arena: &crate::shm::Arena, o: Outcome<'_>, out: &mut dyn FnMut(Event<'_, C>)) {
        match o {
            Outcome::Part { task_id, body, bufs, receipt } => match self.calls.get_mut(&task_id) {
                Some(call) => {
                    let mut idle_starts = None;
                    if let Some(stream) = call.stream.as_mut() {
                        let now = Nanos::now();
                        if let Some(idle) = stream.idle {
                            stream.idle_due = now.saturating_add(idle);
                            if stream.optional && stream.parts == 0 {
                                idle_starts = Some(stream.idle_due);
                            }
                        }
                        let stats = &mut self.streams[call.step as usize];
                        if stream.parts == 0 {
                            stats.first_part_us.record(now.saturating_sub(stream.submitted).as_micros() as u64);
                        }
                        stream.parts += 1;
                        stats.parts += 1;
                    }
                    if let Some(due) = idle_starts {
                        // An optional stream's idle limit starts with its first part.
                        let calls = &self.calls;
                        self.deadlines.push(due, task_id, calls.len(), |id| calls.contains_key(&id));
                    }
                    let call = self.calls.get(&task_id).expect("looked up above");
                    out(Event::Part { call: &call.token, body, bufs, receipt })
                }
                None => {
                    release(arena, body, bufs);
                    self.orphan_receipts.push(receipt);
                }
            },
            Outcome::Done { task_id, body, bufs } => match self.calls.remove(&task_id) {
                Some(call) => {
                    self.end(&call, CallEnd::Complete);
                    out(Event::Done { call: call.token, body, bufs })
                }
                None => release(arena, body, bufs),
            },
            Outcome::Failed { task_id, failure } => {
                let Some(call) = self.calls.remove(&task_id) else {
                    if let Failure::Handler { body: Payload::Extent(ext), .. } = failure {
                        let _ = arena.unhold(&ext);
                    }
                    return;
                };
                let step = match failure {
                    Failure::Handler { step, .. }
                    | Failure::Expired { step }
                    | Failure::WorkerDied { step, .. }
                    | Failure::HandlerTimeout { step, .. }
                    | Failure::ArenaExhausted { step } => step,
                    Failure::Stopped => call.step as usize,
                };
                let end = if matches!(failure, Failure::Expired { .. }) { CallEnd::Timeout } else { CallEnd::Error };
                self.end(&call, end);
                let handler_error = matches!(failure, Failure::Handler { .. });
                out(Event::Failed { call: call.token, step, fault: Fault::Engine(failure) });
                if handler_error
                    && self.policy.stop_on_handler_error
                    && !self.gave_up
                    && self.state == DriverState::Running
                {
                    self.gave_up = true;
                    out(Event::GiveUp(GiveUp::HandlerError { step }));
                }
            }
            Outcome::WorkerReady { slot, step, pid } => out(Event::Ready { slot, step, pid }),
            Outcome::WorkerStartFailed { slot, step, pid, message } => {
                out(Event::StartFailed { slot, step, pid, message })
            }
            Outcome::WorkerExited { slot, step, pid } => self.on_exit(slot, step, pid, out),
        }
    }

    fn on_exit<'a>(&mut self, slot: usize, step: usize, pid: u32, out: &mut dyn FnMut(Event<'a, C>)) {
        let book = &mut self.slots[slot];
        let was_alive = std::mem::take(&mut book.alive);
        // While a graceful stop drains, a death is still a death: its replacement serves the
        // tasks the dead worker never began (the step's only worker, perhaps).
        let expected = self.state == DriverState::Stopping || book.stopping;
        out(Event::Exited { slot, step, pid, expected });
        if was_alive && !expected {
            self.deaths[step] += 1;
            self.restart(slot, step, Nanos::now(), out);
        }
        if self.awaiting_exits && !self.slots.iter().any(|s| s.alive) {
            self.awaiting_exits = false;
            out(Event::AllExited);
        }
    }

    /// Applies the restart policy to a death in `slot`.
    fn restart<'a>(&mut self, slot: usize, step: usize, now: Nanos, out: &mut dyn FnMut(Event<'a, C>)) {
        let policy = self.policy;
        let recent = &mut self.recent[step];
        while recent.front().is_some_and(|&t| now.saturating_sub(t) > policy.window) {
            recent.pop_front();
        }
        if recent.len() >= policy.max_restarts {
            if !self.gave_up {
                self.gave_up = true;
                out(Event::GiveUp(GiveUp::TooManyDeaths {
                    step,
                    deaths: recent.len() + 1,
                    window: policy.window,
                    max_restarts: policy.max_restarts,
                }));
            }
            return;
        }
        let delay = match recent.len() {
            0 => Duration::ZERO,
            n => RESTART_BACKOFF.saturating_mul(1 << (n - 1).min(16)).min(RESTART_BACKOFF_MAX),
        };
        recent.push_back(now);
        if delay.is_zero() {
            out(Event::Respawn { slot, step });
        } else {
            self.respawns.push((now.saturating_add(delay), slot));
        }
    }
}

/// Releases what an outcome nobody waits for carries.
fn release(arena: &crate::shm::Arena, body: Payload<'_>, bufs: Vec<BufRef>) {
    if let Payload::Extent(ext) = body {
        let _ = arena.unhold(&ext);
    }
    for b in bufs {
        let _ = arena.unhold(&b.extent());
    }
}

/// A submission the driver refused; the token and the buffers' references are the caller's
/// again.
#[derive(Debug)]
pub struct Refused<C> {
    pub call: C,
    pub error: EngineError,
}

/// An engine and the host policy around it (see the module documentation).
pub struct Driver<C> {
    engine: Engine,
    book: Book<C>,
    admission: Admission,
    priorities: usize,
    spin: SpinWindow,
}

impl<C> Driver<C> {
    pub fn new(engine: Engine, admission: Admission, policy: RestartPolicy) -> Self {
        let hub = &engine.hub;
        let steps = hub.step_count();
        let priorities = hub.priorities();
        let book = Book {
            calls: HashMap::default(),
            deadlines: Deadlines::default(),
            rooms: (0..steps).map(|_| (0..priorities).map(|_| VecDeque::new()).collect()).collect(),
            parked: 0,
            counts: OutcomeCounts::new(steps, priorities),
            slots: vec![SlotBook::default(); hub.slot_count()],
            slot_step: (0..hub.slot_count()).map(|s| hub.slot_step(s)).collect(),
            deaths: vec![0; steps],
            restarts: vec![0; steps],
            recent: vec![VecDeque::new(); steps],
            respawns: Vec::new(),
            policy,
            state: DriverState::Running,
            gave_up: false,
            grace_end: None,
            awaiting_exits: false,
            orphan_receipts: Vec::new(),
            streams: vec![StreamStats::default(); steps],
        };
        let spin = SpinWindow::new(engine.hub.spin());
        Self { engine, book, admission, priorities, spin }
    }

    /// The owner's spin: [`SpinWindow::open`] when it starts polling, then
    /// [`Driver::keep_polling`] after each poll.
    pub fn open_spin_window(&mut self) {
        self.engine.resumed();
        self.spin.open();
    }

    /// Whether the owner should poll again rather than sleep: tasks are in flight and results
    /// keep coming within the spin budget (see [`SpinWindow`]).
    pub fn keep_polling(&mut self) -> bool {
        let in_flight = self.engine.hub.in_flight() > 0;
        self.spin.keep_polling(in_flight)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, for what the driver does not decide (ports, metrics, descriptors).
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    pub fn state(&self) -> DriverState {
        self.book.state
    }

    /// Calls not yet answered: in the engine or in the waiting room.
    pub fn pending(&self) -> usize {
        self.book.calls.len()
    }

    /// Whether nothing is in flight: no call of the owner's, no task of a port client's.
    pub fn is_idle(&self) -> bool {
        self.book.calls.is_empty() && self.engine.hub.in_flight() == 0
    }

    /// Every call's end so far, the owner's and the port clients'.
    pub fn counts(&self) -> OutcomeCounts {
        let mut all = self.book.counts.clone();
        all.merge(self.engine.port_counts());
        all
    }

    /// Registers a worker process started for `slot` (a replacement counts as a restart).
    pub fn worker_spawned(&mut self, slot: usize, pid: u32, pool_index: u32) -> Result<()> {
        self.engine.worker_spawned(slot, pid, pool_index)?;
        self.spawned(slot, pid);
        Ok(())
    }

    /// Registers an executor's worker for `slot`: host code in this process serving the slot's
    /// rings (a thread pool, the local end of a remote actor). It acts as this process in the
    /// pool (its buffers are the owner's), has no pid, and reports its end through
    /// [`Engine::exit_notifier`]; everything else (batching, recall of batches not begun,
    /// supervision, the restart policy) is as for a worker process.
    pub fn executor_started(&mut self, slot: usize) {
        self.thread_worker_started(slot, 0);
    }

    /// Registers a worker thread for `slot` (see [`Engine::thread_worker_started`]).
    pub fn thread_worker_started(&mut self, slot: usize, pool_index: u32) {
        self.engine.thread_worker_started(slot, pool_index);
        self.spawned(slot, 0);
    }

    fn spawned(&mut self, slot: usize, pid: u32) {
        let book = &mut self.book.slots[slot];
        if book.spawned {
            self.book.restarts[self.book.slot_step[slot]] += 1;
        }
        *book = SlotBook { spawned: true, alive: true, pid, stopping: false };
    }

    /// The front end could not start the replacement the driver asked for: give up.
    pub fn respawn_failed(&mut self, slot: usize, out: &mut dyn FnMut(Event<'_, C>)) {
        if !self.book.gave_up {
            self.book.gave_up = true;
            out(Event::GiveUp(GiveUp::CannotRestart { step: self.book.slot_step[slot] }));
        }
    }

    /// The pid of the worker of `slot` and whether it is alive (started, not seen exiting).
    pub fn worker(&self, slot: usize) -> (u32, bool) {
        let b = &self.book.slots[slot];
        (b.pid, b.alive)
    }

    /// Submits a call: its task enters `step` at `priority` (below the flow's levels) with an
    /// absolute `deadline` (`Nanos::ZERO`: none). Returns the call's id, for
    /// [`Driver::cancel`]. On success the buffers' references are the driver's, whether the
    /// task entered the engine or waits for room.
    pub fn submit(
        &mut self,
        call: C,
        step: usize,
        priority: u8,
        deadline: Nanos,
        body: &[u8],
        bufs: Vec<BufRef>,
    ) -> std::result::Result<u64, Refused<C>> {
        self.submit_call(call, step, priority, deadline, body, bufs, None)
    }

    /// [`Driver::submit`] for a caller that reads the task's partial results: each comes as an
    /// [`Event::Part`] before the call's one [`Event::Done`] or [`Event::Failed`]. With `idle`,
    /// the call fails with [`Fault::IdleTimeout`] when no part (nor the result) comes within
    /// `open.idle` of the submission or of the last part; the deadline covers the whole stream.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_stream(
        &mut self,
        call: C,
        step: usize,
        priority: u8,
        deadline: Nanos,
        open: StreamOpen,
        body: &[u8],
        bufs: Vec<BufRef>,
    ) -> std::result::Result<u64, Refused<C>> {
        let now = Nanos::now();
        let StreamOpen { idle, optional } = open;
        let idle_due = idle.map_or(Nanos::ZERO, |i| now.saturating_add(i));
        let stream = CallStream { idle, idle_due, submitted: now, parts: 0, taken: 0, optional };
        self.submit_call(call, step, priority, deadline, body, bufs, Some(stream))
    }

    /// Per entry step: streams open, parts delivered, time to the first part.
    pub fn stream_stats(&self) -> Vec<StreamStats> {
        let mut stats = self.book.streams.clone();
        for call in self.book.calls.values() {
            if call.stream.as_ref().is_some_and(|s| !s.optional || s.parts > 0) {
                stats[call.step as usize].open += 1;
            }
        }
        stats
    }

    /// The caller of call `id` took the part with `receipt`: see [`Event::Part`]. A stream's
    /// idle limit counts from here too, so a consumer slower than the limit, which the worker
    /// waits for, is not taken for an idle stream.
    pub fn part_taken(&mut self, id: u64, receipt: PartReceipt) {
        if let Some(stream) = self.book.calls.get_mut(&id).and_then(|c| c.stream.as_mut()) {
            stream.taken += 1;
            if let Some(idle) = stream.idle {
                stream.idle_due = Nanos::now().saturating_add(idle);
            }
        }
        self.release_part(receipt);
    }

    /// Gives a part's receipt back without a call (one nobody took): see [`Event::Part`].
    pub fn release_part(&mut self, receipt: PartReceipt) {
        self.engine.hub.release_part(receipt);
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_call(
        &mut self,
        call: C,
        step: usize,
        priority: u8,
        deadline: Nanos,
        body: &[u8],
        bufs: Vec<BufRef>,
        stream: Option<CallStream>,
    ) -> std::result::Result<u64, Refused<C>> {
        let refuse = |call, error| Err(Refused { call, error });
        if self.book.state != DriverState::Running {
            return refuse(call, EngineError::Stopped);
        }
        if step >= self.book.rooms.len() {
            return refuse(call, EngineError::Config(format!("no step {step}")));
        }
        if priority as usize >= self.priorities {
            let levels = self.priorities;
            return refuse(
                call,
                EngineError::Config(format!("priority must be below queue_priorities ({levels}), got {priority}")),
            );
        }
        let id = self.engine.hub.reserve_task_id();
        // Calls already waiting for this step go first: a new one must not overtake them.
        let park = self.admission == Admission::Wait
            && (self.book.rooms[step][priority as usize..].iter().any(|r| !r.is_empty())
                || !self.engine.hub.has_room(step));
        let parked = if park {
            Some((body.to_vec(), bufs))
        } else {
            if let Err(error) = self.engine.hub.submit_as(id, step, priority, deadline, body, bufs, stream.is_some()) {
                return refuse(call, error);
            }
            None
        };
        self.insert(id, Call { token: call, step: step as u16, priority, deadline, parked: None, stream });
        if let Some(parked) = parked {
            self.book.calls.get_mut(&id).expect("just inserted").parked = Some(parked);
            self.book.rooms[step][priority as usize].push_back(id);
            self.book.parked += 1;
            if self.engine.hub.has_room(step) {
                self.admit_soon(); // it waits behind others only until the next poll
            }
        }
        Ok(id)
    }

    fn insert(&mut self, id: u64, call: Call<C>) {
        let calls = &self.book.calls;
        for at in [(call.deadline != Nanos::ZERO).then_some(call.deadline), call.idle_due()].into_iter().flatten() {
            self.book.deadlines.push(at, id, calls.len(), |id| calls.contains_key(&id));
        }
        self.book.calls.insert(id, call);
    }

    /// The caller gave up on a call (its request was cancelled): the task is dropped wherever it
    /// is and no event will come for it. Returns whether the call was pending.
    pub fn cancel(&mut self, id: u64) -> bool {
        let Some(call) = self.book.calls.remove(&id) else { return false };
        self.book.end(&call, CallEnd::Cancel);
        match call.parked {
            Some((_, bufs)) => {
                self.book.parked -= 1;
                self.release_bufs(bufs);
            }
            None => {
                self.engine.hub.cancel(id);
                if self.book.parked > 0 {
                    self.admit_soon();
                }
            }
        }
        true
    }

    /// Room may have freed outside a poll (a cancel): wake the owner at once, so that the
    /// waiting room is admitted from in its next poll rather than at the next completion.
    fn admit_soon(&mut self) {
        // The timer fires immediately; if arming fails the next poll admits anyway.
        let _ = self.engine.set_host_timer(Some(Nanos::now()));
    }

    fn release_bufs(&self, bufs: Vec<BufRef>) {
        let arena = self.engine.hub.arena();
        for b in bufs {
            let _ = arena.unhold(&b.extent());
        }
    }

    /// Handles everything that is ready (never blocking) and reports it. With `events=false`
    /// only what workers and port clients published is read, without a system call: for an
    /// owner's spin, which learns about exits and timers from the descriptor.
    pub fn poll(&mut self, events: bool, out: &mut dyn FnMut(Event<'_, C>)) -> Result<usize> {
        let arena = self.engine.hub.arena().clone();
        let book = &mut self.book;
        let mut n = 0;
        let mut sink = |o: Outcome<'_>| {
            n += 1;
            book.on_outcome(&arena, o, out)
        };
        let polled = if events { self.engine.poll(&mut sink) } else { self.engine.poll_rings(&mut sink) };
        polled?;
        if n > 0 {
            self.spin.progressed();
        }
        self.after_poll(Nanos::now(), out)?;
        Ok(n)
    }

    /// One pass of an owner that polls from its event loop rather than blocking here: handles
    /// the rings, then says whether to pass again soon (`true`: results are still coming within
    /// the spin budget, or records arrived since) or to sleep until the engine's descriptor is
    /// readable (`false`: the doorbell flags are down, so a worker that finishes rings it). One
    /// call where an event loop made three (poll, `keep_polling`, `prepare_sleep`).
    /// `events`: also read the reactor (the doorbell, timers, worker exits), as when the loop
    /// found the engine's descriptor readable.
    pub fn poll_pass(&mut self, events: bool, out: &mut dyn FnMut(Event<'_, C>)) -> Result<(usize, bool)> {
        let n = self.poll(events, out)?;
        let again = self.keep_polling() || !self.engine.prepare_sleep();
        Ok((n, again))
    }

    /// Waits up to `timeout` for something to happen (see [`Engine::wait`]), then handles it.
    pub fn wait(&mut self, timeout: Option<Duration>, out: &mut dyn FnMut(Event<'_, C>)) -> Result<usize> {
        let arena = self.engine.hub.arena().clone();
        let book = &mut self.book;
        let mut n = 0;
        self.engine.wait(timeout, &mut |o| {
            n += 1;
            book.on_outcome(&arena, o, out)
        })?;
        self.after_poll(Nanos::now(), out)?;
        Ok(n)
    }

    /// A worker that is not a watched process (a thread, an executor's worker) is gone: its
    /// tasks fail or go back to the queue, and the restart policy applies as for a process.
    pub fn worker_gone(&mut self, slot: usize, out: &mut dyn FnMut(Event<'_, C>)) -> Result<()> {
        let arena = self.engine.hub.arena().clone();
        let book = &mut self.book;
        self.engine.worker_gone(slot, &mut |o| book.on_outcome(&arena, o, out))?;
        self.after_poll(Nanos::now(), out)
    }

    /// Deadlines, due replacements, admissions from the waiting room, the stop's progress, and
    /// the timer for the next of them.
    fn after_poll(&mut self, now: Nanos, out: &mut dyn FnMut(Event<'_, C>)) -> Result<()> {
        for receipt in std::mem::take(&mut self.book.orphan_receipts) {
            self.engine.hub.release_part(receipt);
        }
        self.expire(now, out);
        for slot in self.engine.take_overdue_hosted() {
            out(Event::StopWorker { slot, step: self.book.slot_step[slot] });
        }
        if !self.book.respawns.is_empty() {
            let due: Vec<usize> =
                self.book.respawns.iter().filter(|(at, _)| *at <= now).map(|&(_, slot)| slot).collect();
            self.book.respawns.retain(|(at, _)| *at > now);
            for slot in due {
                if self.book.state != DriverState::Stopping && !self.book.gave_up {
                    out(Event::Respawn { slot, step: self.book.slot_step[slot] });
                }
            }
        }
        if self.book.parked > 0 {
            self.admit(out);
        }
        if self.book.state == DriverState::Draining {
            if self.is_idle() {
                self.book.state = DriverState::Stopping;
                self.book.grace_end = None;
                out(Event::Drained);
            } else if self.book.grace_end.is_some_and(|end| end <= now) {
                self.fail_everything(out);
                out(Event::GraceExpired);
            }
        }
        self.arm(now)
    }

    fn arm(&mut self, _now: Nanos) -> Result<()> {
        let deadline = self.book.deadlines.next();
        let respawn = self.book.respawns.iter().map(|(at, _)| *at).min();
        let next = [deadline, respawn, self.book.grace_end].into_iter().flatten().min();
        self.engine.set_host_timer(next)
    }

    /// Fails every call whose deadline (or idle limit) has passed.
    fn expire(&mut self, now: Nanos, out: &mut dyn FnMut(Event<'_, C>)) {
        let mut later = Vec::new();
        while let Some(id) = self.book.deadlines.pop_due(now) {
            let Some(call) = self.book.calls.get(&id) else { continue };
            let timed_out = call.deadline != Nanos::ZERO && call.deadline <= now;
            let idle_due = call.idle_due();
            // A caller with parts still to read is not waiting for one: its clock starts again
            // when it takes the next.
            let behind = call.stream.as_ref().is_some_and(|s| s.parts > s.taken);
            let idle_due = match (idle_due, behind, call.stream.as_ref().and_then(|s| s.idle)) {
                (Some(_), true, Some(idle)) => Some(now.saturating_add(idle)),
                _ => idle_due,
            };
            if !timed_out {
                match idle_due {
                    // Parts came since this entry was pushed: wait again, from the last one.
                    Some(due) if due > now => {
                        later.push((due, id));
                        continue;
                    }
                    Some(_) => {}
                    // The call's deadline entry was already handled; nothing else is due.
                    None => continue,
                }
            }
            let call = self.book.calls.remove(&id).expect("looked up above");
            self.book.end(&call, CallEnd::Timeout);
            let fault = match call.parked {
                Some((_, bufs)) => {
                    self.book.parked -= 1;
                    self.release_bufs(bufs);
                    if timed_out {
                        Fault::TimeoutWaiting
                    } else {
                        Fault::IdleTimeout
                    }
                }
                None => {
                    self.engine.hub.cancel(id);
                    if timed_out {
                        Fault::Timeout
                    } else {
                        Fault::IdleTimeout
                    }
                }
            };
            out(Event::Failed { call: call.token, step: call.step as usize, fault });
        }
        for (due, id) in later {
            let calls = &self.book.calls;
            self.book.deadlines.push(due, id, calls.len(), |id| calls.contains_key(&id));
        }
    }

    /// Submits waiting calls while their queues have room: per step, most urgent level first,
    /// in arrival order within a level. A step whose queue is full holds back only its own calls.
    fn admit(&mut self, out: &mut dyn FnMut(Event<'_, C>)) {
        for step in 0..self.book.rooms.len() {
            'levels: for level in (0..self.priorities).rev() {
                while let Some(&id) = self.book.rooms[step][level].front() {
                    let Some(call) = self.book.calls.get_mut(&id) else {
                        self.book.rooms[step][level].pop_front(); // cancelled or expired
                        continue;
                    };
                    if !self.engine.hub.has_room(step) {
                        break 'levels;
                    }
                    self.book.rooms[step][level].pop_front();
                    self.book.parked -= 1;
                    let (body, bufs) = call.parked.take().expect("a call in the waiting room is parked");
                    let streamed = call.stream.is_some();
                    let submitted = self.engine.hub.submit_as(
                        id,
                        step,
                        call.priority,
                        call.deadline,
                        &body,
                        bufs.clone(),
                        streamed,
                    );
                    let Err(error) = submitted else { continue };
                    // It cannot enter at all (no shared memory for its body, or the flow stopped).
                    let call = self.book.calls.remove(&id).expect("looked up above");
                    self.release_bufs(bufs);
                    self.book.end(&call, CallEnd::Error);
                    let fault = match error {
                        EngineError::ArenaExhausted { .. } => Fault::Engine(Failure::ArenaExhausted { step }),
                        _ => Fault::NotRunning,
                    };
                    out(Event::Failed { call: call.token, step, fault });
                }
            }
        }
    }

    /// Stops taking calls. Calls in the waiting room fail with [`Fault::NotRunning`]. A
    /// graceful stop then waits for the calls in flight, at most `grace`, and reports
    /// [`Event::Drained`] or [`Event::GraceExpired`]; a hard one fails every call at once. A
    /// hard stop while a graceful one drains escalates it. Then call [`Driver::stop_workers`].
    pub fn begin_stop(&mut self, graceful: bool, grace: Duration, out: &mut dyn FnMut(Event<'_, C>)) -> Result<()> {
        match self.book.state {
            DriverState::Running => {}
            DriverState::Draining if !graceful => {
                self.fail_everything(out);
                out(Event::GraceExpired);
                return self.arm(Nanos::now());
            }
            _ => return Ok(()),
        }
        self.engine.hub.stop_accepting();
        if !graceful {
            self.book.respawns.clear();
        }
        self.fail_waiting(out);
        let now = Nanos::now();
        if graceful {
            self.book.state = DriverState::Draining;
            self.book.grace_end = Some(now.saturating_add(grace));
            self.after_poll(now, out)
        } else {
            self.fail_everything(out);
            self.arm(now)
        }
    }

    fn fail_waiting(&mut self, out: &mut dyn FnMut(Event<'_, C>)) {
        let ids: Vec<u64> = self.book.rooms.iter_mut().flatten().flat_map(|r| r.drain(..)).collect();
        for id in ids {
            let Some(mut call) = self.book.calls.remove(&id) else { continue };
            if let Some((_, bufs)) = call.parked.take() {
                self.book.parked -= 1;
                self.release_bufs(bufs);
            }
            self.book.end(&call, CallEnd::Error);
            out(Event::Failed { call: call.token, step: call.step as usize, fault: Fault::NotRunning });
        }
    }

    /// Fails every call, in the engine and waiting (a hard stop).
    fn fail_everything(&mut self, out: &mut dyn FnMut(Event<'_, C>)) {
        self.book.state = DriverState::Stopping;
        self.book.grace_end = None;
        self.fail_waiting(out);
        let arena = self.engine.hub.arena().clone();
        let book = &mut self.book;
        self.engine.hub.fail_all(&mut |o| book.on_outcome(&arena, o, out));
        // Anything the engine did not report (it cannot happen: every submitted call is in it).
        for (_, call) in std::mem::take(&mut self.book.calls) {
            self.book.end(&call, CallEnd::Error);
            out(Event::Failed { call: call.token, step: call.step as usize, fault: Fault::Engine(Failure::Stopped) });
        }
    }

    /// Tells every live worker to exit after its batch (`hard`: kills worker processes now;
    /// other workers are told to stop, and their executor to hurry them).
    /// Returns whether any is alive; if so, [`Event::AllExited`] follows once they are gone.
    pub fn stop_workers(&mut self, hard: bool) -> bool {
        self.book.state = DriverState::Stopping;
        let mut any = false;
        for slot in 0..self.book.slots.len() {
            if !self.book.slots[slot].alive {
                continue;
            }
            any = true;
            self.book.slots[slot].stopping = true;
            if hard && self.book.slots[slot].pid != 0 {
                // A worker that exited meanwhile: its exit is on its way.
                let _ = self.engine.reactor().signal(slot, rustix::process::Signal::KILL);
            } else {
                // Graceful, or a worker that is not a process (it cannot be killed): it exits
                // after its batch, whose tasks a hard stop has failed already.
                let _ = self.engine.hub.send_stop(slot);
            }
        }
        self.book.awaiting_exits = any;
        any
    }

    /// The health of every step, from the engine and the driver's own records.
    pub fn health(&self) -> Vec<StepHealth> {
        let hub = &self.engine.hub;
        let now = Nanos::now();
        let mut steps: Vec<StepHealth> = (0..hub.step_count())
            .map(|s| StepHealth {
                deaths: self.book.deaths[s],
                restarts: self.book.restarts[s],
                waiting: hub.waiting(s),
                waiting_room: self.book.rooms[s].iter().flatten().filter(|id| self.book.calls.contains_key(id)).count(),
                ..StepHealth::default()
            })
            .collect();
        for slot in 0..hub.slot_count() {
            let h = &mut steps[hub.slot_step(slot)];
            h.alive += usize::from(self.book.slots[slot].alive);
            h.ready += usize::from(matches!(hub.slot_state(slot), SlotState::Idle | SlotState::Busy));
            h.in_flight += hub.held_by(slot).len();
            if let Some(t) = hub.batch_running_for(slot, now) {
                h.longest_batch = Some(h.longest_batch.map_or(t, |l| l.max(t)));
            }
            h.overdue += usize::from(hub.overran(slot));
        }
        steps
    }
}
