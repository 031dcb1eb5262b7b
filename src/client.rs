#![forbid(unsafe_code)]
//! `aqueduct._core.PortClient`: a web worker's end of a port into a flow served by another
//! process, driven by `aqueduct.sockets`.
//!
//! The client's event loop watches `fileno()` (the port's bell) and calls `poll()` when it is
//! readable, then `prepare_sleep()`; submissions are written with `submit()` and made visible,
//! with at most one wake-up of the engine, by `flush()`. Responses have the engine's outcome
//! shapes: `(0, task_id, body, bufs)` and `(1, task_id, kind, step, detail)`, where `kind` is one
//! of `handler` (detail: the pickled error), `expired`, `died` (detail: pid), `stopped`,
//! `shm_exhausted` and `rejected` (detail: the reason), and `step` is -1 when the failure
//! belongs to no step.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use aqueduct_core::hub::Doorbell;
use aqueduct_core::port::{FailureKind, PortClient as CorePortClient, Response, NO_STEP};
use aqueduct_core::shm::fd::adopt_inherited;
use aqueduct_core::shm::{Arena, SharedRegion};
use aqueduct_core::Nanos;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};

use crate::driver::{buffers, payload_bytes};
use crate::errors::py_err;
use crate::shm::{Pool, ShmBuffer};

#[pyclass(frozen, module = "aqueduct._core")]
pub struct PortClient {
    /// `None` once closed.
    inner: Mutex<Option<CorePortClient>>,
    arena: Arc<Arena>,
}

impl PortClient {
    fn lock(&self) -> PyResult<MutexGuard<'_, Option<CorePortClient>>> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(Python::attach(|py| crate::errors::to_py(py, aqueduct_core::EngineError::Stopped)));
        }
        Ok(guard)
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
        Ok(Self { inner: Mutex::new(Some(client)), arena: pool.arena.clone() })
    }

    /// The descriptor to watch for readability: responses arrived.
    fn fileno(&self) -> PyResult<i32> {
        Ok(self.lock()?.as_ref().expect("checked open").bell().fd().as_fd().as_raw_fd())
    }

    /// Writes a pickled task for `step`. Returns `False` when the request ring is full (retry
    /// after responses came back). On success the message takes over `bufs`' references.
    #[pyo3(signature = (task_id, step, priority, deadline_ns, body, bufs=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        task_id: u64,
        step: u16,
        priority: u8,
        deadline_ns: u64,
        body: &[u8],
        bufs: Option<Vec<Bound<'_, ShmBuffer>>>,
    ) -> PyResult<bool> {
        let bufs = bufs.unwrap_or_default();
        let refs: Vec<_> = bufs.iter().map(|b| b.get().buf()).collect();
        let mut guard = self.lock()?;
        let client = guard.as_mut().expect("checked open");
        let written = client.submit(task_id, step, priority, Nanos(deadline_ns), body, &refs).map_err(py_err(py))?;
        if written {
            for b in &bufs {
                b.get().detach();
            }
        }
        Ok(written)
    }

    /// Asks the engine to drop a task. `False` when the request ring is full.
    fn cancel(&self, py: Python<'_>, task_id: u64) -> PyResult<bool> {
        self.lock()?.as_mut().expect("checked open").cancel(task_id).map_err(py_err(py))
    }

    /// Publishes what was written and wakes the engine if it sleeps.
    fn flush(&self) -> PyResult<()> {
        self.lock()?.as_mut().expect("checked open").flush();
        Ok(())
    }

    /// Every response that arrived, as tuples (see the module documentation).
    fn poll<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let arena = self.arena.clone();
        let mut err = None;
        let mut guard = self.lock()?;
        let client = guard.as_mut().expect("checked open");
        client
            .poll(&mut |r| {
                if err.is_some() {
                    return;
                }
                let item = (|| -> PyResult<Bound<'py, PyAny>> {
                    Ok(match r {
                        Response::Done { task_id, body, bufs } => {
                            let bufs = buffers(py, &arena, bufs)?;
                            (0u8, task_id, payload_bytes(py, &arena, body)?, bufs).into_pyobject(py)?.into_any()
                        }
                        Response::Failed { task_id, kind, step, pid, detail } => {
                            let detail: Bound<'py, PyAny> = match (kind, detail) {
                                (FailureKind::WorkerDied | FailureKind::HandlerTimeout, _) => {
                                    pid.into_pyobject(py)?.into_any()
                                }
                                (FailureKind::Rejected, Some(d)) => {
                                    let bytes = payload_bytes(py, &arena, d)?;
                                    PyString::new(py, &String::from_utf8_lossy(bytes.as_bytes())).into_any()
                                }
                                (_, Some(d)) => payload_bytes(py, &arena, d)?.into_any(),
                                (_, None) => py.None().into_bound(py),
                            };
                            let step = if step == NO_STEP { -1 } else { i64::from(step) };
                            (1u8, task_id, kind.name(), step, detail).into_pyobject(py)?.into_any()
                        }
                    })
                })();
                match item.and_then(|i| out.append(i)) {
                    Ok(()) => {}
                    Err(e) => err = Some(e),
                }
            })
            .map_err(py_err(py))?;
        err.map_or(Ok(out), Err)
    }

    /// Raises the flag that makes the engine ring; `False` when responses arrived meanwhile
    /// (poll again instead of waiting).
    fn prepare_sleep(&self) -> PyResult<bool> {
        Ok(self.lock()?.as_mut().expect("checked open").prepare_sleep())
    }

    /// Unmaps the port and closes its descriptors now. Idempotent.
    fn close(&self) {
        let client = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(client);
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}
