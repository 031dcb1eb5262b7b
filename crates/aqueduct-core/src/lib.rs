//! aqueduct-core: the engine under Aqueduct, with no Python in it.
//!
//! A flow is one shared-memory region (a memfd) holding a pair of single-producer
//! single-consumer rings per worker process and a page arena for large payloads. The main
//! process runs the [`hub::Hub`]: every step's bounded priority queue, batch formation, deadline
//! drops, and the record of which tasks each worker holds. Workers run a
//! [`worker::WorkerEndpoint`]: receive a batch, answer for each task, report the batch done.
//!
//! - [`shm`]: the memfd region, rings, arena and futex events (the only `unsafe` code).
//! - [`message`]: record tags and the task header.
//! - [`prio`], [`batch`]: the queueing and batching policies, as pure code.
//! - [`gate`]: the handshake that decides whether a batch sent ahead of time runs.
//! - [`metrics`]: histograms, counters and sample rings, recorded without messages.
//! - [`hub`], [`worker`]: the two ends of the protocol.
//! - [`reactor`], [`engine`]: what the main process sleeps on (epoll over the doorbell eventfd,
//!   a timerfd and worker pidfds), combined with the hub; [`proc_watch`]: how a worker is
//!   watched where the kernel refuses pidfds (its identity in `/proc`, polled).
//! - [`driver`]: the host's policy around the engine (calls, caller deadlines, the waiting
//!   room, restarts, stopping, outcome counts, health), once for every front end.
//! - [`task_state`]: the compact wire form of a Python task's state, read and written by both
//!   front ends.
//! - [`port`]: how other processes (web workers sharing one flow) submit tasks straight into
//!   the engine; [`caller`]: the calls of such a client, with the driver's guarantees.
//!
//! ARCHITECTURE.md at the repository root records why the engine has this shape and the
//! measurements that chose it.

pub mod batch;
pub mod calibrate;
pub mod caller;
pub mod clock;
pub mod driver;
pub mod engine;
pub mod error;
pub mod gate;
pub mod host;
pub mod hub;
pub mod ids;
pub mod layout;
pub mod message;
pub mod metrics;
pub mod port;
pub mod prio;
pub mod proc_watch;
pub mod reactor;
pub mod shm;
pub mod stream;
pub mod task_state;
pub mod worker;

pub use clock::Nanos;
pub use driver::{Admission, Driver, Event, Fault, RestartPolicy};
pub use engine::Engine;
pub use error::{EngineError, Result};
pub use hub::{Failure, Hub, HubConfig, Outcome, Payload, StepSpec};
pub use worker::{Received, WorkerEndpoint};
