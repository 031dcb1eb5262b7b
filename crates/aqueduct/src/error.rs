#![forbid(unsafe_code)]
//! The errors a flow reports.

/// The error of any handler: whatever it returned, or the message of its panic.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a task did not come back, or why the flow could not do what was asked.
///
/// Task failures stay local: a handler that fails or panics fails only the tasks of its batch,
/// and a worker process that dies fails only the tasks it held; the flow keeps serving.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The step's handler returned an error or panicked while handling the task's batch.
    #[error("the handler of {step} failed: {message}")]
    Handler { step: String, message: String },
    /// The task's deadline passed before a handler of `step` saw it.
    #[error("the task expired before {step} could handle it")]
    Expired { step: String },
    /// The task's timeout passed while it was in the flow.
    #[error("the task timed out")]
    Timeout,
    /// The batch holding the task ran past the step's `handle_timeout`; its worker process was
    /// killed and is being replaced.
    #[error("the batch holding the task ran past the handle_timeout of {step}: its worker process {pid} was killed")]
    HandlerTimeout { step: String, pid: u32 },
    /// The worker process holding the task died (a crash, an abort, a signal).
    #[error("the worker process {pid} of {step} died while holding the task")]
    WorkerDied { step: String, pid: u32 },
    /// The flow is not running (not started, stopping or stopped).
    #[error("the flow is not running")]
    NotRunning,
    /// A task could not be serialised for a worker process, or a result deserialised.
    #[error("a task could not cross to a worker process: {0}")]
    Serialization(String),
    /// A step's `on_start` failed, or a worker could not be started.
    #[error("the flow could not start: {0}")]
    Start(String),
    /// An invalid argument (a priority out of range, a flow without steps).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The engine failed (shared memory, a system call).
    #[error("engine error: {0}")]
    Engine(String),
}

impl From<aqueduct_core::EngineError> for FlowError {
    fn from(e: aqueduct_core::EngineError) -> Self {
        match e {
            aqueduct_core::EngineError::Stopped => FlowError::NotRunning,
            other => FlowError::Engine(other.to_string()),
        }
    }
}
