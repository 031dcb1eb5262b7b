#![forbid(unsafe_code)]
//! What a step runs: the [`Handler`] trait.

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
