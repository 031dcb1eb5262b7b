#![forbid(unsafe_code)]
//! `aqueduct._core.Driver`: the main process's side of a flow (the engine and the host policy
//! of [`aqueduct_core::driver`]), driven by `aqueduct.flow.Flow`.
//!
//! The Python event loop watches `fileno()` and calls `poll()` when it is readable (and, while
//! tasks are in flight, for a short spin window after each completion). A call is submitted
//! with its asyncio future; the driver resolves the futures itself when it polls, every one of
//! them exactly once: with `(body, bufs)` for a finished task (the pickled task and its
//! out-of-band buffers, each owning a reference) or with a [`Failure`] that says why it failed.
//! `poll()` returns only what the front end must act on: [`WorkerEvent`]s (a worker ready,
//! exited, to be replaced; the flow to give up; a stop's progress).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use aqueduct_core::driver::{Admission, DriverState, Event, Fault, GiveUp, RestartPolicy, StreamOpen};
use aqueduct_core::hub::{Failure as HubFailure, HubConfig, Payload, SlotState, StepSpec};
use aqueduct_core::metrics::{Histogram, WORKER_SERIES};
use aqueduct_core::shm::{Arena, BufRef};
use aqueduct_core::stream::PartReceipt;
use aqueduct_core::{Driver as CoreDriver, Engine as CoreEngine, Nanos};
use bytes::Bytes;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use tokio::sync::mpsc;

use crate::args;
use crate::errors::py_err;
use crate::shm::{Pool, ShmBuffer};

/// Where a call's answer goes: the driver's call token.
pub(crate) enum Call {
    /// An asyncio future (`Flow.process`, the socket server), resolved with Python objects.
    Future(Py<PyAny>),
    /// A call of the HTTP front (`crate::http`), answered with Rust values: no GIL. Every such
    /// call may stream: its parts, then its outcome, come down the one channel.
    Native(mpsc::UnboundedSender<Native>),
    /// A streaming call (`Flow.stream`): a Python object with `set_result(value)`, as a
    /// future, and `_part(body, bufs, receipt)` for each partial result. Shared, so that the
    /// HTTP front's poller (which has no GIL) can forward its parts.
    Stream(Arc<Py<PyAny>>),
}

/// A call's outcome as Rust values: what a native call gets, and what the HTTP front's poller
/// hands to the Python thread for a future it may not resolve itself.
pub(crate) enum Outcome {
    /// The finished task's body and out-of-band buffers (each owning a reference).
    Done { body: Vec<u8>, bufs: Vec<BufRef> },
    /// See [`Failure`] for the kinds.
    Failed { kind: &'static str, step: i64, detail: Detail },
}

/// What a native call's channel carries: any parts (each with the receipt its caller gives
/// back once it has taken it, `Driver::part_taken`), then exactly one outcome.
pub(crate) enum Native {
    Part(Bytes, PartReceipt),
    End(Outcome),
}

pub(crate) enum Detail {
    None,
    /// A handler's pickled error report.
    Report(Vec<u8>),
    /// The worker concerned.
    Pid(u32),
}

/// The core driver with [`Call`]s as its tokens.
type PyDriver = CoreDriver<Call>;

/// What the Python `Driver` and the HTTP front share: the driver, and the hand-over of what the
/// front's poller (a thread without the GIL) finds for the Python thread.
pub(crate) struct Shared {
    /// `None` once closed: `close()` releases the shared memory and every descriptor at a
    /// known moment, whatever Python references to the driver remain (tracebacks keep frames,
    /// and frames keep their locals, alive until the garbage collector runs).
    pub(crate) inner: Mutex<Option<PyDriver>>,
    pub(crate) step_names: Vec<String>,
    /// What the front's poller found for the Python thread.
    forwarded: Mutex<Forwarding>,
    /// The switches of the front's poller (one front polls a driver at a time).
    pub(crate) poller: NativePoller,
}

/// Who polls from the HTTP front's thread, and how to wake it.
#[derive(Default)]
pub(crate) struct NativePoller {
    /// Bumped when a poller is claimed or released: a poller whose generation is not the
    /// current one stops at its next pass (checked under the driver lock).
    generation: AtomicU64,
    active: AtomicBool,
    /// It waits on the engine's descriptor (a submit should wake it to open a spin window).
    pub(crate) sleeping: AtomicBool,
    pub(crate) wake: tokio::sync::Notify,
}

impl NativePoller {
    /// Makes the caller the driver's poller: its generation, or `None` if another one polls.
    pub(crate) fn claim(&self) -> Option<u64> {
        if self.active.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(self.generation.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// The poller of `generation` stops polling (no-op if it already has).
    pub(crate) fn release(&self, generation: u64) {
        if self.generation.compare_exchange(generation, generation + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.active.store(false, Ordering::Release);
            self.wake.notify_one();
        }
    }

    pub(crate) fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) == generation
    }

    /// A task was submitted: a sleeping poller opens a spin window, as the Python flow's
    /// `process()` does, rather than wait for the doorbell.
    pub(crate) fn kick(&self) {
        if self.sleeping.load(Ordering::Acquire) {
            self.wake.notify_one();
        }
    }
}

#[derive(Default)]
struct Forwarding {
    /// Futures' outcomes and worker events, in the order found.
    items: Vec<Forwarded>,
    /// An eventfd, readable while `items` may hold something (`notify_fd()`): made when a
    /// front first asks for it, closed with the driver.
    notify: Option<OwnedFd>,
}

enum Forwarded {
    Outcome(Arc<Py<PyAny>>, Outcome),
    /// A part of a streaming call: its body, buffers and receipt.
    Part(Arc<Py<PyAny>>, Vec<u8>, Vec<BufRef>, PartReceipt),
    Event(WorkerEvent),
}

impl Shared {
    /// The driver's lock for a thread that never holds the GIL (the HTTP front's): waiting for
    /// it cannot deadlock, since no holder waits for that thread.
    pub(crate) fn lock_native(&self) -> MutexGuard<'_, Option<PyDriver>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forwarding(&self) -> MutexGuard<'_, Forwarding> {
        self.forwarded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One pass of polling from the HTTP front's poller (`Driver::poll_pass`, with a new spin
    /// window first when `open_window`): native calls are answered here; futures' outcomes
    /// and worker events go to the Python thread. Returns whether to pass again soon, or
    /// `None` once the driver is closed.
    ///
    /// Everything happens under the driver lock, the hand-over to Python included, and a
    /// poller no longer current does nothing: once the Python thread has released the poller
    /// and taken what was forwarded (`take_forwarded` takes the driver lock first), nothing
    /// more can be forwarded behind its back.
    pub(crate) fn native_pass(&self, generation: u64, events: bool, open_window: bool) -> Option<bool> {
        let mut forwarded = Vec::new();
        let mut orphans = Vec::new();
        let mut guard = self.lock_native();
        if !self.poller.is_current(generation) {
            return None;
        }
        let again = {
            let driver = guard.as_mut()?;
            if open_window {
                driver.open_spin_window();
            }
            let arena = driver.engine().hub.arena().clone();
            let names = &self.step_names;
            let passed = driver.poll_pass(events, &mut |e| match e {
                Event::Done { call, body, bufs } => {
                    let outcome = Outcome::Done { body: body.into_vec(&arena), bufs };
                    match call {
                        Call::Native(answer) => answer_native(&arena, answer, outcome),
                        Call::Future(future) => forwarded.push(Forwarded::Outcome(Arc::new(future), outcome)),
                        Call::Stream(stream) => forwarded.push(Forwarded::Outcome(stream, outcome)),
                    }
                }
                Event::Failed { call, step, fault } => {
                    let outcome = failed(&arena, step, fault);
                    match call {
                        Call::Native(answer) => answer_native(&arena, answer, outcome),
                        Call::Future(future) => forwarded.push(Forwarded::Outcome(Arc::new(future), outcome)),
                        Call::Stream(stream) => forwarded.push(Forwarded::Outcome(stream, outcome)),
                    }
                }
                Event::Part { call: Call::Stream(stream), body, bufs, receipt } => {
                    forwarded.push(Forwarded::Part(stream.clone(), body.into_vec(&arena), bufs, receipt));
                }
                Event::Part { call, body, bufs, receipt } => {
                    if !answer_part(&arena, call, body, bufs, receipt) {
                        orphans.push(receipt);
                    }
                }
                other => forwarded.extend(worker_event_of(other, names).map(Forwarded::Event)),
            });
            for receipt in orphans {
                driver.release_part(receipt);
            }
            // An engine error (a descriptor gone bad) is the Python thread's to report; its own
            // polling meets it too. Here it only ends the spin.
            passed.is_ok_and(|(_, again)| again)
        };
        if !forwarded.is_empty() {
            let mut to_python = self.forwarding();
            to_python.items.extend(forwarded);
            if let Some(notify) = &to_python.notify {
                let _ = rustix::io::write(notify, &1u64.to_ne_bytes());
            }
        }
        drop(guard);
        Some(again)
    }
}

/// Gives back the references a message carried, for one nobody takes.
fn release_refs(arena: &Arena, bufs: Vec<BufRef>) {
    for b in &bufs {
        let _ = arena.unhold(&b.extent());
    }
}

/// Answers a native call. Buffers are released: the HTTP front reads bodies only.
fn answer_native(arena: &Arena, answer: mpsc::UnboundedSender<Native>, outcome: Outcome) {
    let outcome = match outcome {
        Outcome::Done { body, bufs } => {
            release_refs(arena, bufs);
            Outcome::Done { body, bufs: Vec::new() }
        }
        failed => failed,
    };
    let _ = answer.send(Native::End(outcome));
}

/// Hands a part to a native call (its body copied out of the pool once, as `Bytes` the HTTP
/// front slices its chunk from). Returns whether the call took it, and so will give the
/// receipt back; parts of Python calls go another way, and a call whose request has gone
/// refuses them.
fn answer_part(arena: &Arena, call: &Call, body: Payload<'_>, bufs: Vec<BufRef>, receipt: PartReceipt) -> bool {
    release_refs(arena, bufs);
    let body = body.into_vec(arena);
    match call {
        Call::Native(answer) => answer.send(Native::Part(Bytes::from(body), receipt)).is_ok(),
        Call::Future(_) | Call::Stream(_) => false,
    }
}

/// A failed call's outcome, owned.
fn failed(arena: &Arena, step: usize, fault: Fault<'_>) -> Outcome {
    let (kind, step, detail) = match fault {
        Fault::Engine(f) => match f {
            HubFailure::Handler { step, body } => ("handler", step, Detail::Report(body.into_vec(arena))),
            HubFailure::Expired { step } => ("expired", step, Detail::None),
            HubFailure::WorkerDied { step, pid } => ("died", step, Detail::Pid(pid)),
            HubFailure::HandlerTimeout { step, pid } => ("handler_timeout", step, Detail::Pid(pid)),
            HubFailure::Stopped => return Outcome::Failed { kind: "stopped", step: -1, detail: Detail::None },
            HubFailure::ArenaExhausted { step } => ("shm_exhausted", step, Detail::None),
        },
        Fault::Timeout => ("timeout", step, Detail::None),
        Fault::TimeoutWaiting => ("timeout_waiting", step, Detail::None),
        Fault::IdleTimeout => ("idle_timeout", step, Detail::None),
        Fault::NotRunning => ("not_running", step, Detail::None),
    };
    Outcome::Failed { kind, step: step as i64, detail }
}

/// An owned outcome as what a future is resolved with: `(body, bufs)` or a [`Failure`].
fn outcome_value<'py>(py: Python<'py>, arena: &Arc<Arena>, outcome: Outcome) -> PyResult<Bound<'py, PyAny>> {
    match outcome {
        Outcome::Done { body, bufs } => {
            let bufs = buffers(py, arena, bufs)?;
            Ok(PyTuple::new(py, [PyBytes::new(py, &body).into_any(), bufs.into_any()])?.into_any())
        }
        Outcome::Failed { kind, step, detail } => {
            let detail = match detail {
                Detail::None => py.None(),
                Detail::Report(report) => PyBytes::new(py, &report).into_any().unbind(),
                Detail::Pid(pid) => pid.into_pyobject(py)?.into_any().unbind(),
            };
            Ok(Bound::new(py, Failure { kind, step, detail })?.into_any())
        }
    }
}

#[pyclass(frozen, module = "aqueduct._core")]
pub struct Driver {
    shared: Arc<Shared>,
}

/// A locked, open driver.
struct Open<'a>(MutexGuard<'a, Option<PyDriver>>);

impl std::ops::Deref for Open<'_> {
    type Target = PyDriver;
    fn deref(&self) -> &PyDriver {
        self.0.as_ref().expect("checked open")
    }
}

impl std::ops::DerefMut for Open<'_> {
    fn deref_mut(&mut self) -> &mut PyDriver {
        self.0.as_mut().expect("checked open")
    }
}

impl Driver {
    /// What the HTTP front shares with this driver.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The lock, waited for without the GIL: its holder may be resolving futures, which runs
    /// Python code (`set_result` calls the loop's `call_soon`) and so may wait for the GIL.
    fn guard(&self) -> MutexGuard<'_, Option<PyDriver>> {
        let inner = &self.shared.inner;
        loop {
            match inner.try_lock() {
                Ok(guard) => return guard,
                // A panic while holding the lock is a bug already reported; keep serving.
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => Python::attach(|py| py.detach(|| drop(inner.lock()))),
            }
        }
    }

    fn lock(&self) -> PyResult<Open<'_>> {
        let guard = self.guard();
        if guard.is_none() {
            return Err(Python::attach(|py| crate::errors::to_py(py, aqueduct_core::EngineError::Stopped)));
        }
        Ok(Open(guard))
    }

    fn delivery<'py, 'd>(&'d self, py: Python<'py>, driver: &PyDriver) -> Delivery<'py, 'd> {
        Delivery::new(py, driver.engine().hub.arena().clone(), &self.shared.step_names)
    }
}

pub(crate) fn payload_bytes<'py>(py: Python<'py>, arena: &Arena, body: Payload<'_>) -> PyResult<Bound<'py, PyBytes>> {
    match body {
        Payload::Inline(b) => Ok(PyBytes::new(py, b)),
        Payload::Extent(ext) => {
            let bytes = PyBytes::new_with(py, ext.len as usize, |buf| {
                arena.read(&ext, 0, buf).map_err(|e| crate::errors::to_py(py, e))
            });
            let _ = arena.unhold(&ext);
            bytes
        }
    }
}

/// The outcome's buffers as `ShmBuffer`s that take over the references the outcome carries.
pub(crate) fn buffers<'py>(py: Python<'py>, arena: &Arc<Arena>, bufs: Vec<BufRef>) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    let mut bufs = bufs.into_iter();
    while let Some(b) = bufs.next() {
        match ShmBuffer::owning(arena, b) {
            Ok(sb) => out.append(Bound::new(py, sb)?)?,
            Err(e) => {
                let _ = arena.unhold(&b.extent());
                for rest in bufs {
                    let _ = arena.unhold(&rest.extent());
                }
                return Err(crate::errors::to_py(py, e));
            }
        }
    }
    Ok(out)
}

/// Why a call failed, as the future of a failed call is resolved with it.
///
/// `kind` is one of `handler` (`detail`: the pickled error), `expired` (dropped before a
/// handler of `step` saw it), `died` and `handler_timeout` (`detail`: the worker's pid),
/// `stopped`, `shm_exhausted`, `rejected` (`detail`: why), `timeout` (the caller's deadline
/// passed in the flow), `timeout_waiting` (it passed while the call waited for queue room),
/// `idle_timeout` (a stream waited past its idle limit for a part) and `not_running` (the flow
/// stopped while the call waited). `step` is the step concerned, -1
/// when none is.
#[pyclass(frozen, module = "aqueduct._core", get_all)]
pub struct Failure {
    kind: &'static str,
    step: i64,
    detail: Py<PyAny>,
}

impl Failure {
    pub(crate) fn new(kind: &'static str, step: i64, detail: Py<PyAny>) -> Self {
        Self { kind, step, detail }
    }
}

#[pymethods]
impl Failure {
    fn __repr__(&self) -> String {
        format!("Failure(kind={:?}, step={})", self.kind, self.step)
    }
}

/// Something the front end acts on. `kind` is one of `ready`, `start_failed` (`message`),
/// `exited` (`expected`: during a stop, not a death), `respawn` (start a replacement for
/// `slot`), `give_up` (stop the flow hard; `message` says why), `drained` (a graceful stop
/// has nothing in flight any more), `grace_expired` (it ran out of grace: every call left was
/// failed) and `all_exited` (every worker told to stop is gone). Fields that do not apply
/// are -1, 0, "" or False.
#[pyclass(frozen, module = "aqueduct._core", get_all)]
pub struct WorkerEvent {
    kind: &'static str,
    slot: i64,
    step: i64,
    pid: u32,
    message: String,
    expected: bool,
}

#[pymethods]
impl WorkerEvent {
    fn __repr__(&self) -> String {
        format!("WorkerEvent(kind={:?}, slot={}, step={}, pid={})", self.kind, self.slot, self.step, self.pid)
    }
}

/// One step's health (see `Driver.health`).
#[pyclass(frozen, module = "aqueduct._core", get_all)]
pub struct StepHealth {
    alive: usize,
    ready: usize,
    deaths: usize,
    restarts: usize,
    waiting: usize,
    waiting_room: usize,
    in_flight: usize,
    longest_batch_s: Option<f64>,
    overdue: usize,
}

/// Tells the flow, from any thread, that an executor's worker stopped serving its slot.
#[pyclass(frozen, module = "aqueduct._core")]
pub struct ExitNotifier {
    inner: aqueduct_core::engine::ExitNotifier,
}

#[pymethods]
impl ExitNotifier {
    fn notify(&self) {
        self.inner.notify();
    }
}

fn worker_event(kind: &'static str, slot: usize, step: usize) -> WorkerEvent {
    WorkerEvent { kind, slot: slot as i64, step: step as i64, pid: 0, message: String::new(), expected: false }
}

fn flow_event(kind: &'static str, message: String) -> WorkerEvent {
    WorkerEvent { kind, slot: -1, step: -1, pid: 0, message, expected: false }
}

/// The front end's view of a driver event other than a call's outcome.
fn worker_event_of<C>(e: Event<'_, C>, step_names: &[String]) -> Option<WorkerEvent> {
    let name = |step: usize| step_names.get(step).map_or("", String::as_str);
    Some(match e {
        Event::Done { .. } | Event::Failed { .. } | Event::Part { .. } => return None,
        Event::Ready { slot, step, pid } => WorkerEvent { pid, ..worker_event("ready", slot, step) },
        Event::StartFailed { slot, step, pid, message } => {
            WorkerEvent { pid, message, ..worker_event("start_failed", slot, step) }
        }
        Event::Exited { slot, step, pid, expected } => {
            WorkerEvent { pid, expected, ..worker_event("exited", slot, step) }
        }
        Event::Respawn { slot, step } => worker_event("respawn", slot, step),
        Event::StopWorker { slot, step } => worker_event("stop_worker", slot, step),
        Event::GiveUp(why) => {
            let message = match why {
                GiveUp::TooManyDeaths { step, deaths, window, max_restarts } => format!(
                    "Workers of {} died {deaths} times within {:.0} s (restart_policy allows {max_restarts} \
                     restarts): stopping the flow",
                    name(step),
                    window.as_secs_f64()
                ),
                GiveUp::HandlerError { step } => {
                    format!("The handler of {} raised: stopping the flow (stop_on_handler_error)", name(step))
                }
                GiveUp::CannotRestart { step } => {
                    format!("could not restart a worker of {}: stopping the flow", name(step))
                }
            };
            flow_event("give_up", message)
        }
        Event::Drained => flow_event("drained", String::new()),
        Event::GraceExpired => flow_event("grace_expired", String::new()),
        Event::AllExited => flow_event("all_exited", String::new()),
    })
}

/// Resolves futures and collects worker events while the driver is polled.
struct Delivery<'py, 'n> {
    py: Python<'py>,
    arena: Arc<Arena>,
    events: Bound<'py, PyList>,
    step_names: &'n [String],
    err: Option<PyErr>,
    /// Receipts of parts nobody took (the stream's object refused them): given back after the
    /// poll, so that their worker is not held back.
    unclaimed: Vec<PartReceipt>,
}

impl<'py> Delivery<'py, '_> {
    fn new<'n>(py: Python<'py>, arena: Arc<Arena>, step_names: &'n [String]) -> Delivery<'py, 'n> {
        Delivery { py, arena, events: PyList::empty(py), step_names, err: None, unclaimed: Vec::new() }
    }

    fn take(&mut self, e: Event<'_, Call>) {
        if let Err(err) = self.deliver(e) {
            self.err.get_or_insert(err);
        }
    }

    fn deliver(&mut self, e: Event<'_, Call>) -> PyResult<()> {
        let py = self.py;
        match e {
            Event::Done { call: Call::Future(call), body, bufs } => {
                let result = (|| -> PyResult<Bound<'_, PyAny>> {
                    let bufs = buffers(py, &self.arena, bufs)?;
                    let body = payload_bytes(py, &self.arena, body)?;
                    Ok(PyTuple::new(py, [body.into_any(), bufs.into_any()])?.into_any())
                })();
                match result {
                    Ok(value) => resolve(py, call, value),
                    Err(err) => undeliverable(py, call, err),
                }
            }
            Event::Done { call: Call::Stream(stream), body, bufs } => {
                let outcome = Outcome::Done { body: body.into_vec(&self.arena), bufs };
                match outcome_value(py, &self.arena, outcome) {
                    Ok(value) => resolve(py, stream.clone_ref(py), value),
                    Err(err) => undeliverable(py, stream.clone_ref(py), err),
                }
            }
            Event::Done { call: Call::Native(answer), body, bufs } => {
                answer_native(&self.arena, answer, Outcome::Done { body: body.into_vec(&self.arena), bufs });
            }
            Event::Part { call, body, bufs, receipt } => {
                let taken = match call {
                    Call::Stream(stream) => deliver_part(py, &self.arena, stream, body, bufs, receipt),
                    other => answer_part(&self.arena, other, body, bufs, receipt),
                };
                if !taken {
                    self.unclaimed.push(receipt);
                }
            }
            Event::Failed { call, step, fault } => {
                let outcome = failed(&self.arena, step, fault);
                match call {
                    Call::Native(answer) => answer_native(&self.arena, answer, outcome),
                    Call::Stream(stream) => match outcome_value(py, &self.arena, outcome) {
                        Ok(failure) => resolve(py, stream.clone_ref(py), failure),
                        Err(err) => undeliverable(py, stream.clone_ref(py), err),
                    },
                    // Building the failure can fail (no memory for a huge error report): the call
                    // is answered all the same.
                    Call::Future(call) => match outcome_value(py, &self.arena, outcome) {
                        Ok(failure) => resolve(py, call, failure),
                        Err(err) => undeliverable(py, call, err),
                    },
                }
            }
            other => {
                if let Some(event) = worker_event_of(other, self.step_names) {
                    self.push(event)?;
                }
            }
        }
        Ok(())
    }

    fn push(&self, e: WorkerEvent) -> PyResult<()> {
        self.events.append(Bound::new(self.py, e)?)
    }

    /// The worker events, once the receipts of parts nobody took are given back to `driver`.
    fn finish(self, driver: &mut PyDriver) -> PyResult<Bound<'py, PyList>> {
        for receipt in self.unclaimed {
            driver.release_part(receipt);
        }
        self.err.map_or(Ok(self.events), Err)
    }
}

/// Hands a part to its stream's object (`_part(body, bufs, receipt)`). Returns whether it
/// took it (and so will give the receipt back); a part it refused is dropped.
pub(crate) fn deliver_part(
    py: Python<'_>,
    arena: &Arc<Arena>,
    stream: &Py<PyAny>,
    body: Payload<'_>,
    bufs: Vec<BufRef>,
    receipt: PartReceipt,
) -> bool {
    let args = (|| -> PyResult<_> {
        let bufs = buffers(py, arena, bufs)?;
        let body = match body {
            // A body in the pool stays there: the part is unpickled from a view on it. A
            // `bytes` copy would cost a fresh allocation each time (zeroed, then faulted in
            // page by page, then returned to the kernel): measured as most of the main
            // process's time with 1 MiB parts.
            Payload::Extent(ext) => match ShmBuffer::owning(arena, BufRef::whole(ext)) {
                Ok(view) => Bound::new(py, view)?.into_any(),
                Err(e) => {
                    let _ = arena.unhold(&ext);
                    return Err(crate::errors::to_py(py, e));
                }
            },
            inline => payload_bytes(py, arena, inline)?.into_any(),
        };
        Ok((body, bufs, receipt.to_u128()))
    })();
    match args {
        Ok(args) => stream.bind(py).call_method1(intern!(py, "_part"), args).is_ok(),
        Err(_) => false,
    }
}

/// Answers a call whose outcome could not be turned into Python objects (no memory for a large
/// result, say): its future gets a `rejected` failure naming the error, rather than no answer.
pub(crate) fn undeliverable(py: Python<'_>, call: Py<PyAny>, err: PyErr) {
    let detail = format!("the outcome could not be delivered: {err}");
    let detail = PyString::new(py, &detail).into_any().unbind();
    if let Ok(failure) = Bound::new(py, Failure { kind: "rejected", step: -1, detail }) {
        resolve(py, call, failure.into_any());
    }
}

/// Resolves a call's future. A future already done (its caller was cancelled and has not told
/// the driver yet) or whose loop is closed refuses; the result is then nobody's.
pub(crate) fn resolve(py: Python<'_>, future: Py<PyAny>, value: Bound<'_, PyAny>) {
    let _ = future.bind(py).call_method1(intern!(py, "set_result"), (value,));
}

#[pymethods]
impl Driver {
    /// `steps` is a list of `(nprocs, batch_size, batch_timeout_seconds, queue_capacity,
    /// handle_timeout_seconds or None)`; `step_names` name them in messages.
    #[new]
    #[pyo3(signature = (
        steps, pool, step_names, priorities=1, *, reject_when_full=false, max_restarts=5,
        restart_window=60.0, stop_on_handler_error=false, fair_every=10, ring_capacity=1<<20,
        inline_max=64<<10, metrics=true
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        steps: Vec<(usize, usize, f64, usize, Option<f64>)>,
        pool: &Pool,
        step_names: Vec<String>,
        priorities: usize,
        reject_when_full: bool,
        max_restarts: usize,
        restart_window: f64,
        stop_on_handler_error: bool,
        fair_every: u32,
        ring_capacity: usize,
        inline_max: usize,
        metrics: bool,
    ) -> PyResult<Self> {
        let steps = steps
            .into_iter()
            .map(|(nprocs, batch_size, timeout, queue_capacity, handle_timeout)| {
                Ok(StepSpec {
                    nprocs,
                    batch_size,
                    batch_timeout: args::duration("batch_timeout", timeout)?,
                    queue_capacity,
                    handle_timeout: handle_timeout.map(|t| args::duration("handle_timeout", t)).transpose()?,
                })
            })
            .collect::<PyResult<_>>()?;
        let cfg = HubConfig { steps, priorities, fair_every, ring_capacity, inline_max, metrics };
        let engine = CoreEngine::new(&cfg, pool.arena.clone()).map_err(py_err(py))?;
        let admission = if reject_when_full { Admission::Reject } else { Admission::Wait };
        let policy =
            RestartPolicy { max_restarts, window: args::duration("window", restart_window)?, stop_on_handler_error };
        let driver = CoreDriver::new(engine, admission, policy);
        let shared = Shared {
            inner: Mutex::new(Some(driver)),
            step_names,
            forwarded: Mutex::default(),
            poller: NativePoller::default(),
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// The descriptor to watch for readability.
    fn fileno(&self) -> PyResult<i32> {
        Ok(self.lock()?.engine().fd().as_raw_fd())
    }

    fn region_fd(&self) -> PyResult<i32> {
        Ok(self.lock()?.engine().region_fd().as_raw_fd())
    }

    fn doorbell_fd(&self) -> PyResult<i32> {
        Ok(self.lock()?.engine().doorbell_fd().as_raw_fd())
    }

    #[getter]
    fn slot_count(&self) -> PyResult<usize> {
        Ok(self.lock()?.engine().hub.slot_count())
    }

    fn slot_step(&self, slot: usize) -> PyResult<usize> {
        let driver = self.lock()?;
        check_slot(&driver, slot)?;
        Ok(driver.engine().hub.slot_step(slot))
    }

    fn slot_state(&self, slot: usize) -> PyResult<&'static str> {
        let driver = self.lock()?;
        check_slot(&driver, slot)?;
        Ok(match driver.engine().hub.slot_state(slot) {
            SlotState::Vacant => "vacant",
            SlotState::Starting => "starting",
            SlotState::Idle => "idle",
            SlotState::Busy => "busy",
            SlotState::Stopping => "stopping",
            SlotState::Dead => "dead",
        })
    }

    /// `(pid, alive)` of the worker of `slot`: alive from its start until its exit is seen.
    fn worker(&self, slot: usize) -> PyResult<(u32, bool)> {
        let driver = self.lock()?;
        check_slot(&driver, slot)?;
        Ok(driver.worker(slot))
    }

    /// Tasks waiting for `step`: queued, or sent ahead to a worker that has not begun them.
    /// This is what `queue_capacity` bounds.
    fn waiting(&self, step: usize) -> PyResult<usize> {
        let driver = self.lock()?;
        let hub = &driver.engine().hub;
        if step >= hub.step_count() {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!("no step {step}")));
        }
        Ok(hub.waiting(step))
    }

    fn held_by(&self, slot: usize) -> PyResult<Vec<u64>> {
        let driver = self.lock()?;
        check_slot(&driver, slot)?;
        Ok(driver.engine().hub.held_by(slot))
    }

    /// Registers the process `pid` started for `slot`, acting as process `pool_index` of the
    /// pool (a replacement counts as a restart).
    fn worker_spawned(&self, py: Python<'_>, slot: usize, pid: u32, pool_index: u32) -> PyResult<()> {
        let mut driver = self.lock()?;
        check_slot(&driver, slot)?;
        driver.worker_spawned(slot, pid, pool_index).map_err(py_err(py))
    }

    /// Registers an executor's worker for `slot` (host code in this process serving the slot;
    /// see `aqueduct.executors`): no pid, this process's row of the pool. It reports its end
    /// with the notifier of `exit_notifier(slot)`.
    fn executor_started(&self, slot: usize) -> PyResult<()> {
        let mut driver = self.lock()?;
        check_slot(&driver, slot)?;
        driver.executor_started(slot);
        Ok(())
    }

    /// What an executor's worker for `slot` calls, from any thread, when it stops serving: the
    /// flow handles it in its next poll like a worker process's exit.
    fn exit_notifier(&self, py: Python<'_>, slot: usize) -> PyResult<ExitNotifier> {
        let driver = self.lock()?;
        check_slot(&driver, slot)?;
        Ok(ExitNotifier { inner: driver.engine().exit_notifier(slot).map_err(py_err(py))? })
    }

    /// The replacement a `respawn` event asked for could not be started: the returned events
    /// include the `give_up`.
    fn respawn_failed<'py>(&self, py: Python<'py>, slot: usize) -> PyResult<Bound<'py, PyList>> {
        let mut driver = self.lock()?;
        check_slot(&driver, slot)?;
        let mut delivery = self.delivery(py, &driver);
        driver.respawn_failed(slot, &mut |e| delivery.take(e));
        delivery.finish(&mut driver)
    }

    /// Opens a port for a client process acting as process `pool_index` of the pool (rings of
    /// `capacity` bytes); returns the port id. The client attaches with the descriptors of
    /// `port_fds`.
    #[pyo3(signature = (pool_index, capacity=1<<20))]
    fn open_port(&self, py: Python<'_>, pool_index: u32, capacity: usize) -> PyResult<usize> {
        self.lock()?.engine_mut().open_port(capacity, pool_index).map_err(py_err(py))
    }

    /// `(region_fd, bell_fd)` of a port, to pass to its client.
    fn port_fds(&self, py: Python<'_>, port: usize) -> PyResult<(i32, i32)> {
        let driver = self.lock()?;
        let p = driver.engine().port(port).map_err(py_err(py))?;
        let region = p.region().fd().map_or(-1, |fd| fd.as_raw_fd());
        Ok((region, p.bell().fd().as_raw_fd()))
    }

    /// Closes a port whose client disconnected: cancels its tasks in flight and unmaps it.
    /// Returns the client's pool index, to reap (`Pool.reap`) once the client process is dead.
    fn close_port(&self, py: Python<'_>, port: usize) -> PyResult<u32> {
        self.lock()?.engine_mut().close_port(port).map_err(py_err(py))
    }

    #[getter]
    fn port_count(&self) -> PyResult<usize> {
        Ok(self.lock()?.engine().port_count())
    }

    /// Submits a call: a pickled task for `step`, resolved through `future` (see the module
    /// documentation). `deadline_ns` is on the monotonic clock (`time.monotonic_ns()`), 0 for
    /// none. `bufs` are the task's out-of-band buffers: on success their references pass to
    /// the driver; on failure they stay with them. Returns the call's id, for `cancel`. A full
    /// queue makes the call wait in the driver (no exception), unless the driver rejects.
    #[pyo3(signature = (future, step, priority, deadline_ns, body, bufs=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        future: Py<PyAny>,
        step: usize,
        priority: u8,
        deadline_ns: u64,
        body: &[u8],
        bufs: Option<Vec<Bound<'_, ShmBuffer>>>,
    ) -> PyResult<u64> {
        let bufs = bufs.unwrap_or_default();
        let refs = bufs.iter().map(|b| b.get().buf()).collect();
        let id = self
            .lock()?
            .submit(Call::Future(future), step, priority, Nanos(deadline_ns), body, refs)
            .map_err(|refused| crate::errors::to_py(py, refused.error))?;
        for b in &bufs {
            b.get().detach();
        }
        Ok(id)
    }

    /// Submits a streaming call (see `submit`): `stream` has `set_result(value)`, called once
    /// as a future's, and `_part(body, bufs, receipt)`, called for each partial result before
    /// it; the caller gives each receipt back with `release_part` once it has taken the part.
    /// `idle_ns` > 0: the call fails (`idle_timeout`) when no part comes for that long.
    #[pyo3(signature = (stream, step, priority, deadline_ns, idle_ns, body, bufs=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit_stream(
        &self,
        py: Python<'_>,
        stream: Py<PyAny>,
        step: usize,
        priority: u8,
        deadline_ns: u64,
        idle_ns: u64,
        body: &[u8],
        bufs: Option<Vec<Bound<'_, ShmBuffer>>>,
    ) -> PyResult<u64> {
        let bufs = bufs.unwrap_or_default();
        let refs = bufs.iter().map(|b| b.get().buf()).collect();
        let open = StreamOpen { idle: (idle_ns > 0).then(|| Duration::from_nanos(idle_ns)), optional: false };
        let token = Call::Stream(Arc::new(stream));
        let id = self
            .lock()?
            .submit_stream(token, step, priority, Nanos(deadline_ns), open, body, refs)
            .map_err(|refused| crate::errors::to_py(py, refused.error))?;
        for b in &bufs {
            b.get().detach();
        }
        Ok(id)
    }

    /// The caller of streaming call `call` took the part with this receipt: its worker may
    /// send another, and the stream's idle limit counts from now. A receipt of a call that has
    /// ended is ignored.
    fn part_taken(&self, call: u64, receipt: u128) -> PyResult<()> {
        self.lock()?.part_taken(call, PartReceipt::from_u128(receipt));
        Ok(())
    }

    /// The caller gave up on a call: its task is dropped and its future is never resolved.
    fn cancel(&self, call: u64) -> PyResult<bool> {
        Ok(self.lock()?.cancel(call))
    }

    /// Handles whatever is ready without blocking: resolves the futures of finished calls and
    /// returns the worker events. With `events=False` only what workers published is read (no
    /// system call): for the event loop's spin, which learns about exits, timers and the
    /// doorbell from `fileno()`.
    /// Returns `(outcomes handled, worker events)`.
    #[pyo3(signature = (events=true))]
    fn poll<'py>(&self, py: Python<'py>, events: bool) -> PyResult<(usize, Bound<'py, PyList>)> {
        let mut driver = self.lock()?;
        let mut delivery = self.delivery(py, &driver);
        let n = driver.poll(events, &mut |e| delivery.take(e)).map_err(py_err(py))?;
        let events = delivery.finish(&mut driver)?;
        Ok((n, events))
    }

    /// A pass of the event loop's polling (`aqueduct_core::Driver::poll_pass`): handles the
    /// rings (and with `events` the reactor: doorbell, timers, exits); returns how many outcomes
    /// it handled, the events to act on, and whether to pass again soon rather than sleep on
    /// the descriptor.
    #[pyo3(signature = (events=false))]
    fn poll_pass<'py>(&self, py: Python<'py>, events: bool) -> PyResult<(usize, Bound<'py, PyList>, bool)> {
        let mut driver = self.lock()?;
        let mut delivery = self.delivery(py, &driver);
        let (n, again) = driver.poll_pass(events, &mut |e| delivery.take(e)).map_err(py_err(py))?;
        let events = delivery.finish(&mut driver)?;
        Ok((n, events, again))
    }

    /// Blocks (without the GIL) until something happens or `timeout` seconds pass, then
    /// handles it as `poll` does. Interruptible by signals (Ctrl-C).
    #[pyo3(signature = (timeout=None))]
    fn wait<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<(usize, Bound<'py, PyList>)> {
        let deadline = args::deadline("timeout", timeout)?;
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)),
                None => Duration::from_millis(100),
            };
            // Wait on a duplicate of the epoll descriptor without holding the driver's lock.
            let epoll = {
                let mut driver = self.lock()?;
                if driver.engine_mut().prepare_sleep() {
                    Some(
                        driver
                            .engine()
                            .fd()
                            .try_clone_to_owned()
                            .map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?,
                    )
                } else {
                    None
                }
            };
            if let Some(fd) = epoll {
                py.detach(|| aqueduct_core::reactor::block_on(fd.as_fd(), Some(slice))).map_err(py_err(py))?;
            }
            let (n, events) = self.poll(py, true)?;
            if n > 0 || !events.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok((n, events));
            }
            py.check_signals()?;
        }
    }

    /// Raises the doorbell flag before the caller goes idle; `False` means records arrived
    /// meanwhile and the caller should poll instead.
    fn prepare_sleep(&self) -> PyResult<bool> {
        Ok(self.lock()?.engine_mut().prepare_sleep())
    }

    /// How long (µs) this flow's processes spin before they sleep, as of now.
    #[getter]
    fn spin_us(&self) -> PyResult<u64> {
        Ok(self.lock()?.engine().hub.spin().budget().as_micros() as u64)
    }

    /// The event loop starts polling the engine (after a sleep or a submit): a new spin window.
    fn open_spin_window(&self) -> PyResult<()> {
        self.lock()?.open_spin_window();
        Ok(())
    }

    /// Whether the event loop should poll again soon rather than sleep: tasks are in flight and
    /// results keep coming within the spin budget, and nobody else wants this CPU.
    fn keep_polling(&self) -> PyResult<bool> {
        Ok(self.lock()?.keep_polling())
    }

    /// Whether worker exits are watched by polling `/proc` (every 50 ms) rather than through
    /// pidfds: the kernel refused `pidfd_open`, or `AQUEDUCT_EXIT_WATCH=poll` asked for it.
    #[getter]
    fn polls_exits(&self) -> PyResult<bool> {
        Ok(self.lock()?.engine().reactor().polls_exits())
    }

    /// Tasks in the engine (this process's calls and port clients').
    #[getter]
    fn in_flight(&self) -> PyResult<usize> {
        Ok(self.lock()?.engine().hub.in_flight())
    }

    /// This process's calls not yet answered (in the engine or waiting for room).
    #[getter]
    fn pending(&self) -> PyResult<usize> {
        Ok(self.lock()?.pending())
    }

    /// `running`, `draining` (a graceful stop waits for the calls in flight) or `stopping`.
    #[getter]
    fn state(&self) -> PyResult<&'static str> {
        Ok(match self.lock()?.state() {
            DriverState::Running => "running",
            DriverState::Draining => "draining",
            DriverState::Stopping => "stopping",
        })
    }

    fn queue_len(&self, step: usize) -> PyResult<usize> {
        let driver = self.lock()?;
        let hub = &driver.engine().hub;
        if step >= hub.step_count() {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!("no step {step}")));
        }
        Ok(hub.queue_len(step))
    }

    /// Stops taking calls; calls waiting for room fail (`not_running`). A graceful stop then
    /// waits at most `grace` seconds for the calls in flight (a `drained` or `grace_expired`
    /// event follows); a hard one fails every call now, and escalates a graceful one under way.
    /// Then `stop_workers`.
    fn begin_stop<'py>(&self, py: Python<'py>, graceful: bool, grace: f64) -> PyResult<Bound<'py, PyList>> {
        let grace = args::duration("grace_sec", grace)?;
        let mut driver = self.lock()?;
        let mut delivery = self.delivery(py, &driver);
        driver.begin_stop(graceful, grace, &mut |e| delivery.take(e)).map_err(py_err(py))?;
        delivery.finish(&mut driver)
    }

    /// Tells every live worker to exit after its batch, or (`hard`) kills it. Returns whether
    /// any was alive; an `all_exited` event follows once they are gone.
    fn stop_workers(&self, hard: bool) -> PyResult<bool> {
        Ok(self.lock()?.stop_workers(hard))
    }

    /// Sends a signal to the worker of `slot` (through its pidfd, or by pid once its identity
    /// is checked where exits are polled).
    fn signal_worker(&self, py: Python<'_>, slot: usize, signum: i32) -> PyResult<()> {
        let sig = rustix::process::Signal::from_named_raw(signum)
            .ok_or_else(|| pyo3::exceptions::PyValueError::new_err(format!("unknown signal {signum}")))?;
        self.lock()?.engine().reactor().signal(slot, sig).map_err(py_err(py))
    }

    /// Per step, the health of its workers and queue, from the engine and the driver.
    fn health(&self) -> PyResult<Vec<StepHealth>> {
        Ok(self
            .lock()?
            .health()
            .into_iter()
            .map(|h| StepHealth {
                alive: h.alive,
                ready: h.ready,
                deaths: h.deaths,
                restarts: h.restarts,
                waiting: h.waiting,
                waiting_room: h.waiting_room,
                in_flight: h.in_flight,
                longest_batch_s: h.longest_batch.map(|d| d.as_secs_f64()),
                overdue: h.overdue,
            })
            .collect())
    }

    /// How calls ended, `[step][priority][end]` with ends `complete`, `timeout`, `cancel`,
    /// `error`: this process's calls and port clients'.
    fn counts(&self) -> PyResult<Vec<Vec<[u64; 4]>>> {
        Ok(self.lock()?.counts().by_step)
    }

    fn step_stats<'py>(&self, py: Python<'py>, step: usize) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock()?.engine().hub.step_stats(step);
        let d = PyDict::new(py);
        d.set_item("batches", s.batches)?;
        d.set_item("tasks", s.tasks)?;
        d.set_item("expired", s.expired)?;
        d.set_item("failed", s.failed)?;
        d.set_item("worker_deaths", s.worker_deaths)?;
        Ok(d)
    }

    /// Seconds the batch the worker of `slot` is running has run (at most), or `None` when it
    /// has none.
    fn batch_running_for(&self, slot: usize) -> PyResult<Option<f64>> {
        let driver = self.lock()?;
        check_slot(&driver, slot)?;
        Ok(driver.engine().hub.batch_running_for(slot, Nanos::now()).map(|d| d.as_secs_f64()))
    }

    /// Per entry step, the streams of `Flow.stream`: `open` (not answered yet), `parts`
    /// delivered since the start, `first_part_us` (a histogram of the time from submission to
    /// the first part, as `metrics` gives them).
    fn stream_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let stats = self.lock()?.stream_stats();
        let out = PyList::empty(py);
        for s in stats {
            let d = PyDict::new(py);
            d.set_item("open", s.open)?;
            d.set_item("parts", s.parts)?;
            let h = &s.first_part_us;
            d.set_item("first_part_us", (h.buckets.to_vec(), h.count, h.sum))?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Every metric, as plain Python values (histograms are `(buckets, count, sum)`; see
    /// `aqueduct_core::metrics`). With `drain=True` the sample rings are consumed: the StatsD
    /// exporter is their one reader.
    #[pyo3(signature = (drain=false))]
    fn metrics<'py>(&self, py: Python<'py>, drain: bool) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.lock()?.engine_mut().hub.metrics(drain);
        let hist = |h: &Histogram| -> PyResult<Bound<'py, PyAny>> {
            Ok((h.buckets.to_vec(), h.count, h.sum).into_pyobject(py)?.into_any())
        };
        let steps = PyList::empty(py);
        for m in &snap.steps {
            let d = PyDict::new(py);
            for (i, name) in WORKER_SERIES.iter().enumerate() {
                d.set_item(*name, hist(&m.worker[i])?)?;
                d.set_item(format!("{name}_samples"), m.worker_samples[i].clone())?;
            }
            d.set_item("batch_size", hist(&m.batch_size)?)?;
            d.set_item("batch_size_samples", m.batch_size_samples.clone())?;
            d.set_item("batch_wait_us", hist(&m.batch_wait_us)?)?;
            d.set_item("batch_wait_us_samples", m.batch_wait_samples.clone())?;
            d.set_item("queue_len", m.queue_len)?;
            d.set_item("batches", m.stats.batches)?;
            d.set_item("tasks", m.stats.tasks)?;
            d.set_item("expired", m.stats.expired)?;
            d.set_item("failed", m.stats.failed)?;
            d.set_item("worker_deaths", m.stats.worker_deaths)?;
            steps.append(d)?;
        }
        let routes = PyList::empty(py);
        for r in &snap.routes {
            let to: Option<usize> = (r.to != aqueduct_core::message::ROUTE_DONE).then_some(r.to as usize);
            let transfer = hist(&r.transfer_us)?;
            routes.append((
                r.step,
                to,
                r.priority,
                transfer,
                r.transfer_samples.clone(),
                hist(&r.size)?,
                r.size_samples.clone(),
            ))?;
        }
        let out = PyDict::new(py);
        out.set_item("steps", steps)?;
        out.set_item("routes", routes)?;
        Ok(out)
    }

    /// Releases the shared memory and every descriptor now. Idempotent; any later call raises
    /// `NotRunningError`.
    fn close(&self, py: Python<'_>) {
        // Outcomes the HTTP front's poller forwarded and nobody took yet: their futures are
        // resolved now, while the pool their buffers are in is still open.
        let _ = self.take_forwarded(py);
        let engine = self.guard().take();
        drop(engine);
        *self.shared.forwarding() = Forwarding::default();
    }

    /// Wakes the HTTP front's poller after a submit from Python, as a submit of its own does.
    fn kick_poller(&self) {
        self.shared.poller.kick();
    }

    /// An eventfd that is readable while the HTTP front's poller has forwarded something for
    /// this thread (`take_forwarded()`): the event loop watches it instead of `fileno()` while
    /// the front polls the driver.
    fn notify_fd(&self) -> PyResult<i32> {
        let _open = self.lock()?;
        let mut forwarding = self.shared.forwarding();
        if forwarding.notify.is_none() {
            let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
            let fd = rustix::event::eventfd(0, flags)
                .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("cannot create an eventfd: {e}")))?;
            forwarding.notify = Some(fd);
        }
        Ok(forwarding.notify.as_ref().map_or(-1, |fd| fd.as_raw_fd()))
    }

    /// Resolves the futures whose outcomes the HTTP front's poller found and returns the
    /// worker events it found, as `poll()` would have.
    fn take_forwarded<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        // The driver lock first: a pass of the front's poller under way forwards before this.
        let driver = self.guard();
        let taken = {
            let mut forwarding = self.shared.forwarding();
            if let Some(notify) = &forwarding.notify {
                let mut counter = [0u8; 8];
                let _ = rustix::io::read(notify, &mut counter);
            }
            std::mem::take(&mut forwarding.items)
        };
        let events = PyList::empty(py);
        let arena = match &*driver {
            Some(driver) => driver.engine().hub.arena().clone(),
            None => return Ok(events),
        };
        let mut unclaimed = Vec::new();
        for item in taken {
            match item {
                Forwarded::Outcome(future, outcome) => match outcome_value(py, &arena, outcome) {
                    Ok(value) => resolve(py, future.clone_ref(py), value),
                    Err(err) => undeliverable(py, future.clone_ref(py), err),
                },
                Forwarded::Part(stream, body, bufs, receipt) => {
                    if !deliver_part(py, &arena, &stream, Payload::Inline(&body), bufs, receipt) {
                        unclaimed.push(receipt);
                    }
                }
                Forwarded::Event(event) => events.append(Bound::new(py, event)?)?,
            }
        }
        let mut driver = driver;
        if let Some(driver) = driver.as_mut() {
            for receipt in unclaimed {
                driver.release_part(receipt);
            }
        }
        Ok(events)
    }

    #[getter]
    fn closed(&self) -> bool {
        self.guard().is_none()
    }

    fn __repr__(&self) -> String {
        match &*self.guard() {
            Some(d) => format!(
                "<aqueduct._core.Driver steps={} workers={} pending={}>",
                d.engine().hub.step_count(),
                d.engine().hub.slot_count(),
                d.pending()
            ),
            None => "<aqueduct._core.Driver closed>".into(),
        }
    }
}

fn check_slot(driver: &PyDriver, slot: usize) -> PyResult<()> {
    if slot >= driver.engine().hub.slot_count() {
        return Err(pyo3::exceptions::PyIndexError::new_err(format!("no worker slot {slot}")));
    }
    Ok(())
}
