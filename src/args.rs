#![forbid(unsafe_code)]
//! Checks on numeric arguments that come from Python: a bad value is a `ValueError` naming the
//! argument, never a Rust panic (`Duration::from_secs_f64` panics on `inf`, `nan` and
//! negatives; `Instant + Duration` panics on overflow).

use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::PyResult;

/// `seconds` as a `Duration`: it must be a finite number `>= 0` that a `Duration` holds.
pub(crate) fn duration(name: &str, seconds: f64) -> PyResult<Duration> {
    if seconds.is_nan() || seconds < 0.0 {
        return Err(PyValueError::new_err(format!("{name} must be a number of seconds >= 0, got {seconds}")));
    }
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| PyValueError::new_err(format!("{name} is too large: {seconds} seconds")))
}

/// The deadline `timeout` seconds from now: `None` (wait without end) for no timeout, `inf`, or
/// one too far away to represent; a negative timeout is "now". `nan` is an error.
pub(crate) fn deadline(name: &str, timeout: Option<f64>) -> PyResult<Option<Instant>> {
    let Some(seconds) = timeout else { return Ok(None) };
    if seconds.is_nan() {
        return Err(PyValueError::new_err(format!("{name} must be a number of seconds, got nan")));
    }
    Ok(Duration::try_from_secs_f64(seconds.max(0.0)).ok().and_then(|wait| Instant::now().checked_add(wait)))
}
