//! Python objects to and from the compact wire form of a task's state
//! (`aqueduct_core::task_state`, which owns the format and its bounds checks), without an
//! intermediate tree: what most tasks cross a process boundary as, instead of a pickle.
//!
//! `aqueduct._codec` offers a plain task's class name and `__dict__` to [`encode_state`]; it
//! gets `None` back when some value is not one the form carries (exact `None`, `bool`, 64-bit
//! `int`, `float`, `str`, `bytes` below the out-of-band threshold, `tuple`, `list`, `dict`;
//! nothing nested past `MAX_DEPTH`; no container, nor `str`/`bytes` of [`SHARED_TEXT`] bytes or
//! more, reached twice, as it would come back as two), and pickles the state as before. So the
//! choice does not change what arrives, except that a short string reached twice arrives as two
//! equal strings, which Python never promised were one.

use aqueduct_core::task_state::{self as form, Malformed, Reader, TooLong, Writer};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PyString, PyTuple};
use std::sync::Mutex;

fn value_error(e: Malformed) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Why a state cannot take the form: the caller pickles it instead.
struct NotPlain;

impl From<TooLong> for NotPlain {
    fn from(_: TooLong) -> Self {
        NotPlain
    }
}

struct Encoder {
    w: Writer,
    /// Bytes values of this size or more travel out of band (pickled), not inline.
    big: usize,
    /// The containers and long strings written so far that something else also refers to.
    seen: rustc_hash::FxHashSet<usize>,
}

/// A `str` or `bytes` at least this long keeps its identity (reached twice, it is pickled);
/// a shorter one reached twice is written twice and comes back as two equal objects, as
/// Python never promises that equal strings are one object.
const SHARED_TEXT: usize = 64;

impl Encoder {
    fn text(&mut self, s: &Bound<'_, PyString>) -> Result<(), NotPlain> {
        // Fails for a str holding lone surrogates, which UTF-8 cannot carry: pickled instead.
        let text = s.to_str().map_err(|_| NotPlain)?;
        Ok(self.w.str(text)?)
    }

    /// Refuses an object reached a second time: it would come back as two objects (and a
    /// tuple holding itself twice, nested, would be written exponentially many times), where a
    /// pickle refers back to the first. An object only its container refers to (the container
    /// and this walk's own reference) cannot be reached again, and is not recorded.
    fn once(&mut self, obj: &Bound<'_, PyAny>) -> Result<(), NotPlain> {
        // Deprecated for free-threaded builds, where a count read by another thread may be
        // stale; this module is built for the GIL (abi3), where it is exact while it runs.
        #[allow(deprecated)]
        let referrers = obj.get_refcnt();
        if referrers <= 2 {
            return Ok(());
        }
        if !self.seen.insert(obj.as_ptr() as usize) {
            return Err(NotPlain);
        }
        Ok(())
    }

    /// No Python code runs in here (only exact built-in types are read), so nothing can change
    /// a container while it is walked.
    fn value(&mut self, v: &Bound<'_, PyAny>, depth: usize) -> Result<(), NotPlain> {
        if v.is_none() {
            self.w.tag(form::NONE);
        } else if let Ok(b) = v.cast_exact::<PyBool>() {
            self.w.tag(if b.is_true() { form::TRUE } else { form::FALSE });
        } else if v.is_exact_instance_of::<PyInt>() {
            // Past 64 bits: pickled.
            self.w.int(v.extract().map_err(|_| NotPlain)?);
        } else if let Ok(f) = v.cast_exact::<PyFloat>() {
            self.w.float(f.value());
        } else if let Ok(s) = v.cast_exact::<PyString>() {
            if s.len().map_err(|_| NotPlain)? >= SHARED_TEXT {
                self.once(v)?;
            }
            self.w.tag(form::STR);
            self.text(s)?;
        } else if let Ok(b) = v.cast_exact::<PyBytes>() {
            let bytes = b.as_bytes();
            if bytes.len() >= self.big {
                return Err(NotPlain);
            }
            if bytes.len() >= SHARED_TEXT {
                self.once(v)?;
            }
            self.w.tag(form::BYTES);
            self.w.bytes(bytes)?;
        } else if depth >= form::MAX_DEPTH {
            return Err(NotPlain);
        } else if let Ok(t) = v.cast_exact::<PyTuple>() {
            self.once(v)?;
            self.w.tag(form::TUPLE);
            self.w.len(t.len())?;
            for item in t.iter() {
                self.value(&item, depth + 1)?;
            }
        } else if let Ok(l) = v.cast_exact::<PyList>() {
            self.once(v)?;
            self.w.tag(form::LIST);
            self.w.len(l.len())?;
            for item in l.iter() {
                self.value(&item, depth + 1)?;
            }
        } else if let Ok(d) = v.cast_exact::<PyDict>() {
            self.once(v)?;
            self.w.tag(form::DICT);
            self.w.len(d.len())?;
            for (key, item) in d.iter() {
                self.value(&key, depth + 1)?;
                self.value(&item, depth + 1)?;
            }
        } else {
            return Err(NotPlain);
        }
        Ok(())
    }
}

/// The state of a task of class `module.qualname` in the compact form, or `None` when some
/// value needs pickling. `big` is the size from which `bytes` values travel out of band.
#[pyfunction]
pub fn encode_state<'py>(
    py: Python<'py>,
    module: &Bound<'py, PyString>,
    qualname: &Bound<'py, PyString>,
    state: &Bound<'py, PyDict>,
    big: usize,
) -> Option<Bound<'py, PyBytes>> {
    let written: Result<Writer, NotPlain> = (|| {
        let w =
            Writer::new(module.to_str().map_err(|_| NotPlain)?, qualname.to_str().map_err(|_| NotPlain)?, state.len())?;
        let mut e = Encoder { w, big, seen: Default::default() };
        for (key, value) in state.iter() {
            let key = key.cast_exact::<PyString>().map_err(|_| NotPlain)?;
            e.text(key)?;
            e.value(&value, 0)?;
        }
        Ok(e.w)
    })();
    written.ok().map(|w| PyBytes::new(py, &w.finish()))
}

/// The attribute names of the states decoded last, by position: a task class's fields come
/// in the same order every time, so most names are found here and not made again (nor hashed).
/// Bounded by [`CACHED_NAMES`]. Not interned: on Python 3.12 an interned string is immortal, and
/// a stream of bodies with new names (from a socket client) would grow the process for ever.
static NAMES: Mutex<Names> = Mutex::new(Vec::new());
const CACHED_NAMES: usize = 64;
/// Items reserved for a container before they are read.
const PREALLOCATED: usize = 64;
type Names = Vec<(Box<[u8]>, Py<PyString>)>;

/// The cache, unless this thread already holds it: making objects can run the cyclic GC, and a
/// finalizer that decodes a body would then find it locked (it decodes without it instead).
fn cached_names() -> Option<std::sync::MutexGuard<'static, Names>> {
    match NAMES.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// The attribute name at position `index` of a state.
fn name<'py>(py: Python<'py>, r: &mut Reader<'_>, index: usize, names: &mut Names) -> PyResult<Bound<'py, PyString>> {
    let text = r.str().map_err(value_error)?;
    if let Some((bytes, name)) = names.get(index) {
        if **bytes == *text.as_bytes() {
            return Ok(name.bind(py).clone());
        }
    }
    let name = PyString::new(py, text);
    if index < names.len() {
        names[index] = (text.as_bytes().into(), name.clone().unbind());
    } else if index == names.len() && index < CACHED_NAMES {
        names.push((text.as_bytes().into(), name.clone().unbind()));
    }
    Ok(name)
}

fn value<'py>(py: Python<'py>, r: &mut Reader<'_>, depth: usize) -> PyResult<Bound<'py, PyAny>> {
    let e = value_error;
    Ok(match r.tag(depth).map_err(e)? {
        form::NONE => py.None().into_bound(py),
        form::FALSE => PyBool::new(py, false).to_owned().into_any(),
        form::TRUE => PyBool::new(py, true).to_owned().into_any(),
        form::INT => r.int().map_err(e)?.into_pyobject(py)?.into_any(),
        form::FLOAT => PyFloat::new(py, r.float().map_err(e)?).into_any(),
        form::STR => PyString::new(py, r.str().map_err(e)?).into_any(),
        form::BYTES => PyBytes::new(py, r.bytes().map_err(e)?).into_any(),
        tag @ (form::TUPLE | form::LIST) => {
            let n = r.sequence_len().map_err(e)?;
            // Grown, not reserved up front: nested containers may each claim most of the body.
            let mut items = Vec::with_capacity(n.min(PREALLOCATED));
            for _ in 0..n {
                items.push(value(py, r, depth + 1)?);
            }
            if tag == form::TUPLE {
                PyTuple::new(py, items)?.into_any()
            } else {
                PyList::new(py, items)?.into_any()
            }
        }
        _ => {
            let n = r.dict_len().map_err(e)?;
            let dict = PyDict::new(py);
            for _ in 0..n {
                let at = r.position();
                let key = value(py, r, depth + 1)?;
                let item = value(py, r, depth + 1)?;
                dict.set_item(key, item).map_err(|_| e(r.unhashable_key(at)))?;
            }
            dict.into_any()
        }
    })
}

/// `(module, qualname, state)` from a body in the compact form (`ValueError` if malformed).
#[pyfunction]
pub fn decode_state<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyTuple>> {
    let (mut r, module, qualname) = Reader::new(data).map_err(value_error)?;
    let (module, qualname) = (PyString::new(py, module), PyString::new(py, qualname));
    let n = r.field_count().map_err(value_error)?;
    let state = PyDict::new(py);
    let (mut cached, mut uncached) = (cached_names(), Names::new());
    let names = cached.as_deref_mut().unwrap_or(&mut uncached);
    for i in 0..n {
        let key = name(py, &mut r, i, names)?;
        state.set_item(key, value(py, &mut r, 0)?)?;
    }
    r.finished().map_err(value_error)?;
    PyTuple::new(py, [module.into_any(), qualname.into_any(), state.into_any()])
}

/// Writes the fields of the state in `data` into `target` (a task's `__dict__`), all or none
/// of them (`ValueError` if malformed), leaving out the names in `skip`: the caller's task
/// updated from a processed copy without building the copy or its state.
#[pyfunction]
pub fn decode_into(
    py: Python<'_>,
    data: &[u8],
    target: &Bound<'_, PyDict>,
    skip: &Bound<'_, PyFrozenSet>,
) -> PyResult<()> {
    let (mut r, _, _) = Reader::new(data).map_err(value_error)?; // the caller's task is of the class
    let n = r.field_count().map_err(value_error)?;
    let mut fields = Vec::with_capacity(n.min(CACHED_NAMES));
    {
        let (mut cached, mut uncached) = (cached_names(), Names::new());
        let names = cached.as_deref_mut().unwrap_or(&mut uncached);
        for i in 0..n {
            let key = name(py, &mut r, i, names)?;
            if skip.contains(&key)? {
                r.skip_value(0).map_err(value_error)?;
            } else {
                fields.push((key, value(py, &mut r, 0)?));
            }
        }
    }
    r.finished().map_err(value_error)?;
    for (key, value) in fields {
        target.set_item(key, value)?;
    }
    Ok(())
}
