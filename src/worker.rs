#![forbid(unsafe_code)]
//! `aqueduct._core.Worker`: a worker process's end of the transport, driven by
//! `aqueduct._worker`.
//!
//! `recv()` blocks without the GIL in slices of at most 100 ms and checks for signals between
//! slices, so a worker waiting for work still reacts to Ctrl-C and SIGTERM handlers at once
//! while an idle worker stays asleep on its futex.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aqueduct_core::hub::Doorbell;
use aqueduct_core::message::Status;
use aqueduct_core::shm::fd::adopt_inherited;
use aqueduct_core::shm::{Arena, SharedRegion};
use aqueduct_core::worker::PartSent;
use aqueduct_core::{Received, WorkerEndpoint};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::errors::py_err;
use crate::shm::{Pool, ShmBuffer};

#[pyclass(frozen, module = "aqueduct._core")]
pub struct Worker {
    inner: Mutex<WorkerEndpoint>,
    arena: Arc<Arena>,
    /// Where large compact bodies are read before they are decoded (see `decode_large`).
    scratch: Mutex<Vec<u8>>,
}

/// Compact bodies from this size are decoded as they are received.
const DECODED_ON_RECEIPT: usize = 64 << 10;

impl Worker {
    fn lock(&self) -> MutexGuard<'_, WorkerEndpoint> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A large body in the compact form, decoded here as `(module, qualname, state)` from a
    /// scratch buffer this worker keeps: read into a fresh `bytes` and then decoded, a 1 MiB
    /// upload cost two fresh megabytes per task, which the allocator gave back to the kernel
    /// each time (hundreds of page faults per task). `None`: not such a body, or not readable
    /// as one (decoded from `bytes` later, where its error belongs to its task).
    fn decode_large<'py>(
        &self,
        py: Python<'py>,
        w: &WorkerEndpoint,
        i: usize,
        len: usize,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        if len < DECODED_ON_RECEIPT {
            return Ok(None);
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        scratch.resize(len, 0);
        w.read_body_into(i, &mut scratch).map_err(py_err(py))?;
        if scratch.first() != Some(&aqueduct_core::task_state::FORMAT) {
            return Ok(None);
        }
        Ok(crate::codec::decode_state(py, &scratch).ok())
    }
}

#[pymethods]
impl Worker {
    /// Attaches to `slot` of the flow whose region and doorbell descriptors this process
    /// inherited (taking ownership of both), using `pool` for large payloads.
    #[new]
    fn new(py: Python<'_>, region_fd: i32, doorbell_fd: i32, slot: usize, pool: &Pool) -> PyResult<Self> {
        let region =
            Arc::new(SharedRegion::attach(adopt_inherited(region_fd).map_err(py_err(py))?).map_err(py_err(py))?);
        let doorbell = Doorbell::from_fd(adopt_inherited(doorbell_fd).map_err(py_err(py))?);
        let endpoint = WorkerEndpoint::attach(region, pool.arena.clone(), slot, doorbell).map_err(py_err(py))?;
        Ok(Self { inner: Mutex::new(endpoint), arena: pool.arena.clone(), scratch: Mutex::default() })
    }

    fn ready(&self, py: Python<'_>) -> PyResult<()> {
        self.lock().ready().map_err(py_err(py))
    }

    fn start_failed(&self, py: Python<'_>, message: &str) -> PyResult<()> {
        self.lock().start_failed(message).map_err(py_err(py))
    }

    /// Waits for the next batch. Returns a list of `(deadline_ns, priority, body, bufs)` (bufs:
    /// the task's out-of-band buffers, each holding a reference of this process), or `None`
    /// when the flow asked this worker to stop, or `[]` when `timeout` seconds passed.
    #[pyo3(signature = (timeout=None))]
    fn recv<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Option<Bound<'py, PyList>>> {
        let deadline = crate::args::deadline("timeout", timeout)?;
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)),
                None => Duration::from_millis(100),
            };
            let got = py.detach(|| self.lock().recv(Some(slice))).map_err(py_err(py))?;
            match got {
                Received::Stop => return Ok(None),
                Received::Batch(n) => {
                    let w = self.lock();
                    let out = PyList::empty(py);
                    for i in 0..n {
                        let t = &w.tasks()[i];
                        let body = match self.decode_large(py, &w, i, t.body.len)? {
                            Some(state) => state.into_any(),
                            None => PyBytes::new_with(py, t.body.len, |buf| {
                                w.read_body_into(i, buf).map_err(|e| crate::errors::to_py(py, e))
                            })?
                            .into_any(),
                        };
                        let bufs = PyList::empty(py);
                        for b in &t.bufs {
                            self.arena.hold(&b.extent()).map_err(py_err(py))?;
                            bufs.append(Bound::new(py, ShmBuffer::owning(&self.arena, *b).map_err(py_err(py))?)?)?;
                        }
                        out.append((t.header.deadline.0, t.header.priority, body, bufs))?;
                    }
                    return Ok(Some(out));
                }
                Received::Timeout => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(Some(PyList::empty(py)));
                    }
                    py.check_signals()?;
                }
            }
        }
    }

    /// Answers for task `index` of the current batch. `status` is 0 (ok), 1 (handler error) or
    /// 2 (expired); `route` is the next step or 65535 for "back to the caller". `bufs` are the
    /// result's out-of-band buffers; their references pass to the result.
    #[pyo3(signature = (index, status, route, body, bufs=None))]
    fn send_result(
        &self,
        py: Python<'_>,
        index: usize,
        status: u8,
        route: u16,
        body: &[u8],
        bufs: Option<Vec<Bound<'_, ShmBuffer>>>,
    ) -> PyResult<()> {
        let status = match status {
            0 => Status::Ok,
            1 => Status::Error,
            2 => Status::Expired,
            other => return Err(PyValueError::new_err(format!("unknown status {other}"))),
        };
        let bufs = bufs.unwrap_or_default();
        let refs: Vec<_> = bufs.iter().map(|b| b.get().buf()).collect();
        // Without the GIL: a full ring waits for the engine to read it, and an executor's worker
        // shares this process (and its GIL) with the event loop that reads it.
        let sent = py.detach(|| {
            let mut w = self.lock();
            if index >= w.tasks().len() {
                return Ok(false);
            }
            w.send_result_with_bufs(index, status, route, body, &refs).map(|()| true)
        });
        if !sent.map_err(py_err(py))? {
            return Err(PyValueError::new_err(format!("no task {index} in the current batch")));
        }
        for b in &bufs {
            b.get().detach();
        }
        Ok(())
    }

    /// The sequence number of the batch `recv` returned last: `aqueduct.emit` passes it back,
    /// so that a part sent after its batch ended (from a thread the handler left running) is
    /// refused rather than given to the task now at that position.
    #[getter]
    fn batch_seq(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.lock().batch_seq())
    }

    /// `(streamed, cancelled)` of task `index` of batch `seq`: whether its caller reads partial
    /// results, and whether that caller is gone.
    fn stream_state(&self, py: Python<'_>, index: usize, seq: u64) -> PyResult<(bool, bool)> {
        // Without the GIL: another thread of the handler may hold the endpoint while it waits
        // for room, which comes from an event loop that may need this GIL (an executor's slot).
        let state = py.detach(|| {
            let w = self.lock();
            (index < w.tasks().len() && w.batch_seq() == seq).then(|| w.stream_state(index))
        });
        state.ok_or_else(|| batch_ended(index))
    }

    /// Sends a partial result of task `index` of batch `seq` (`aqueduct.streaming.emit`),
    /// waiting while its caller is a window of parts behind. Returns `"sent"`, `"not_streamed"`
    /// (the caller awaits the result only: dropped) or `"cancelled"` (the caller is gone:
    /// dropped). The buffers' references pass to the part either way.
    #[pyo3(signature = (index, seq, body, bufs=None))]
    fn send_part(
        &self,
        py: Python<'_>,
        index: usize,
        seq: u64,
        body: &[u8],
        bufs: Option<Vec<Bound<'_, ShmBuffer>>>,
    ) -> PyResult<&'static str> {
        let bufs = bufs.unwrap_or_default();
        let refs: Vec<_> = bufs.iter().map(|b| b.get().buf()).collect();
        // Without the GIL: waiting for room waits for the main process, and an executor's
        // worker shares this process with the event loop that gives the room back.
        let sent = py.detach(|| {
            let mut w = self.lock();
            if index >= w.tasks().len() || w.batch_seq() != seq {
                return Ok(None);
            }
            w.send_part(index, body, &refs).map(Some)
        });
        let Some(sent) = sent.map_err(py_err(py))? else {
            return Err(batch_ended(index));
        };
        for b in &bufs {
            b.get().detach();
        }
        Ok(match sent {
            PartSent::Sent => "sent",
            PartSent::NotStreamed => "not_streamed",
            PartSent::Cancelled => "cancelled",
        })
    }

    /// Ends the current batch and reports this worker idle; `handle_seconds` is how long the
    /// handler took (recorded in the metrics).
    #[pyo3(signature = (handle_seconds=None))]
    fn finish_batch(&self, py: Python<'_>, handle_seconds: Option<f64>) -> PyResult<()> {
        py.detach(|| {
            let mut w = self.lock();
            if let Some(s) = handle_seconds {
                w.record_handle_time(Duration::try_from_secs_f64(s).unwrap_or_default());
            }
            w.finish_batch()
        })
        .map_err(py_err(py))
    }
}

/// The error for a part of a batch that has ended (or a position it does not have).
fn batch_ended(index: usize) -> PyErr {
    pyo3::exceptions::PyRuntimeError::new_err(format!(
        "aqueduct.emit(): the batch of task {index} has ended (a part sent after handle() returned)"
    ))
}
