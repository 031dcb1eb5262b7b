#![forbid(unsafe_code)]
//! `aqueduct._core.PortClient`: a web worker's end of a port into a flow served by another
//! process, driven by `aqueduct.sockets`, with its calls kept by [`aqueduct_core::caller`].
//!
//! A call is submitted with its asyncio future; the client resolves every future exactly once,
//! as the driver does: with `(body, bufs)` for a finished task or with a `Failure` whose `kind`
//! is the engine's (`handler`, `expired`, `died`, `handler_timeout`, `stopped`,
//! `shm_exhausted`, `rejected`), `timeout` (the deadline passed) or `lost` (the client closed
//! first). The client's event loop watches `fileno()` (the port's bell) and calls `poll()` when
//! it is readable and when the deadline of `next_deadline()` comes, then `prepare_sleep()`;
//! submissions are made visible, with at most one wake-up of the engine, by `flush()`.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use aqueduct_core::caller::{Answer, Caller};
use aqueduct_core::hub::Doorbell;
use aqueduct_core::port::{FailureKind, PortClient as CorePortClient, NO_STEP};
use aqueduct_core::shm::fd::adopt_inherited;
use aqueduct_core::shm::{Arena, SharedRegion};
use aqueduct_core::stream::PartReceipt;
use aqueduct_core::Nanos;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::driver::{buffers, deliver_part, payload_bytes, resolve, undeliverable, Failure};
use crate::errors::py_err;
use crate::shm::{Pool, ShmBuffer};

type PyCaller = Caller<Py<PyAny>>;

#[pyclass(frozen, module = "aqueduct._core")]
pub struct PortClient {
    /// `None` once closed.
    inner: Mutex<Option<PyCaller>>,
    arena: Arc<Arena>,
}

impl PortClient {
    fn lock(&self) -> PyResult<MutexGuard<'_, Option<PyCaller>>> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(Python::attach(|py| crate::errors::to_py(py, aqueduct_core::EngineError::Stopped)));
        }
        Ok(guard)
    }
}

/// Resolves a call's future with its answer (a `rejected` failure if the answer cannot be
/// turned into Python objects: every call is answered), or hands a part to its stream object.
fn answer(py: Python<'_>, arena: &Arc<Arena>, a: Answer<'_, Py<PyAny>>) {
    let failure = |kind: &'static str, step: i64, detail: Py<PyAny>| -> PyResult<Bound<'_, PyAny>> {
        Ok(Bound::new(py, Failure::new(kind, step, detail))?.into_any())
    };
    let (call, value) = match a {
        Answer::Part { call, body, bufs } => {
            // The engine keeps the part's receipt: the stream's object gives back a placeholder.
            // (A part it refuses, out of memory, is dropped; its stream is cancelled by then.)
            let placeholder = PartReceipt { slot: 0, pos: 0, epoch: 0, seq: 0 };
            deliver_part(py, arena, call, body, bufs, placeholder);
            return;
        }
        Answer::Done { call, body, bufs } => {
            let value = (|| {
                let bufs = buffers(py, arena, bufs)?;
                let body = payload_bytes(py, arena, body)?;
                Ok(PyTuple::new(py, [body.into_any(), bufs.into_any()])?.into_any())
            })();
            (call, value)
        }
        Answer::Failed { call, kind, step, pid, detail } => {
            let value = (|| {
                let detail: Py<PyAny> = match (kind, detail) {
                    (FailureKind::WorkerDied | FailureKind::HandlerTimeout, _) => {
                        pid.into_pyobject(py)?.into_any().unbind()
                    }
                    (FailureKind::Rejected, Some(d)) => {
                        let bytes = payload_bytes(py, arena, d)?;
                        PyString::new(py, &String::from_utf8_lossy(bytes.as_bytes())).into_any().unbind()
                    }
                    (_, Some(d)) => payload_bytes(py, arena, d)?.into_any().unbind(),
                    (_, None) => py.None(),
                };
                let step = if step == NO_STEP { -1 } else { i64::from(step) };
                failure(kind.name(), step, detail)
            })();
            (call, value)
        }
        Answer::TimedOut { call } => (call, failure("timeout", -1, py.None())),
        Answer::Lost { call } => (call, failure("lost", -1, py.None())),
    };
    match value {
        Ok(value) => resolve(py, call, value),
        Err(err) => undeliverable(py, call, err),
    }
}

#[pymethods]
impl PortClient {
    /// Attaches to a port whose descriptors this process received (taking ownership of all
    /// three); `pool` is this process's handle on the flow's pool, as the index the engine gave.
    #[new]
    fn new(py: Python<'_>, region_fd: i32, bell_fd: i32, engine_doorbell_fd: i32, pool: &Pool) -> PyResult<Self> {
        let region =
            Arc::new(SharedRegion::attach(adopt_inherited(region_fd).map_err(py_err(py))?).map_err(py_err(py))?);
        let bell = Doorbell::from_fd(adopt_inherited(bell_fd).map_err(py_err(py))?);
        let engine_bell = Doorbell::from_fd(adopt_inherited(engine_doorbell_fd).map_err(py_err(py))?);
        let client = CorePortClient::attach(region, pool.arena.clone(), engine_bell, bell).map_err(py_err(py))?;
        Ok(Self { inner: Mutex::new(Some(Caller::new(client))), arena: pool.arena.clone() })
    }

    /// The descriptor to watch for readability: responses arrived.
    fn fileno(&self) -> PyResult<i32> {
        Ok(self.lock()?.as_ref().expect("checked open").client().bell().fd().as_fd().as_raw_fd())
    }

    /// Submits a call: a pickled task for `step`, answered through `future` (see the module
    /// documentation). Returns the call's id, for `cancel`. On success the call takes over
    /// `bufs`' references (a full request ring keeps it in a backlog, sent as room frees up).
    /// `stream`: `future` is a stream object, as `Driver.submit_stream` takes, told each
    /// partial result with `_part(body, bufs, receipt)`; its caller calls `part_taken` for each.
    #[pyo3(signature = (future, step, priority, deadline_ns, body, bufs=None, *, stream=false))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        future: Py<PyAny>,
        step: u16,
        priority: u8,
        deadline_ns: u64,
        body: &[u8],
        bufs: Option<Vec<Bound<'_, ShmBuffer>>>,
        stream: bool,
    ) -> PyResult<u64> {
        let bufs = bufs.unwrap_or_default();
        let refs: Vec<_> = bufs.iter().map(|b| b.get().buf()).collect();
        let mut guard = self.lock()?;
        let caller = guard.as_mut().expect("checked open");
        let id = caller
            .submit(future, step, priority, Nanos(deadline_ns), body, refs, stream)
            .map_err(|refused| crate::errors::to_py(py, refused.error))?;
        for b in &bufs {
            b.get().detach();
        }
        Ok(id)
    }

    /// The caller gave up on a call: its future is never resolved and the engine drops it.
    fn cancel(&self, call: u64) -> PyResult<bool> {
        Ok(self.lock()?.as_mut().expect("checked open").cancel(call))
    }

    /// The caller of streaming call `call` took one of its parts (`receipt`, the placeholder
    /// its stream object was given, is ignored: the engine keeps the receipts): its worker may
    /// send another once this is flushed.
    #[pyo3(signature = (call, receipt=0))]
    fn part_taken(&self, call: u64, receipt: u128) -> PyResult<()> {
        let _ = receipt;
        self.lock()?.as_mut().expect("checked open").part_taken(call);
        Ok(())
    }

    /// Publishes what was submitted and wakes the engine if it sleeps.
    fn flush(&self) -> PyResult<()> {
        self.lock()?.as_mut().expect("checked open").flush();
        Ok(())
    }

    /// Resolves the futures of every call whose response arrived or whose deadline passed, and
    /// sends the backlog; returns how many calls were answered.
    fn poll(&self, py: Python<'_>) -> PyResult<usize> {
        let arena = self.arena.clone();
        let mut guard = self.lock()?;
        let caller = guard.as_mut().expect("checked open");
        caller.poll(Nanos::now(), &mut |a| answer(py, &arena, a)).map_err(py_err(py))
    }

    /// When the earliest pending deadline comes (`time.monotonic()` seconds), or `None`.
    fn next_deadline(&self) -> PyResult<Option<f64>> {
        Ok(self.lock()?.as_ref().expect("checked open").next_deadline().map(Nanos::as_secs_f64))
    }

    /// Calls not yet answered.
    #[getter]
    fn pending(&self) -> PyResult<usize> {
        Ok(self.lock()?.as_ref().expect("checked open").pending())
    }

    /// Raises the flag that makes the engine ring; `False` when responses arrived meanwhile
    /// (poll again instead of waiting).
    fn prepare_sleep(&self) -> PyResult<bool> {
        Ok(self.lock()?.as_mut().expect("checked open").prepare_sleep())
    }

    /// Answers every pending call with a `lost` failure, then unmaps the port and closes its
    /// descriptors. Idempotent.
    fn close(&self, py: Python<'_>) {
        let caller = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut caller) = caller {
            let arena = self.arena.clone();
            caller.lose_all(&mut |a| answer(py, &arena, a));
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}
