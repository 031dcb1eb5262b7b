#![forbid(unsafe_code)]
//! The engine's one error type. The Python bindings map every variant in a single exhaustive
//! `match`, so adding a variant forces a decision about how Python sees it.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0} failed: {1}")]
    Os(&'static str, #[source] io::Error),

    #[error("shared memory is corrupt: {0}")]
    Corrupt(&'static str),

    #[error("a record of {len} bytes does not fit in a ring record (at most {max} bytes)")]
    RecordTooLarge { len: usize, max: usize },

    #[error("the queue of step {step} is full ({capacity} tasks)")]
    QueueFull { step: usize, capacity: usize },

    #[error("shared memory pool exhausted: {requested} bytes requested, pool holds {capacity} bytes")]
    ArenaExhausted { requested: usize, capacity: usize },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("the flow is stopped")]
    Stopped,

    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

impl EngineError {
    /// Adapter for `map_err` on rustix calls: `.map_err(EngineError::os("memfd_create"))`.
    pub fn os(what: &'static str) -> impl Fn(rustix::io::Errno) -> EngineError {
        move |e| EngineError::Os(what, io::Error::from(e))
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
