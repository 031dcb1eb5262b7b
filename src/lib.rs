//! Python bindings for the Aqueduct engine: the extension module `aqueduct._core`.
//!
//! Thin by design: each module wraps one engine type and the conversions it needs; errors are
//! mapped in `errors.rs` alone. The public API (`Flow`, `FlowStep`, `BaseTask`, ...) is Python,
//! in `python/aqueduct/`, because users subclass and pickle it.

#![deny(unsafe_code)] // allowed in `shm.rs` only, for the buffer-protocol slot

mod args;
mod client;
mod codec;
mod driver;
mod errors;
mod http;
mod shm;
mod worker;

use pyo3::prelude::*;

/// Makes the calling process receive `signum` (default SIGKILL) when its parent dies, so that
/// a worker never outlives the flow that started it, even when the main process is SIGKILLed.
/// Returns the parent pid observed afterwards: if it differs from the expected one, the parent
/// already died and the caller must exit.
#[pyfunction]
#[pyo3(signature = (signum=9))]
fn die_with_parent(signum: i32) -> PyResult<i32> {
    let signal = rustix::process::Signal::from_named_raw(signum)
        .ok_or_else(|| pyo3::exceptions::PyValueError::new_err(format!("unknown signal {signum}")))?;
    rustix::process::set_parent_process_death_signal(Some(signal))
        .map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?;
    Ok(rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get()))
}

/// Kills the calling process (SIGKILL) as soon as the process `pid` exits, from a thread that
/// waits on a pidfd. For a worker whose parent is not the flow's owner (a `forkserver` child),
/// where `die_with_parent` would watch the wrong process. Fails if `pid` is already gone.
///
/// Where the kernel refuses pidfds (see `aqueduct_core::proc_watch`) the thread instead checks
/// the process's identity every 100 ms: a worker then outlives its owner by up to that long.
#[pyfunction]
fn exit_with_process(py: Python<'_>, pid: i32) -> PyResult<()> {
    use aqueduct_core::proc_watch::{ExitWatch, ProcessWatch};
    let target = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| pyo3::exceptions::PyValueError::new_err(format!("not a process id: {pid}")))?;
    let how = ExitWatch::from_env().map_err(errors::py_err(py))?;
    let watch = ProcessWatch::open(target, how)
        .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("cannot watch process {pid}: {e}")))?;
    std::thread::Builder::new()
        .name("aqueduct-owner-watch".into())
        .spawn(move || {
            match watch {
                ProcessWatch::Pidfd(pidfd) => {
                    let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
                    // A pidfd becomes readable when its process exits; only EINTR interrupts the wait.
                    while let Ok(0) | Err(rustix::io::Errno::INTR) = rustix::event::poll(&mut fds, None) {}
                }
                // Longer than the engine's 50 ms: this thread runs in every worker, and only
                // bounds how long an orphan lingers.
                ProcessWatch::Polled(owner) => {
                    while owner.is_alive() {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
            let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        })
        .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("cannot start the watch thread: {e}")))?;
    Ok(())
}

/// What waiting costs on this host (`aqueduct_core::calibrate`), and the spin budget a flow
/// of `processes` busy processes would choose from it with its CPUs free (`AQUEDUCT_SPIN_US`
/// included): a dict of microseconds.
#[pyfunction]
#[pyo3(signature = (rounds = 1000, processes = 2))]
fn measure_host(py: Python<'_>, rounds: i64, processes: i64) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    if !(10..=1_000_000).contains(&rounds) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!("rounds must be 10..=1000000, not {rounds}")));
    }
    if processes < 1 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!("processes must be at least 1, not {processes}")));
    }
    let (rounds, processes) = (rounds as usize, processes as usize);
    let costs = py.detach(|| aqueduct_core::calibrate::measure(rounds));
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    let budget = aqueduct_core::shm::event::SpinPolicy::for_host(processes).budget_for(costs.wake_p50);
    let out = pyo3::types::PyDict::new(py);
    out.set_item("cpus", costs.cpus)?;
    out.set_item("wake_p50_us", us(costs.wake_p50))?;
    out.set_item("wake_p99_us", us(costs.wake_p99))?;
    out.set_item("spin_hop_p50_us", us(costs.spin_hop_p50))?;
    out.set_item("spin_hop_p99_us", us(costs.spin_hop_p99))?;
    out.set_item("spin_budget_us", us(budget))?;
    Ok(out)
}

/// A random UUID (version 4) string, like `str(uuid.uuid4())`, for `BaseTask.task_id`: a tenth of
/// what making it in Python costs, and never one a forked parent or child also makes
/// (`aqueduct_core::ids`).
#[pyfunction]
fn new_task_id(py: Python<'_>) -> Bound<'_, pyo3::types::PyString> {
    let id = aqueduct_core::ids::uuid4();
    pyo3::types::PyString::new(py, std::str::from_utf8(&id).expect("a UUID string is ASCII"))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<driver::Driver>()?;
    m.add_class::<driver::Failure>()?;
    m.add_class::<driver::WorkerEvent>()?;
    m.add_class::<driver::StepHealth>()?;
    m.add_class::<driver::ExitNotifier>()?;
    m.add_class::<http::HttpServer>()?;
    m.add_class::<worker::Worker>()?;
    m.add_class::<client::PortClient>()?;
    m.add_class::<shm::Pool>()?;
    m.add_class::<shm::ShmBuffer>()?;
    m.add_function(wrap_pyfunction!(die_with_parent, m)?)?;
    m.add_function(wrap_pyfunction!(exit_with_process, m)?)?;
    m.add_function(wrap_pyfunction!(measure_host, m)?)?;
    m.add_function(wrap_pyfunction!(new_task_id, m)?)?;
    m.add_function(wrap_pyfunction!(codec::encode_state, m)?)?;
    m.add_function(wrap_pyfunction!(codec::decode_state, m)?)?;
    m.add_function(wrap_pyfunction!(codec::decode_into, m)?)?;
    m.add("COMPACT_BODY", aqueduct_core::task_state::FORMAT)?;
    m.add("ROUTE_DONE", aqueduct_core::message::ROUTE_DONE)?;
    m.add("STREAM_WINDOW", aqueduct_core::stream::STREAM_WINDOW)?;
    Ok(())
}
