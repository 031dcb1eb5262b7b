#![forbid(unsafe_code)]
//! `aqueduct._core.Engine`: the main process's side of a flow, driven by `aqueduct.flow.Flow`.
//!
//! The Python event loop watches `fileno()` and calls `poll()` when it is readable (and, while
//! tasks are in flight, for a short spin window after each completion). Outcomes come back in
//! bulk, as one list of plain tuples per call, so the per-task cost on the Python side is one
//! tuple unpack:
//! - `(0, task_id, body: bytes, bufs: list[ShmBuffer])`: done; body is the pickled task and
//!   bufs its out-of-band buffers, each owning a reference;
//! - `(1, task_id, kind: str, step: int, detail)`: failed, kind one of `handler` (detail: the
//!   pickled error), `expired`, `died` (detail: pid), `handler_timeout` (detail: the pid of the
//!   worker killed for running past the step's limit), `stopped`, `shm_exhausted`;
//! - `(2, slot, step, pid, event: str, message)`: a worker became `ready`, `start_failed` or
//!   `exited`.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aqueduct_core::hub::{Failure, HubConfig, Outcome, Payload, SlotState, StepSpec};
use aqueduct_core::metrics::{Histogram, WORKER_SERIES};
use aqueduct_core::shm::{Arena, BufRef};
use aqueduct_core::{Engine as CoreEngine, Nanos};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::args;
use crate::errors::py_err;
use crate::shm::{Pool, ShmBuffer};

#[pyclass(frozen, module = "aqueduct._core")]
pub struct Engine {
    /// `None` once closed: `close()` releases the shared memory and every descriptor at a
    /// known moment, whatever Python references to this object remain (tracebacks keep frames,
    /// and frames keep their locals, alive until the garbage collector runs).
    inner: Mutex<Option<CoreEngine>>,
}

/// A locked, open engine.
struct Open<'a>(MutexGuard<'a, Option<CoreEngine>>);

impl std::ops::Deref for Open<'_> {
    type Target = CoreEngine;
    fn deref(&self) -> &CoreEngine {
        self.0.as_ref().expect("checked open")
    }
}

impl std::ops::DerefMut for Open<'_> {
    fn deref_mut(&mut self) -> &mut CoreEngine {
        self.0.as_mut().expect("checked open")
    }
}

impl Engine {
    fn lock(&self) -> PyResult<Open<'_>> {
        // A panic while holding the lock is a bug already reported; keep serving.
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(Python::attach(|py| crate::errors::to_py(py, aqueduct_core::EngineError::Stopped)));
        }
        Ok(Open(guard))
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

/// Converts one outcome to its tuple and appends it.
fn push_outcome(py: Python<'_>, arena: &Arc<Arena>, out: &Bound<'_, PyList>, o: Outcome<'_>) -> PyResult<()> {
    let item = match o {
        Outcome::Done { task_id, body, bufs } => {
            let bufs = buffers(py, arena, bufs)?;
            (0u8, task_id, payload_bytes(py, arena, body)?, bufs).into_pyobject(py)?.into_any()
        }
        Outcome::Failed { task_id, failure } => {
            let (kind, step, detail): (&str, i64, Bound<'_, PyAny>) = match failure {
                Failure::Handler { step, body } => ("handler", step as i64, payload_bytes(py, arena, body)?.into_any()),
                Failure::Expired { step } => ("expired", step as i64, py.None().into_bound(py)),
                Failure::WorkerDied { step, pid } => ("died", step as i64, pid.into_pyobject(py)?.into_any()),
                Failure::HandlerTimeout { step, pid } => {
                    ("handler_timeout", step as i64, pid.into_pyobject(py)?.into_any())
                }
                Failure::Stopped => ("stopped", -1, py.None().into_bound(py)),
                Failure::ArenaExhausted { step } => ("shm_exhausted", step as i64, py.None().into_bound(py)),
            };
            (1u8, task_id, kind, step, detail).into_pyobject(py)?.into_any()
        }
        Outcome::WorkerReady { slot, step, pid } => (2u8, slot, step, pid, "ready", "").into_pyobject(py)?.into_any(),
        Outcome::WorkerStartFailed { slot, step, pid, message } => {
            (2u8, slot, step, pid, "start_failed", message).into_pyobject(py)?.into_any()
        }
        Outcome::WorkerExited { slot, step, pid } => (2u8, slot, step, pid, "exited", "").into_pyobject(py)?.into_any(),
    };
    out.append(item)
}

#[pymethods]
impl Engine {
    /// `steps` is a list of `(nprocs, batch_size, batch_timeout_seconds, queue_capacity,
    /// handle_timeout_seconds or None)`.
    #[new]
    #[pyo3(signature = (steps, pool, priorities=1, fair_every=10, ring_capacity=1<<20, inline_max=64<<10, metrics=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        steps: Vec<(usize, usize, f64, usize, Option<f64>)>,
        pool: &Pool,
        priorities: usize,
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
        Ok(Self { inner: Mutex::new(Some(engine)) })
    }

    /// The descriptor to watch for readability.
    fn fileno(&self) -> PyResult<i32> {
        Ok(self.lock()?.fd().as_raw_fd())
    }

    fn region_fd(&self) -> PyResult<i32> {
        Ok(self.lock()?.region_fd().as_raw_fd())
    }

    fn doorbell_fd(&self) -> PyResult<i32> {
        Ok(self.lock()?.doorbell_fd().as_raw_fd())
    }

    #[getter]
    fn slot_count(&self) -> PyResult<usize> {
        Ok(self.lock()?.hub.slot_count())
    }

    fn slot_step(&self, slot: usize) -> PyResult<usize> {
        Ok(self.lock()?.hub.slot_step(slot))
    }

    fn slot_state(&self, slot: usize) -> PyResult<&'static str> {
        Ok(match self.lock()?.hub.slot_state(slot) {
            SlotState::Vacant => "vacant",
            SlotState::Starting => "starting",
            SlotState::Idle => "idle",
            SlotState::Busy => "busy",
            SlotState::Stopping => "stopping",
            SlotState::Dead => "dead",
        })
    }

    /// Tasks waiting for `step`: queued, or sent ahead to a worker that has not begun them.
    /// This is what `queue_capacity` bounds.
    fn waiting(&self, step: usize) -> PyResult<usize> {
        let engine = self.lock()?;
        if step >= engine.hub.step_count() {
            return Err(pyo3::exceptions::PyIndexError::new_err(format!("no step {step}")));
        }
        Ok(engine.hub.waiting(step))
    }

    fn held_by(&self, slot: usize) -> PyResult<Vec<u64>> {
        Ok(self.lock()?.hub.held_by(slot))
    }

    /// Seconds the batch the worker of `slot` is running has run (at most), or `None` when it
    /// has none.
    fn batch_running_for(&self, slot: usize) -> PyResult<Option<f64>> {
        Ok(self.lock()?.hub.batch_running_for(slot, Nanos::now()).map(|d| d.as_secs_f64()))
    }

    /// Whether the worker of `slot` ran a batch past its step's `handle_timeout` and is being
    /// killed for it.
    fn overran(&self, slot: usize) -> PyResult<bool> {
        Ok(self.lock()?.hub.overran(slot))
    }

    /// Registers the process `pid` started for `slot`, acting as process `pool_index` of the pool.
    fn worker_spawned(&self, py: Python<'_>, slot: usize, pid: u32, pool_index: u32) -> PyResult<()> {
        self.lock()?.worker_spawned(slot, pid, pool_index).map_err(py_err(py))
    }

    /// Opens a port for a client process acting as process `pool_index` of the pool (rings of
    /// `capacity` bytes); returns the port id. The client attaches with the descriptors of
    /// `port_fds`.
    #[pyo3(signature = (pool_index, capacity=1<<20))]
    fn open_port(&self, py: Python<'_>, pool_index: u32, capacity: usize) -> PyResult<usize> {
        self.lock()?.open_port(capacity, pool_index).map_err(py_err(py))
    }

    /// `(region_fd, bell_fd)` of a port, to pass to its client.
    fn port_fds(&self, py: Python<'_>, port: usize) -> PyResult<(i32, i32)> {
        let engine = self.lock()?;
        let p = engine.port(port).map_err(py_err(py))?;
        let region = p.region().fd().map_or(-1, |fd| fd.as_raw_fd());
        Ok((region, p.bell().fd().as_raw_fd()))
    }

    /// Closes a port whose client disconnected: cancels its tasks in flight and unmaps it.
    /// Returns the client's pool index, to reap (`Pool.reap`) once the client process is dead.
    fn close_port(&self, py: Python<'_>, port: usize) -> PyResult<u32> {
        self.lock()?.close_port(port).map_err(py_err(py))
    }

    #[getter]
    fn port_count(&self) -> PyResult<usize> {
        Ok(self.lock()?.port_count())
    }

    /// Queues a pickled task at `step`; returns its engine id. `deadline_ns` is on the
    /// monotonic clock (`time.monotonic_ns()`), 0 for none. `bufs` are the task's out-of-band
    /// buffers: on success their references pass to the task; on failure they stay with them.
    #[pyo3(signature = (step, priority, deadline_ns, body, bufs=None))]
    fn submit(
        &self,
        py: Python<'_>,
        step: usize,
        priority: u8,
        deadline_ns: u64,
        body: &[u8],
        bufs: Option<Vec<Bound<'_, ShmBuffer>>>,
    ) -> PyResult<u64> {
        let bufs = bufs.unwrap_or_default();
        let refs = bufs.iter().map(|b| b.get().buf()).collect();
        let id =
            self.lock()?.hub.submit_with_bufs(step, priority, Nanos(deadline_ns), body, refs).map_err(py_err(py))?;
        for b in &bufs {
            b.get().detach();
        }
        Ok(id)
    }

    fn cancel(&self, task_id: u64) -> PyResult<bool> {
        Ok(self.lock()?.hub.cancel(task_id))
    }

    /// Handles whatever is ready without blocking; returns the outcomes. With
    /// `events=False` only what workers published is read (no system call): for the event
    /// loop's spin, which learns about exits, timers and the doorbell from `fileno()`.
    #[pyo3(signature = (events=true))]
    fn poll<'py>(&self, py: Python<'py>, events: bool) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let mut engine = self.lock()?;
        let arena = engine.hub.arena().clone();
        let mut err = None;
        let mut sink = |o: Outcome<'_>| {
            if err.is_none() {
                err = push_outcome(py, &arena, &out, o).err();
            }
        };
        if events { engine.poll(&mut sink) } else { engine.poll_rings(&mut sink) }.map_err(py_err(py))?;
        err.map_or(Ok(out), Err)
    }

    /// Blocks (without the GIL) until something happens or `timeout` seconds pass, then
    /// returns the outcomes. Interruptible by signals (Ctrl-C).
    #[pyo3(signature = (timeout=None))]
    fn wait<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyList>> {
        let deadline = args::deadline("timeout", timeout)?;
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)),
                None => Duration::from_millis(100),
            };
            // Wait on a duplicate of the epoll descriptor without holding the engine's lock.
            let epoll = {
                let mut engine = self.lock()?;
                if engine.prepare_sleep() {
                    Some(
                        engine
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
            let out = self.poll(py, true)?;
            if !out.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(out);
            }
            py.check_signals()?;
        }
    }

    /// Raises the doorbell flag before the caller goes idle; `False` means records arrived
    /// meanwhile and the caller should poll instead.
    fn prepare_sleep(&self) -> PyResult<bool> {
        Ok(self.lock()?.prepare_sleep())
    }

    /// How long (µs) this flow's processes spin before they sleep; the event loop uses it too.
    #[getter]
    fn spin_us(&self) -> PyResult<u64> {
        Ok(self.lock()?.hub.spin().spin.as_micros() as u64)
    }

    #[getter]
    fn in_flight(&self) -> PyResult<usize> {
        Ok(self.lock()?.hub.in_flight())
    }

    fn queue_len(&self, step: usize) -> PyResult<usize> {
        Ok(self.lock()?.hub.queue_len(step))
    }

    fn step_stats<'py>(&self, py: Python<'py>, step: usize) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock()?.hub.step_stats(step);
        let d = PyDict::new(py);
        d.set_item("batches", s.batches)?;
        d.set_item("tasks", s.tasks)?;
        d.set_item("expired", s.expired)?;
        d.set_item("failed", s.failed)?;
        d.set_item("worker_deaths", s.worker_deaths)?;
        Ok(d)
    }

    fn stop_accepting(&self) -> PyResult<()> {
        self.lock()?.hub.stop_accepting();
        Ok(())
    }

    /// Asks the worker of `slot` to exit after its current batch.
    fn send_stop(&self, py: Python<'_>, slot: usize) -> PyResult<()> {
        self.lock()?.hub.send_stop(slot).map_err(py_err(py))
    }

    /// Sends a signal to the worker of `slot` (through its pidfd).
    fn signal_worker(&self, py: Python<'_>, slot: usize, signum: i32) -> PyResult<()> {
        let sig = rustix::process::Signal::from_named_raw(signum)
            .ok_or_else(|| pyo3::exceptions::PyValueError::new_err(format!("unknown signal {signum}")))?;
        self.lock()?.reactor().signal(slot, sig).map_err(py_err(py))
    }

    /// Whether the process of `slot` is still being watched (has not been seen exiting).
    fn worker_alive(&self, slot: usize) -> PyResult<bool> {
        Ok(self.lock()?.reactor().watching(slot))
    }

    /// Fails every queued and held task (a non-graceful stop); returns the outcomes.
    fn fail_all<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let mut engine = self.lock()?;
        let arena = engine.hub.arena().clone();
        let mut err = None;
        engine.hub.fail_all(&mut |o| {
            if err.is_none() {
                err = push_outcome(py, &arena, &out, o).err();
            }
        });
        err.map_or(Ok(out), Err)
    }

    /// Every metric, as plain Python values (histograms are `(buckets, count, sum)`; see
    /// `aqueduct_core::metrics`). With `drain=True` the sample rings are consumed: the StatsD
    /// exporter is their one reader.
    #[pyo3(signature = (drain=false))]
    fn metrics<'py>(&self, py: Python<'py>, drain: bool) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.lock()?.hub.metrics(drain);
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
    fn close(&self) {
        let engine = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(engine);
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    fn __repr__(&self) -> String {
        match &*self.inner.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => format!(
                "<aqueduct._core.Engine steps={} workers={} in_flight={}>",
                e.hub.step_count(),
                e.hub.slot_count(),
                e.hub.in_flight()
            ),
            None => "<aqueduct._core.Engine closed>".into(),
        }
    }
}
