#![forbid(unsafe_code)]
//! Process isolation: the running program re-executed as a step's worker.
//!
//! A process-mode flow starts each worker as `current_exe()` with the program's own arguments
//! and one environment variable, [`WORKER_ENV`], naming the flow, the slot and the step; the
//! flow's shared region, doorbell and pool arrive as descriptors 3, 4 and 5. The worker runs
//! `main` until it starts that same flow: there, instead of starting workers, it becomes one,
//! and exits when the flow stops it. Anything `main` does before starting the flow also runs in
//! each worker, so start flows first.

use std::ffi::OsString;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use aqueduct_core::hub::Doorbell;
use aqueduct_core::shm::fd::adopt_inherited;
use aqueduct_core::shm::{Arena, SharedRegion};
use aqueduct_core::WorkerEndpoint;
use command_fds::{CommandFdExt, FdMapping};

use crate::error::FlowError;

/// Set in a worker process: `flow, slot, step, pool index, parent pid`, separated by `\x1f`.
pub const WORKER_ENV: &str = "AQUEDUCT_WORKER";
const REGION_FD: i32 = 3;
const DOORBELL_FD: i32 = 4;
const POOL_FD: i32 = 5;
const SEP: char = '\x1f';

/// What a worker process was started for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkerSpec {
    pub flow: String,
    pub slot: usize,
    pub step: usize,
    pub pool_index: u32,
    pub parent: i32,
}

impl WorkerSpec {
    fn encode(&self) -> String {
        [
            self.flow.clone(),
            self.slot.to_string(),
            self.step.to_string(),
            self.pool_index.to_string(),
            self.parent.to_string(),
        ]
        .join(&SEP.to_string())
    }

    fn decode(value: &str) -> Option<Self> {
        let mut parts = value.split(SEP);
        let spec = Self {
            flow: parts.next()?.to_string(),
            slot: parts.next()?.parse().ok()?,
            step: parts.next()?.parse().ok()?,
            pool_index: parts.next()?.parse().ok()?,
            parent: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(spec)
    }

    /// The spec of this process, if it is a worker.
    pub(crate) fn current() -> Option<Self> {
        std::env::var(WORKER_ENV).ok().and_then(|v| Self::decode(&v))
    }
}

/// The name of the flow this process is a worker of, if it is one. A program with several
/// process-mode flows can use it to start only the flow a worker process is for.
pub fn worker_flow() -> Option<String> {
    WorkerSpec::current().map(|spec| spec.flow)
}

/// Starts worker processes of one flow.
pub(crate) struct Spawner {
    exe: PathBuf,
    args: Vec<OsString>,
    flow: String,
    region: OwnedFd,
    doorbell: OwnedFd,
    pool: OwnedFd,
}

impl Spawner {
    pub(crate) fn new(
        flow: &str,
        region: BorrowedFd<'_>,
        doorbell: BorrowedFd<'_>,
        pool: BorrowedFd<'_>,
    ) -> Result<Self, FlowError> {
        let exe = std::env::current_exe().map_err(|e| FlowError::Start(format!("cannot find this program: {e}")))?;
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(|e| FlowError::Start(format!("dup: {e}")));
        Ok(Self {
            exe,
            args: std::env::args_os().skip(1).collect(),
            flow: flow.to_string(),
            region: dup(region)?,
            doorbell: dup(doorbell)?,
            pool: dup(pool)?,
        })
    }

    pub(crate) fn spawn(&self, slot: usize, step: usize, pool_index: u32) -> Result<Child, FlowError> {
        let spec = WorkerSpec { flow: self.flow.clone(), slot, step, pool_index, parent: std::process::id() as i32 };
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| FlowError::Start(format!("dup: {e}")));
        let mappings = vec![
            FdMapping { parent_fd: dup(&self.region)?, child_fd: REGION_FD },
            FdMapping { parent_fd: dup(&self.doorbell)?, child_fd: DOORBELL_FD },
            FdMapping { parent_fd: dup(&self.pool)?, child_fd: POOL_FD },
        ];
        let mut command = Command::new(&self.exe);
        command.args(&self.args).env(WORKER_ENV, spec.encode()).stdin(Stdio::null());
        command.fd_mappings(mappings).map_err(|e| FlowError::Start(format!("descriptor mapping: {e}")))?;
        command.spawn().map_err(|e| FlowError::Start(format!("cannot start a worker process: {e}")))
    }
}

/// In a worker process: attaches to the flow's shared memory as the spec's slot.
pub(crate) fn attach(spec: &WorkerSpec) -> Result<WorkerEndpoint, FlowError> {
    // A worker never outlives the process that started it.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| FlowError::Start(format!("prctl: {e}")))?;
    if rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get()) != spec.parent {
        std::process::exit(1); // the parent died before we armed the signal
    }
    let region = Arc::new(SharedRegion::attach(adopt_inherited(REGION_FD)?)?);
    let doorbell = Doorbell::from_fd(adopt_inherited(DOORBELL_FD)?);
    let pool = Arc::new(SharedRegion::attach(adopt_inherited(POOL_FD)?)?);
    let arena = Arc::new(Arena::attach(pool, spec.pool_index)?);
    Ok(WorkerEndpoint::attach(region, arena, spec.slot, doorbell)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_specs_round_trip_and_reject_garbage() {
        let spec = WorkerSpec { flow: "classify".into(), slot: 3, step: 1, pool_index: 7, parent: 4242 };
        assert_eq!(WorkerSpec::decode(&spec.encode()), Some(spec));
        assert_eq!(WorkerSpec::decode("classify"), None);
        assert_eq!(WorkerSpec::decode("a\x1f1\x1f2\x1f3\x1f4\x1f5"), None);
        assert_eq!(WorkerSpec::decode("a\x1fx\x1f2\x1f3\x1f4"), None);
    }
}
