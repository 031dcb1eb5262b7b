#![forbid(unsafe_code)]
//! [`FlowStep`]: one step of a flow and how it runs.

use std::sync::Arc;
use std::time::Duration;

use crate::handler::Handler;

pub(crate) type Condition<T> = Arc<dyn Fn(&T) -> bool + Send + Sync>;
pub(crate) type Factory<T> = Arc<dyn Fn() -> Box<dyn Handler<T>> + Send + Sync>;

/// One step: a handler, how many workers run it, how they batch, and which tasks it takes.
///
/// ```
/// use std::time::Duration;
/// use aqueduct::{from_fn, FlowStep};
///
/// struct Task { text: String, score: Option<f32> }
///
/// let model = FlowStep::new(from_fn(|batch: &mut [Task]| {
///     for t in batch.iter_mut() {
///         t.score = Some(t.text.len() as f32);
///     }
///     Ok(())
/// }))
/// .nprocs(2)
/// .batch_size(16)
/// .batch_timeout(Duration::from_millis(2))
/// .handle_condition(|t: &Task| !t.text.is_empty());
/// ```
pub struct FlowStep<T> {
    pub(crate) name: Option<String>,
    pub(crate) type_name: &'static str,
    pub(crate) factory: Factory<T>,
    pub(crate) nprocs: usize,
    pub(crate) batch_size: usize,
    pub(crate) batch_timeout: Duration,
    pub(crate) handle_timeout: Option<Duration>,
    pub(crate) condition: Condition<T>,
}

impl<T> Clone for FlowStep<T> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            type_name: self.type_name,
            factory: self.factory.clone(),
            nprocs: self.nprocs,
            batch_size: self.batch_size,
            batch_timeout: self.batch_timeout,
            handle_timeout: self.handle_timeout,
            condition: self.condition.clone(),
        }
    }
}

impl<T: 'static> FlowStep<T> {
    /// A step running `handler` in one worker, one task at a time. Each worker gets its own
    /// clone of `handler`.
    pub fn new<H: Handler<T> + Clone + Sync>(handler: H) -> Self {
        let type_name = std::any::type_name::<H>().rsplit("::").next().unwrap_or("Handler");
        Self {
            name: None,
            type_name,
            factory: Arc::new(move || Box::new(handler.clone()) as Box<dyn Handler<T>>),
            nprocs: 1,
            batch_size: 1,
            batch_timeout: Duration::ZERO,
            handle_timeout: None,
            condition: Arc::new(|_| true),
        }
    }

    /// How long one batch may run in a worker *process* (`start_processes`); past it the
    /// process is killed and replaced, and the batch's tasks fail with
    /// [`crate::FlowError::HandlerTimeout`]. Default: no limit. (A thread cannot be killed: in
    /// thread mode the limit only marks the batch as overdue in the metrics.)
    pub fn handle_timeout(mut self, limit: Duration) -> Self {
        self.handle_timeout = Some(limit);
        self
    }

    /// The step's name in errors and metrics (default `step{n}_{HandlerType}`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Workers (threads or processes) running this step in parallel (default 1). Each batch goes
    /// to exactly one of them.
    pub fn nprocs(mut self, n: usize) -> Self {
        self.nprocs = n;
        self
    }

    /// The most tasks handed to one `handle` call (default 1).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// How long a partial batch may wait for more tasks, from its first task (default zero:
    /// take what is queued now).
    pub fn batch_timeout(mut self, timeout: Duration) -> Self {
        self.batch_timeout = timeout;
        self
    }

    /// Which tasks this step handles; the others skip it (default: all).
    pub fn handle_condition(mut self, condition: impl Fn(&T) -> bool + Send + Sync + 'static) -> Self {
        self.condition = Arc::new(condition);
        self
    }

    pub(crate) fn display_name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("step{}_{}", index + 1, self.type_name))
    }
}
