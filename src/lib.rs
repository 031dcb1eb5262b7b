//! Python bindings for the Aqueduct engine: the extension module `aqueduct._core`.
use pyo3::prelude::*;

#[pymodule]
fn _core(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
