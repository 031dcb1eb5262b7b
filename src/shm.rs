//! `aqueduct._core.Pool` and `aqueduct._core.ShmBuffer`: the shared-memory pool as Python sees
//! it.
//!
//! A `ShmBuffer` is a range of pool memory that owns one reference (this process's) on its
//! extent and exports it through the buffer protocol, so `memoryview`, `numpy.frombuffer` and
//! the unpickler use it in place. When the last Python object viewing it goes away, the
//! reference is dropped; when the last reference in any process is gone, the pages are free.
//!
//! The buffer-protocol slot (`__getbuffer__`) is the bindings' only `unsafe`: it fills the
//! interpreter's `Py_buffer` for a range of the pool mapping.

#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aqueduct_core::shm::arena::MAX_NPROCS;
use aqueduct_core::shm::fd::adopt_inherited;
use aqueduct_core::shm::{Arena, ArenaLayout, BufRef, SharedRegion};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::py_err;

#[pyclass(frozen, module = "aqueduct._core")]
pub struct Pool {
    pub(crate) arena: Arc<Arena>,
}

#[pymethods]
impl Pool {
    /// Creates the process-wide pool (the main process is process 0): `size` bytes of payload
    /// in pages of `page_size`, for at most `max_processes` processes; `warm` bytes of freed
    /// pages stay resident for reuse.
    #[staticmethod]
    fn create(py: Python<'_>, size: usize, page_size: usize, max_processes: usize, warm: u64) -> PyResult<Self> {
        if !page_size.is_power_of_two() || page_size < 4096 {
            return Err(PyValueError::new_err(format!("page_size must be a power of two >= 4096, got {page_size}")));
        }
        if !(2..=MAX_NPROCS).contains(&max_processes) {
            return Err(PyValueError::new_err(format!(
                "max_processes must be in 2..={MAX_NPROCS}, got {max_processes}"
            )));
        }
        let arena = Arena::create(ArenaLayout::new(size, page_size, max_processes), warm).map_err(py_err(py))?;
        Ok(Self { arena: Arc::new(arena) })
    }

    /// Attaches, in a worker, to the pool whose descriptor it inherited, as process `index`.
    #[staticmethod]
    fn attach(py: Python<'_>, fd: i32, index: u32) -> PyResult<Self> {
        let region = SharedRegion::attach(adopt_inherited(fd).map_err(py_err(py))?).map_err(py_err(py))?;
        let arena = Arena::attach(Arc::new(region), index).map_err(py_err(py))?;
        Ok(Self { arena: Arc::new(arena) })
    }

    /// Another handle on the same mapping acting as process `index` (a process that became a
    /// port client of a flow served from the pool it already maps).
    fn as_process(&self, index: u32) -> PyResult<Self> {
        if index as usize >= self.arena.layout().nprocs {
            return Err(PyValueError::new_err(format!("process index {index} out of range")));
        }
        Ok(Self { arena: Arc::new(self.arena.as_process(index)) })
    }

    fn fileno(&self) -> i32 {
        self.arena.region().fd().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// A process index for a new worker, or `None` when every one is taken.
    fn reserve_index(&self) -> Option<u32> {
        self.arena.reserve_index()
    }

    fn release_index(&self, index: u32) {
        self.arena.release_index(index);
    }

    /// Undoes every reference held by the dead process `index` (a port client) and frees what
    /// no one else holds; then the index can be released. Returns the pages freed.
    fn reap(&self, index: u32) -> PyResult<usize> {
        if index == 0 || index as usize >= self.arena.layout().nprocs {
            return Err(PyValueError::new_err(format!("cannot reap process index {index}")));
        }
        Ok(self.arena.reap(index))
    }

    /// A fresh, writable buffer of `size` bytes in the pool.
    fn alloc(&self, py: Python<'_>, size: usize) -> PyResult<ShmBuffer> {
        let ext = self.arena.alloc(size).ok_or_else(|| {
            crate::errors::to_py(
                py,
                aqueduct_core::EngineError::ArenaExhausted {
                    requested: size,
                    capacity: self.arena.layout().capacity_bytes(),
                },
            )
        })?;
        ShmBuffer::owning(&self.arena, BufRef::whole(ext)).map_err(py_err(py))
    }

    /// If `obj`'s memory (any contiguous buffer: bytes-like, numpy array) lies in this pool, a
    /// new reference to it (zero copy); else `None`.
    fn locate(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Option<ShmBuffer>> {
        let view = PyUntypedBuffer::get(obj)?;
        if !view.is_c_contiguous() && !view.is_fortran_contiguous() {
            return Ok(None);
        }
        let Some(buf) = self.arena.locate(view.buf_ptr() as usize, view.len_bytes()) else { return Ok(None) };
        self.arena.hold(&buf.extent()).map_err(py_err(py))?;
        ShmBuffer::owning(&self.arena, buf).map(Some).map_err(py_err(py))
    }

    #[getter]
    fn used_bytes(&self) -> usize {
        self.arena.used_pages() * self.arena.page_size()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.arena.layout().capacity_bytes()
    }

    #[getter]
    fn warm_bytes(&self) -> u64 {
        self.arena.warm_bytes()
    }

    #[getter]
    fn index(&self) -> u32 {
        self.arena.me()
    }
}

/// A range of pool memory holding one reference on its extent.
#[pyclass(frozen, module = "aqueduct._core")]
pub struct ShmBuffer {
    arena: Arc<Arena>,
    buf: BufRef,
    ptr: usize,
    /// False once the reference was handed over to a message (`detach`).
    owns: AtomicBool,
}

impl ShmBuffer {
    /// Wraps `buf`, taking over one reference the caller holds on its extent.
    pub(crate) fn owning(arena: &Arc<Arena>, buf: BufRef) -> aqueduct_core::Result<Self> {
        let ptr = arena.buf_ptr(&buf)? as usize;
        Ok(Self { arena: arena.clone(), buf, ptr, owns: AtomicBool::new(true) })
    }

    /// Hands this buffer's reference to a message; the object stays usable while its creator
    /// keeps it, but no longer drops a reference.
    pub(crate) fn detach(&self) -> BufRef {
        self.owns.store(false, Ordering::Release);
        self.buf
    }

    pub(crate) fn buf(&self) -> BufRef {
        self.buf
    }
}

impl Drop for ShmBuffer {
    fn drop(&mut self) {
        if self.owns.swap(false, Ordering::AcqRel) {
            let _ = self.arena.unhold(&self.buf.extent());
        }
    }
}

#[pymethods]
impl ShmBuffer {
    fn __len__(&self) -> usize {
        self.buf.len as usize
    }

    /// `(head, pages, offset, len)`: where the buffer lives in the pool.
    #[getter]
    fn desc(&self) -> (u32, u32, u64, u64) {
        (self.buf.head, self.buf.pages, self.buf.offset, self.buf.len)
    }

    /// Exports the range as a writable, C-contiguous byte buffer.
    ///
    /// # Safety
    /// Called by the interpreter with a valid `view` to fill (the buffer-protocol slot).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let this = slf.get();
            (this.ptr, this.buf.len as pyo3::ffi::Py_ssize_t)
        };
        // SAFETY: `view` is the interpreter's buffer struct for this request. `ptr..ptr+len`
        // lies in the pool mapping, which `slf.arena` keeps mapped; `PyBuffer_FillInfo` stores
        // a new reference to `slf` in `view.obj`, so the exporter (and with it the mapping and
        // the extent's reference) outlives every view of it.
        let rc =
            unsafe { pyo3::ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr as *mut std::ffi::c_void, len, 0, flags) };
        if rc == -1 {
            return Err(PyErr::take(slf.py())
                .unwrap_or_else(|| pyo3::exceptions::PyBufferError::new_err("cannot export the shared buffer")));
        }
        Ok(())
    }

    /// Nothing to release per view: the reference is dropped with the object itself.
    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}

    fn __repr__(&self) -> String {
        format!("<ShmBuffer {} bytes at page {} + {}>", self.buf.len, self.buf.head, self.buf.offset)
    }
}
