//! Aqueduct for Rust services: multi-step pipelines whose steps run in worker threads or worker
//! processes, with dynamic batching, priorities, deadlines, metrics and supervision, called
//! from async Rust (tokio).
//!
//! It is the engine under the Python package `aqueduct` (the crate `aqueduct-core`): the same
//! shared-memory rings, queues and batching, driven by a tokio task instead of an asyncio loop.
//!
//! ```
//! use std::time::Duration;
//! use aqueduct::{BoxError, Flow, FlowStep, Handler, ProcessOptions};
//!
//! #[derive(Debug)]
//! struct Request {
//!     text: String,
//!     tokens: Vec<u32>,
//!     score: Option<f32>,
//! }
//!
//! #[derive(Clone)]
//! struct Tokenize;
//!
//! impl Handler<Request> for Tokenize {
//!     fn handle(&mut self, batch: &mut [Request]) -> Result<(), BoxError> {
//!         for r in batch {
//!             r.tokens = r.text.bytes().map(u32::from).collect();
//!         }
//!         Ok(())
//!     }
//! }
//!
//! #[derive(Clone, Default)]
//! struct Model {
//!     weights: Vec<f32>,
//! }
//!
//! impl Handler<Request> for Model {
//!     fn on_start(&mut self) -> Result<(), BoxError> {
//!         self.weights = (0..256).map(|i| i as f32 / 256.0).collect(); // load the model here
//!         Ok(())
//!     }
//!     fn handle(&mut self, batch: &mut [Request]) -> Result<(), BoxError> {
//!         for r in batch {
//!             r.score = Some(r.tokens.iter().map(|&t| self.weights[t as usize % 256]).sum());
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aqueduct::FlowError> {
//! let flow = Flow::builder("scorer")
//!     .step(FlowStep::new(Tokenize))
//!     .step(FlowStep::new(Model::default()).nprocs(2).batch_size(16).batch_timeout(Duration::from_millis(2)))
//!     .start()
//!     .await?;
//!
//! let request = Request { text: "hello".into(), tokens: vec![], score: None };
//! let done = flow.process_with(request, ProcessOptions { priority: 0, timeout: Some(Duration::from_secs(5)) }).await?;
//! assert!(done.score.is_some());
//! flow.stop().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Isolation
//! - [`FlowBuilder::start`]: worker **threads** (the default). Tasks move by pointer and are
//!   never serialised. A handler error or panic fails the tasks of its batch and only those.
//! - [`FlowBuilder::start_processes`]: worker **processes**, for crash isolation. The program
//!   is re-executed as each worker (see [`process`]); tasks cross as serde (postcard) bytes, in
//!   shared memory. A worker that aborts or is killed fails only the tasks it held and is
//!   replaced under the [`RestartPolicy`].
//!
//! The runtime needs tokio's IO and time drivers (`#[tokio::main]` enables both).

mod error;
mod flow;
mod handler;
pub mod process;
pub mod readiness;
pub mod remote;
mod step;
mod store;
mod worker;

pub use aqueduct_core::hub::FlowMetrics;
pub use error::{BoxError, FlowError};
pub use flow::{Flow, FlowBuilder, ProcessOptions, RestartPolicy, TaskStream, DEFAULT_STOP_GRACE};
pub use handler::{from_fn, FnHandler, Handler, Parts};
pub use remote::{RemoteFlow, RemoteInfo};
pub use step::FlowStep;
