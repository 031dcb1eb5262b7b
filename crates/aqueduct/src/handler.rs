#![forbid(unsafe_code)]
//! What a step runs: the [`Handler`] trait.

use aqueduct_core::worker::PartSent;
use aqueduct_core::WorkerEndpoint;

use crate::error::BoxError;

/// The code of one step. Each worker (thread or process) of a step has its own handler: the
/// step's handler is cloned for each, before `on_start` runs in the worker.
///
/// ```
/// use aqueduct::{BoxError, Handler};
///
/// #[derive(Clone)]
/// struct Scale(f32);
///
/// struct Task {
///     x: f32,
///     y: Option<f32>,
/// }
///
/// impl Handler<Task> for Scale {
///     fn handle(&mut self, batch: &mut [Task]) -> Result<(), BoxError> {
///         for task in batch {
///             task.y = Some(task.x * self.0);
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Handler<T>: Send + 'static {
    /// Runs once in the worker before its first batch: load a model here. An error fails the
    /// flow's start.
    fn on_start(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    /// Handles a batch in place: the results are written into the tasks. An error (or a panic)
    /// fails every task of this batch and only those.
    fn handle(&mut self, batch: &mut [T]) -> Result<(), BoxError>;

    /// [`Handler::handle`] for a handler that sends partial results while it works:
    /// `parts.send(i, bytes)` sends one of `batch[i]` to its caller ([`crate::Flow::stream`]).
    /// The worker calls this one; by default it calls `handle`. A streaming handler implements
    /// both, `handle` usually as `self.handle_streaming(batch, &mut Parts::discarding())`.
    fn handle_streaming(&mut self, batch: &mut [T], parts: &mut Parts<'_>) -> Result<(), BoxError> {
        let _ = parts;
        self.handle(batch)
    }
}

/// Where a streaming handler sends the partial results of its batch's tasks.
pub struct Parts<'a> {
    /// The worker's endpoint and, for each task of the batch, its index in the engine's batch;
    /// `None`: parts are dropped.
    to: Option<(&'a mut WorkerEndpoint, &'a [usize])>,
}

impl<'a> Parts<'a> {
    pub(crate) fn new(endpoint: &'a mut WorkerEndpoint, indices: &'a [usize]) -> Self {
        Self { to: Some((endpoint, indices)) }
    }

    /// Parts that go nowhere: for calling [`Handler::handle_streaming`] from `handle`.
    pub fn discarding() -> Parts<'static> {
        Parts { to: None }
    }

    /// Sends `part` to the caller of `batch[i]`, after waiting while that caller is
    /// [`aqueduct_core::stream::STREAM_WINDOW`] parts behind. Returns `false` once the caller is
    /// gone (the part is dropped: the handler may stop working on that task), `true` otherwise,
    /// also when the caller reads only the result ([`crate::Flow::process`]: the part is
    /// dropped). An index outside the batch, or a broken connection to the engine, is an error.
    pub fn send(&mut self, i: usize, part: &[u8]) -> Result<bool, BoxError> {
        let Some((endpoint, indices)) = self.to.as_mut() else { return Ok(true) };
        let index = *indices.get(i).ok_or_else(|| format!("no task {i} in a batch of {}", indices.len()))?;
        Ok(!matches!(endpoint.send_part(index, part, &[])?, PartSent::Cancelled))
    }
}

/// A handler made of a closure: `aqueduct::from_fn(|batch: &mut [Task]| { ...; Ok(()) })`.
#[derive(Clone)]
pub struct FnHandler<F>(F);

/// Wraps a closure as a [`Handler`].
pub fn from_fn<T, F>(f: F) -> FnHandler<F>
where
    F: FnMut(&mut [T]) -> Result<(), BoxError> + Send + 'static,
{
    FnHandler(f)
}

impl<T, F> Handler<T> for FnHandler<F>
where
    F: FnMut(&mut [T]) -> Result<(), BoxError> + Send + 'static,
{
    fn handle(&mut self, batch: &mut [T]) -> Result<(), BoxError> {
        (self.0)(batch)
    }
}
