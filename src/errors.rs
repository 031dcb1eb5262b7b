#![forbid(unsafe_code)]
//! The one place where engine errors become Python exceptions.
//!
//! The exception classes live in `aqueduct/exceptions.py` (users subclass, pickle and catch
//! them); they are imported once and raised from here. The `match` is exhaustive on purpose: a
//! new engine error cannot ship without deciding what Python sees.

use aqueduct_core::EngineError;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

static QUEUE_FULL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static NOT_RUNNING: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SHM_EXHAUSTED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static FLOW_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn raise(py: Python<'_>, cell: &PyOnceLock<Py<PyType>>, name: &str, msg: String) -> PyErr {
    match cell.import(py, "aqueduct.exceptions", name) {
        Ok(ty) => PyErr::from_type(ty.clone(), msg),
        Err(e) => e,
    }
}

pub fn to_py(py: Python<'_>, err: EngineError) -> PyErr {
    let msg = err.to_string();
    match err {
        EngineError::QueueFull { .. } => raise(py, &QUEUE_FULL, "QueueFullError", msg),
        EngineError::Stopped => raise(py, &NOT_RUNNING, "NotRunningError", msg),
        EngineError::ArenaExhausted { .. } => raise(py, &SHM_EXHAUSTED, "SharedMemoryExhaustedError", msg),
        EngineError::Config(_) => PyValueError::new_err(msg),
        EngineError::Os(_, _) => PyOSError::new_err(msg),
        EngineError::Corrupt(_) | EngineError::Protocol(_) | EngineError::RecordTooLarge { .. } => {
            raise(py, &FLOW_ERROR, "FlowError", msg)
        }
    }
}

/// `?`-friendly conversion: `engine_call().map_err(py_err(py))?`.
pub fn py_err(py: Python<'_>) -> impl Fn(EngineError) -> PyErr + '_ {
    move |e| to_py(py, e)
}
