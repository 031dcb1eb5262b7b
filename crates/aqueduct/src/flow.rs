#![forbid(unsafe_code)]
//! [`Flow`]: a running pipeline, and [`FlowBuilder`], which starts one.
//!
//! A flow is a core [`Driver`] (the same one under the Python API: the engine's queues,
//! batching, priorities and supervision, and the host policy around them: caller deadlines, the
//! waiting room for full queues, restarts, stopping, outcome counts) owned by one tokio task,
//! the *runner*. Callers talk to the runner through a channel: `process` submits a task and
//! awaits a oneshot answer, which the driver resolves exactly once. The runner sleeps on the
//! engine's epoll descriptor through [`AsyncFd`] and wakes when a worker rang the doorbell, a
//! timer fired (a batch's, a call's deadline, a restart's backoff, a stop's grace) or a worker
//! process died; while tasks are in flight it keeps polling for a short spin window first (the
//! engine's choice: only when the flow's workers fit the CPUs), as the Python event loop does.
//! What the runner itself does is mechanics only: move bytes, start processes when the driver
//! says so, join threads.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aqueduct_core::driver::{Admission, Driver, Event, Fault, GiveUp, StreamOpen};
use aqueduct_core::hub::{Doorbell, Failure, FlowMetrics, HubConfig, StepSpec};
use aqueduct_core::shm::{Arena, ArenaLayout};
use aqueduct_core::stream::PartReceipt;
use aqueduct_core::{Engine, Nanos, WorkerEndpoint};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::FlowError;
use crate::process::{Spawner, WorkerSpec};
use crate::step::{Condition, FlowStep};
use crate::store::Store;
use crate::worker::{process_worker, thread_worker, Routes};

/// How many times a step's worker processes may be replaced after dying: at most
/// `max_restarts` within any `window` (quick successive restarts wait a growing backoff). One
/// more death stops the flow; so does a handler error with `stop_on_handler_error`. The core's
/// policy, shared with the Python API.
pub use aqueduct_core::RestartPolicy;

/// How long [`Flow::stop`] lets the tasks in flight finish before it fails them (as in Python).
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// Per call: priority (higher is served first, below the flow's `queue_priorities`) and an
/// optional timeout, after which the call fails with [`FlowError::Timeout`] and the task is
/// dropped wherever it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessOptions {
    pub priority: u8,
    pub timeout: Option<Duration>,
}

/// Builds and starts a [`Flow`].
///
/// ```
/// use aqueduct::{from_fn, Flow, FlowStep};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), aqueduct::FlowError> {
/// let flow = Flow::builder("doubler")
///     .step(FlowStep::new(from_fn(|batch: &mut [u64]| {
///         batch.iter_mut().for_each(|x| *x *= 2);
///         Ok(())
///     })))
///     .start()
///     .await?;
/// assert_eq!(flow.process(21).await?, 42);
/// flow.stop().await;
/// # Ok(())
/// # }
/// ```
pub struct FlowBuilder<T> {
    name: String,
    steps: Vec<FlowStep<T>>,
    queue_size: Option<usize>,
    priorities: usize,
    restart: RestartPolicy,
    start_timeout: Option<Duration>,
    stop_grace: Duration,
    metrics: bool,
    pool_size: usize,
}

impl<T: Send + 'static> FlowBuilder<T> {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            steps: Vec::new(),
            queue_size: None,
            priorities: 1,
            restart: RestartPolicy::default(),
            start_timeout: None,
            stop_grace: DEFAULT_STOP_GRACE,
            metrics: true,
            pool_size: 1 << 30,
        }
    }

    /// Appends a step.
    pub fn step(mut self, step: FlowStep<T>) -> Self {
        self.steps.push(step);
        self
    }

    /// Each step's queue capacity (default: three batches, at least 20 tasks). A full queue
    /// makes `process` wait.
    pub fn queue_size(mut self, size: usize) -> Self {
        self.queue_size = Some(size);
        self
    }

    /// Priority levels (default 1): tasks of priority `p` in `0..n`, higher served first, with
    /// a starvation guard for the lower ones.
    pub fn queue_priorities(mut self, n: usize) -> Self {
        self.priorities = n;
        self
    }

    /// How dead worker processes are replaced (process isolation).
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// How long every worker's `on_start` may take (default: no limit).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = Some(timeout);
        self
    }

    /// How long [`Flow::stop`] lets the tasks in flight finish before failing them with
    /// [`FlowError::NotRunning`] (default [`DEFAULT_STOP_GRACE`]).
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// Whether workers and the engine record metrics (default true; see [`Flow::metrics`]).
    pub fn metrics(mut self, enabled: bool) -> Self {
        self.metrics = enabled;
        self
    }

    /// Bytes of shared memory for large serialised tasks (process isolation; default 1 GiB,
    /// touched only as used).
    pub fn pool_size(mut self, bytes: usize) -> Self {
        self.pool_size = bytes;
        self
    }

    fn config(&self) -> Result<HubConfig, FlowError> {
        if self.steps.is_empty() {
            return Err(FlowError::Invalid("a flow needs at least one step".into()));
        }
        let steps = self
            .steps
            .iter()
            .map(|s| StepSpec {
                nprocs: s.nprocs,
                batch_size: s.batch_size,
                batch_timeout: s.batch_timeout,
                queue_capacity: self.queue_size.unwrap_or((s.batch_size * 3).max(20)),
                handle_timeout: s.handle_timeout,
            })
            .collect();
        let cfg = HubConfig { steps, priorities: self.priorities, metrics: self.metrics, ..HubConfig::default() };
        cfg.validate().map_err(|e| FlowError::Invalid(e.to_string()))?;
        Ok(cfg)
    }

    fn routes(&self, step: usize) -> Routes<T> {
        (step + 1..self.steps.len()).map(|j| (j, self.steps[j].condition.clone())).collect()
    }

    /// Starts the flow with worker threads and waits until every worker's `on_start` has
    /// returned. Tasks move by pointer, never serialised; a handler error or panic fails the
    /// tasks of its batch.
    pub async fn start(self) -> Result<Flow<T>, FlowError> {
        if WorkerSpec::current().is_some() {
            // This process is a worker of a process-mode flow: it runs nothing else.
            return Ok(Flow::inert(&self));
        }
        let cfg = self.config()?;
        // Thread mode moves 8-byte keys: the pool only has to exist.
        let pool = pool_for(&cfg, 64 << 10)?;
        let mut driver = Driver::new(Engine::new(&cfg, pool.clone())?, Admission::Wait, self.restart);
        let store = Arc::new(Store::new());
        let factories: Vec<_> = self.steps.iter().map(|s| s.factory.clone()).collect();
        let routes: Vec<_> = (0..self.steps.len()).map(|i| self.routes(i)).collect();
        let names: Vec<String> = (0..self.steps.len())
            .map(|i| {
                format!("aqueduct-{}-{}", self.name, self.steps[i].display_name(i)).chars().take(15).collect::<String>()
            })
            .collect();
        let thread_store = store.clone();
        // Starts the worker thread of `slot`: the first ones, and a replacement for one that
        // ended while the flow ran (a panic outside the handler's guard, in a `handle_condition`
        // for instance), which the engine treats as a dead worker.
        let spawn = move |driver: &mut Driver<Token>, slot: usize| -> Result<JoinHandle<()>, FlowError> {
            let engine = driver.engine();
            let step = engine.hub.slot_step(slot);
            let index = pool.reserve_index().ok_or_else(|| FlowError::Start("too many workers".into()))?;
            let doorbell = Doorbell::from_fd(
                engine.doorbell_fd().try_clone_to_owned().map_err(|e| FlowError::Engine(e.to_string()))?,
            );
            let endpoint =
                WorkerEndpoint::attach(engine.hub.region().clone(), Arc::new(pool.as_process(index)), slot, doorbell)?;
            let gone = engine.exit_notifier(slot)?;
            let (handler, routes, store) = ((factories[step])(), routes[step].clone(), thread_store.clone());
            let thread = std::thread::Builder::new()
                .name(names[step].clone())
                .spawn(move || {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        thread_worker(endpoint, handler, routes, store)
                    }));
                    gone.notify();
                })
                .map_err(|e| {
                    pool.release_index(index);
                    FlowError::Start(format!("cannot start a worker thread: {e}"))
                })?;
            driver.thread_worker_started(slot, index);
            Ok(thread)
        };
        let mut threads = Vec::new();
        for slot in 0..driver.engine().hub.slot_count() {
            threads.push(spawn(&mut driver, slot)?);
        }
        let codec: Arc<dyn Codec<T>> = Arc::new(ThreadCodec { store });
        launch(self, driver, codec, Workers::Threads { threads, spawn: Box::new(spawn) }).await
    }
}

impl<T: Serialize + DeserializeOwned + Send + 'static> FlowBuilder<T> {
    /// Starts the flow with worker processes, for crash isolation: this program is re-executed
    /// once per worker (see [`crate::process`]) and tasks cross as serde (postcard) bytes. A
    /// worker that dies fails only the tasks it held and is replaced under the
    /// [`RestartPolicy`]. In a worker process this call does not return: the process serves its
    /// step until the flow stops it.
    pub async fn start_processes(self) -> Result<Flow<T>, FlowError> {
        if let Some(spec) = WorkerSpec::current() {
            if spec.flow != self.name {
                return Ok(Flow::inert(&self));
            }
            let code = match crate::process::attach(&spec) {
                Ok(endpoint) if spec.step < self.steps.len() => {
                    let handler = (self.steps[spec.step].factory)();
                    process_worker(endpoint, handler, self.routes(spec.step))
                }
                _ => 1,
            };
            std::process::exit(code);
        }
        let cfg = self.config()?;
        let pool = pool_for(&cfg, self.pool_size)?;
        let mut driver = Driver::new(Engine::new(&cfg, pool.clone())?, Admission::Wait, self.restart);
        let pool_fd = pool.region().fd().ok_or_else(|| FlowError::Engine("the pool is not a memfd".into()))?;
        let spawner = Spawner::new(&self.name, driver.engine().region_fd(), driver.engine().doorbell_fd(), pool_fd)?;
        let mut children = HashMap::new();
        for slot in 0..driver.engine().hub.slot_count() {
            spawn_process(&mut driver, &pool, &spawner, &mut children, slot)?;
        }
        let codec: Arc<dyn Codec<T>> = Arc::new(SerdeCodec { next: AtomicU64::new(1) });
        launch(self, driver, codec, Workers::Processes { spawner, pool, children }).await
    }
}

/// The flow's shared-memory pool: `bytes` of payload, process indices for this process and
/// every worker (a dead worker's index is released before its replacement takes one).
fn pool_for(cfg: &HubConfig, bytes: usize) -> Result<Arc<Arena>, FlowError> {
    let workers: usize = cfg.steps.iter().map(|s| s.nprocs).sum();
    Ok(Arc::new(Arena::create(ArenaLayout::new(bytes, 1 << 16, workers + 1), 0)?))
}

fn spawn_process<C>(
    driver: &mut Driver<C>,
    pool: &Arena,
    spawner: &Spawner,
    children: &mut HashMap<usize, Child>,
    slot: usize,
) -> Result<(), FlowError> {
    let index = pool.reserve_index().ok_or_else(|| FlowError::Start("too many worker processes".into()))?;
    let child = match spawner.spawn(slot, driver.engine().hub.slot_step(slot), index) {
        Ok(child) => child,
        Err(e) => {
            pool.release_index(index);
            return Err(e);
        }
    };
    driver.worker_spawned(slot, child.id(), index)?;
    children.insert(slot, child);
    Ok(())
}

// ------------------------------------------------------------------------------------ codecs

/// How a task becomes a ring body and back: a key into the [`Store`] (threads) or serde bytes
/// (processes). Encoding and decoding run in the caller's task, not in the driver.
trait Codec<T>: Send + Sync + 'static {
    /// The task's ticket (how the caller names it to the driver) and its body.
    fn encode(&self, task: T) -> Result<(u64, Vec<u8>), FlowError>;
    fn decode(&self, ticket: u64, body: &[u8]) -> Result<T, FlowError>;
    /// The caller will not take the task back.
    fn discard(&self, ticket: u64);
}

struct ThreadCodec<T> {
    store: Arc<Store<T>>,
}

impl<T: Send + 'static> Codec<T> for ThreadCodec<T> {
    fn encode(&self, task: T) -> Result<(u64, Vec<u8>), FlowError> {
        let key = self.store.insert(task);
        Ok((key, key.to_le_bytes().to_vec()))
    }
    fn decode(&self, ticket: u64, _body: &[u8]) -> Result<T, FlowError> {
        self.store.finish(ticket).ok_or_else(|| FlowError::Engine("a finished task is missing".into()))
    }
    fn discard(&self, ticket: u64) {
        self.store.discard(ticket);
    }
}

struct SerdeCodec {
    next: AtomicU64,
}

impl<T: Serialize + DeserializeOwned + Send + 'static> Codec<T> for SerdeCodec {
    fn encode(&self, task: T) -> Result<(u64, Vec<u8>), FlowError> {
        let body = postcard::to_allocvec(&task).map_err(|e| FlowError::Serialization(e.to_string()))?;
        Ok((self.next.fetch_add(1, Ordering::Relaxed), body))
    }
    fn decode(&self, _ticket: u64, body: &[u8]) -> Result<T, FlowError> {
        postcard::from_bytes(body).map_err(|e| FlowError::Serialization(e.to_string()))
    }
    fn discard(&self, _ticket: u64) {}
}

// ------------------------------------------------------------------------------------ handle

type Answer = oneshot::Sender<Result<Vec<u8>, FlowError>>;

/// Where a streaming call's parts go, each with the receipt given back once it is taken.
type PartSender = mpsc::UnboundedSender<(Vec<u8>, PartReceipt)>;

enum Command {
    Submit {
        ticket: u64,
        step: usize,
        priority: u8,
        deadline: Nanos,
        body: Vec<u8>,
        answer: Answer,
        /// `Some` for [`Flow::stream`].
        parts: Option<PartSender>,
    },
    Cancel {
        ticket: u64,
    },
    /// The caller of a stream took one of its parts.
    PartTaken {
        ticket: u64,
        receipt: PartReceipt,
    },
    Metrics(oneshot::Sender<FlowMetrics>),
    Stop(oneshot::Sender<()>),
}

struct Shared<T> {
    name: String,
    commands: mpsc::UnboundedSender<Command>,
    codec: Arc<dyn Codec<T>>,
    conditions: Vec<Condition<T>>,
    /// `true` while the flow accepts tasks; the runner sets it.
    running: watch::Receiver<bool>,
}

/// A running flow. Cheap to clone: every clone submits to the same flow. The flow stops when
/// [`Flow::stop`] is called or the last clone is dropped.
pub struct Flow<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Flow<T> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<T: Send + 'static> Flow<T> {
    /// Starts building a flow named `name` (it names the flow's threads, metrics and, in process
    /// mode, which flow a worker process serves).
    pub fn builder(name: &str) -> FlowBuilder<T> {
        FlowBuilder::new(name)
    }

    /// A flow that runs nothing: what a worker process gets for flows other than its own.
    fn inert(builder: &FlowBuilder<T>) -> Self {
        let (commands, _) = mpsc::unbounded_channel();
        Self {
            shared: Arc::new(Shared {
                name: builder.name.clone(),
                commands,
                codec: Arc::new(NoCodec),
                conditions: Vec::new(),
                running: watch::channel(false).1,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn is_running(&self) -> bool {
        *self.shared.running.borrow()
    }

    /// Returns once the flow has stopped taking tasks: stopped, or given up after too many
    /// worker deaths. What a service awaits to exit when its flow is gone.
    pub async fn stopped(&self) {
        let mut running = self.shared.running.clone();
        let _ = running.wait_for(|running| !*running).await;
    }

    /// Sends `task` through the steps whose conditions it meets and returns it with the
    /// handlers' results written in. Priority 0, no timeout.
    pub async fn process(&self, task: T) -> Result<T, FlowError> {
        self.process_with(task, ProcessOptions::default()).await
    }

    /// [`Flow::process`] with a priority and a timeout. The timeout is the driver's (on the
    /// engine's timer, like the Python API's): the call fails with [`FlowError::Timeout`] and
    /// the task is dropped wherever it is. A priority at or past the flow's levels is refused.
    pub async fn process_with(&self, task: T, options: ProcessOptions) -> Result<T, FlowError> {
        let shared = &self.shared;
        if !self.is_running() {
            return Err(FlowError::NotRunning);
        }
        let Some(step) = shared.conditions.iter().position(|condition| condition(&task)) else {
            return Ok(task); // no step takes it
        };
        let deadline = options.timeout.map_or(Nanos::ZERO, |t| Nanos::now().saturating_add(t));
        let (ticket, body) = shared.codec.encode(task)?;
        let (answer, answered) = oneshot::channel();
        let submit = Command::Submit { ticket, step, priority: options.priority, deadline, body, answer, parts: None };
        if shared.commands.send(submit).is_err() {
            shared.codec.discard(ticket);
            return Err(FlowError::NotRunning);
        }
        // If this future is dropped (the caller's request was cancelled), the task is dropped too.
        let mut guard = CancelOnDrop { shared, ticket, armed: true };
        let outcome = answered.await.unwrap_or(Err(FlowError::NotRunning));
        guard.armed = false;
        match outcome {
            Ok(body) => shared.codec.decode(ticket, &body),
            Err(e) => {
                shared.codec.discard(ticket);
                Err(e)
            }
        }
    }

    /// Sends `task` through the steps like [`Flow::process_with`], and hands out the partial
    /// results its handlers send ([`crate::Parts`]) as they come: read them with
    /// [`TaskStream::next_part`], then take the finished task with [`TaskStream::finish`].
    /// The timeout covers the whole stream. A worker runs at most
    /// [`aqueduct_core::stream::STREAM_WINDOW`] parts ahead of the reader; dropping the stream
    /// before its end cancels the task (the handler's next [`crate::Parts::send`] returns
    /// `false`).
    pub fn stream(&self, task: T, options: ProcessOptions) -> Result<TaskStream<T>, FlowError> {
        let shared = &self.shared;
        if !self.is_running() {
            return Err(FlowError::NotRunning);
        }
        let Some(step) = shared.conditions.iter().position(|condition| condition(&task)) else {
            return Ok(TaskStream { shared: self.shared.clone(), ticket: 0, state: StreamState::Unsent(Some(task)) });
        };
        let deadline = options.timeout.map_or(Nanos::ZERO, |t| Nanos::now().saturating_add(t));
        let (ticket, body) = shared.codec.encode(task)?;
        let (answer, answered) = oneshot::channel();
        let (parts, received) = mpsc::unbounded_channel();
        let submit =
            Command::Submit { ticket, step, priority: options.priority, deadline, body, answer, parts: Some(parts) };
        if shared.commands.send(submit).is_err() {
            shared.codec.discard(ticket);
            return Err(FlowError::NotRunning);
        }
        Ok(TaskStream { shared: self.shared.clone(), ticket, state: StreamState::Open { parts: received, answered } })
    }

    /// A snapshot of the flow's metrics (histograms of handle time, batch size, batch wait,
    /// transfer time and task size; counters; queue lengths).
    pub async fn metrics(&self) -> Result<FlowMetrics, FlowError> {
        let (tx, rx) = oneshot::channel();
        self.shared.commands.send(Command::Metrics(tx)).map_err(|_| FlowError::NotRunning)?;
        rx.await.map_err(|_| FlowError::NotRunning)
    }

    /// Stops the flow gracefully: no new task is accepted, the tasks in flight finish (within
    /// the builder's `stop_grace`; past it they fail), then the workers exit. Returns once they
    /// have. Idempotent.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.commands.send(Command::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The codec of an inert flow, which accepts no task.
struct NoCodec;

impl<T> Codec<T> for NoCodec {
    fn encode(&self, _task: T) -> Result<(u64, Vec<u8>), FlowError> {
        Err(FlowError::NotRunning)
    }
    fn decode(&self, _ticket: u64, _body: &[u8]) -> Result<T, FlowError> {
        Err(FlowError::NotRunning)
    }
    fn discard(&self, _ticket: u64) {}
}

/// The partial results of a task and then the task itself ([`Flow::stream`]).
pub struct TaskStream<T> {
    shared: Arc<Shared<T>>,
    ticket: u64,
    state: StreamState<T>,
}

enum StreamState<T> {
    /// No step takes the task: it is done as it is.
    Unsent(Option<T>),
    Open {
        parts: mpsc::UnboundedReceiver<(Vec<u8>, PartReceipt)>,
        answered: oneshot::Receiver<Result<Vec<u8>, FlowError>>,
    },
    /// The outcome arrived (or was taken).
    Ended(Option<Result<T, FlowError>>),
}

impl<T: Send + 'static> TaskStream<T> {
    /// The next part, or `None` once the task has finished or failed (then [`TaskStream::finish`]
    /// says which). Parts come in the order the handler sent them; all of them come before the
    /// end.
    pub async fn next_part(&mut self) -> Option<Vec<u8>> {
        let StreamState::Open { parts, answered } = &mut self.state else { return None };
        // The call's sender of parts goes away with its outcome, after its last part.
        if let Some((part, receipt)) = parts.recv().await {
            let _ = self.shared.commands.send(Command::PartTaken { ticket: self.ticket, receipt });
            return Some(part);
        }
        let outcome = answered.await.unwrap_or(Err(FlowError::NotRunning));
        let result = match outcome {
            Ok(body) => self.shared.codec.decode(self.ticket, &body),
            Err(e) => {
                self.shared.codec.discard(self.ticket);
                Err(e)
            }
        };
        self.state = StreamState::Ended(Some(result));
        None
    }

    /// The task with the handlers' results, once the parts are read (any left are skipped), or
    /// why it failed, as [`Flow::process`] returns them.
    pub async fn finish(mut self) -> Result<T, FlowError> {
        while self.next_part().await.is_some() {}
        match std::mem::replace(&mut self.state, StreamState::Ended(None)) {
            StreamState::Unsent(task) => task.ok_or(FlowError::NotRunning),
            StreamState::Ended(result) => result.unwrap_or(Err(FlowError::NotRunning)),
            StreamState::Open { .. } => unreachable!("read to its end above"),
        }
    }
}

impl<T> Drop for TaskStream<T> {
    fn drop(&mut self) {
        if let StreamState::Open { parts, .. } = &mut self.state {
            let _ = self.shared.commands.send(Command::Cancel { ticket: self.ticket });
            // The room of the parts never read goes back to the worker.
            parts.close();
            while let Ok((_, receipt)) = parts.try_recv() {
                let _ = self.shared.commands.send(Command::PartTaken { ticket: self.ticket, receipt });
            }
        }
    }
}

struct CancelOnDrop<'a, T> {
    shared: &'a Shared<T>,
    ticket: u64,
    armed: bool,
}

impl<T> Drop for CancelOnDrop<'_, T> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.shared.commands.send(Command::Cancel { ticket: self.ticket });
        }
    }
}

// ------------------------------------------------------------------------------------ runner

/// Starts the worker thread of a slot (see `FlowBuilder::start`).
type SpawnThread = Box<dyn FnMut(&mut Driver<Token>, usize) -> Result<JoinHandle<()>, FlowError> + Send>;

enum Workers {
    Threads { threads: Vec<JoinHandle<()>>, spawn: SpawnThread },
    Processes { spawner: Spawner, pool: Arc<Arena>, children: HashMap<usize, Child> },
}

/// A call as the driver knows it: the caller's ticket and where to answer.
/// A call's ticket, its answer and, for a stream, where its parts go.
type Token = (u64, Answer, Option<PartSender>);

fn no_spawn(_: &mut Driver<Token>, _: usize) -> Result<JoinHandle<()>, FlowError> {
    Err(FlowError::NotRunning)
}

/// The tokio task that owns the driver: moves commands in and answers out, starts replacement
/// processes when the driver asks. Every decision is the driver's.
struct Runner {
    driver: Driver<Token>,
    commands: mpsc::UnboundedReceiver<Command>,
    discard: Arc<dyn Fn(u64) + Send + Sync>,
    step_names: Vec<String>,
    /// Ticket -> the driver's call id, for cancels.
    calls: HashMap<u64, u64>,
    workers: Workers,
    stopping: Vec<oneshot::Sender<()>>,
    accepting: bool,
    /// Some `Flow` handle still exists (the command channel is open).
    handles: bool,
    /// A stop has drained (or run out of grace): the runner ends.
    drained: bool,
    stop_grace: Duration,
    running: watch::Sender<bool>,
}

async fn launch<T: Send + 'static>(
    builder: FlowBuilder<T>,
    driver: Driver<Token>,
    codec: Arc<dyn Codec<T>>,
    workers: Workers,
) -> Result<Flow<T>, FlowError> {
    let (commands, receiver) = mpsc::unbounded_channel();
    let (running, running_rx) = watch::channel(false);
    let discard_codec = codec.clone();
    let mut runner = Runner {
        driver,
        commands: receiver,
        discard: Arc::new(move |ticket| discard_codec.discard(ticket)),
        step_names: builder.steps.iter().enumerate().map(|(i, s)| s.display_name(i)).collect(),
        calls: HashMap::new(),
        workers,
        stopping: Vec::new(),
        accepting: true,
        handles: true,
        drained: false,
        stop_grace: builder.stop_grace,
        running,
    };
    let fd = crate::readiness::watch(runner.driver.engine().fd()).map_err(|e| {
        FlowError::Start(format!("cannot watch the engine (a tokio runtime with IO enabled is needed): {e}"))
    })?;
    if let Err(e) = runner.wait_ready(&fd, builder.start_timeout).await {
        runner.kill_all();
        runner.shutdown().await;
        return Err(e);
    }
    runner.running.send_replace(true);
    tokio::spawn(async move {
        runner.run(&fd).await;
        drop(fd);
        runner.shutdown().await;
    });
    Ok(Flow {
        shared: Arc::new(Shared {
            name: builder.name.clone(),
            commands,
            codec,
            conditions: builder.steps.iter().map(|s| s.condition.clone()).collect(),
            running: running_rx,
        }),
    })
}

impl Runner {
    /// Waits for every worker's `on_start`.
    async fn wait_ready(&mut self, fd: &AsyncFd<OwnedFd>, timeout: Option<Duration>) -> Result<(), FlowError> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ready = 0;
        let total = self.driver.engine().hub.slot_count();
        while ready < total {
            let mut failure = None;
            let names = &self.step_names;
            self.driver.poll(true, &mut |e| match e {
                Event::Ready { .. } => ready += 1,
                Event::StartFailed { step, message, .. } => {
                    failure.get_or_insert(format!("{} failed to start: {message}", names[step]));
                }
                Event::Exited { step, pid, .. } => {
                    failure.get_or_insert(format!("{} worker (pid {pid}) exited during start-up", names[step]));
                }
                _ => {}
            })?;
            if let Some(message) = failure {
                return Err(FlowError::Start(message));
            }
            if ready >= total || !self.driver.engine_mut().prepare_sleep() {
                continue;
            }
            let readable = fd.readable();
            let mut guard = match deadline {
                Some(d) => tokio::time::timeout_at(d, readable)
                    .await
                    .map_err(|_| FlowError::Start("the workers did not start in time".into()))?,
                None => readable.await,
            }
            .map_err(|e| FlowError::Engine(e.to_string()))?;
            guard.clear_ready();
        }
        Ok(())
    }

    async fn run(&mut self, fd: &AsyncFd<OwnedFd>) {
        loop {
            tokio::select! {
                // Read while a stop drains too: a cancel must still drop its task (a submission
                // then is refused by the driver).
                command = self.commands.recv(), if self.handles => match command {
                    Some(c) => self.command(c),
                    None => {
                        self.handles = false; // every handle was dropped
                        self.begin_stop(true);
                    }
                },
                ready = fd.readable() => match ready {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(_) => return,
                },
            }
            while let Ok(c) = self.commands.try_recv() {
                self.command(c);
            }
            self.poll(true);
            self.spin().await;
            while !self.driver.engine_mut().prepare_sleep() {
                self.poll(true);
            }
            if self.drained {
                return;
            }
        }
    }

    /// Keeps polling (yielding to other tasks) while tasks are in flight and results keep
    /// coming within the spin window: waking a sleeping runner costs more than a poll.
    async fn spin(&mut self) {
        // The spin reads only the rings; exits, timers and port bells wait for a full poll, so
        // a window under sustained load returns to one at least this often.
        const FULL_POLL_EVERY: Duration = Duration::from_millis(1);
        let started = std::time::Instant::now();
        self.driver.open_spin_window();
        while self.driver.keep_polling() && started.elapsed() < FULL_POLL_EVERY {
            tokio::task::yield_now().await;
            while let Ok(c) = self.commands.try_recv() {
                self.command(c);
            }
            self.poll(false);
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Submit { ticket, step, priority, deadline, body, answer, parts } => {
                let submitted = match parts {
                    None => self.driver.submit((ticket, answer, None), step, priority, deadline, &body, Vec::new()),
                    Some(parts) => {
                        let token = (ticket, answer, Some(parts));
                        let open = StreamOpen::default();
                        self.driver.submit_stream(token, step, priority, deadline, open, &body, Vec::new())
                    }
                };
                match submitted {
                    Ok(id) => {
                        self.calls.insert(ticket, id);
                    }
                    Err(refused) => {
                        let (ticket, answer, _) = refused.call;
                        (self.discard)(ticket);
                        let error = match refused.error {
                            aqueduct_core::EngineError::Config(m) => FlowError::Invalid(m),
                            e => e.into(),
                        };
                        let _ = answer.send(Err(error));
                    }
                }
            }
            Command::Cancel { ticket } => {
                if let Some(id) = self.calls.remove(&ticket) {
                    self.driver.cancel(id);
                }
                (self.discard)(ticket);
            }
            Command::PartTaken { ticket, receipt } => match self.calls.get(&ticket) {
                Some(&id) => self.driver.part_taken(id, receipt),
                None => self.driver.release_part(receipt),
            },
            Command::Metrics(reply) => {
                let _ = reply.send(self.driver.engine_mut().hub.metrics(false));
            }
            Command::Stop(done) => {
                self.stopping.push(done);
                self.begin_stop(true);
            }
        }
    }

    /// Polls the driver and acts on what it reports; returns how many engine outcomes there were.
    fn poll(&mut self, events: bool) -> usize {
        let mut owned = Vec::new();
        let arena = self.driver.engine().hub.arena().clone();
        let names = &self.step_names;
        let polled = self.driver.poll(events, &mut |e| owned.push(Owned::from(e, &arena, names)));
        let n = match polled {
            Ok(n) => n,
            Err(e) => {
                eprintln!("aqueduct: flow engine error: {e}");
                0
            }
        };
        self.act(owned);
        n
    }

    fn act(&mut self, events: Vec<Owned>) {
        for event in events {
            match event {
                Owned::Answer { ticket, answer, result } => {
                    self.calls.remove(&ticket);
                    if result.is_err() {
                        (self.discard)(ticket);
                    }
                    let _ = answer.send(result);
                }
                Owned::Died { step, pid } => {
                    eprintln!("aqueduct: the process {pid} for {} is dead", self.step_names[step]);
                }
                Owned::Respawn { slot } => self.respawn(slot),
                Owned::GiveUp(why) => {
                    eprintln!("aqueduct: {why}; stopping the flow");
                    self.begin_stop(false);
                }
                Owned::StartFailed { step, message } => {
                    eprintln!("aqueduct: a replacement worker of {} failed to start: {message}", self.step_names[step]);
                }
                Owned::StopDone => self.drained = true,
                Owned::Unclaimed(receipt) => self.driver.release_part(receipt),
                Owned::Nothing => {}
            }
        }
    }

    /// Starts the replacement the driver asked for.
    fn respawn(&mut self, slot: usize) {
        let started = match &mut self.workers {
            Workers::Threads { threads, spawn } => spawn(&mut self.driver, slot).map(|t| threads.push(t)),
            Workers::Processes { spawner, pool, children } => {
                if let Some(mut child) = children.remove(&slot) {
                    let _ = child.wait();
                }
                spawn_process(&mut self.driver, pool, spawner, children, slot)
            }
        };
        if let Err(e) = started {
            eprintln!(
                "aqueduct: cannot replace a worker of {}: {e}",
                self.step_names[self.driver.engine().hub.slot_step(slot)]
            );
            let mut owned = Vec::new();
            let arena = self.driver.engine().hub.arena().clone();
            let names = &self.step_names;
            self.driver.respawn_failed(slot, &mut |e| owned.push(Owned::from(e, &arena, names)));
            self.act(owned);
        }
    }

    /// Stops taking tasks; the driver fails the calls waiting for room, and the flow stops once
    /// those in flight are done (graceful, within the grace period) or at once.
    fn begin_stop(&mut self, graceful: bool) {
        // Commands keep being read: the driver refuses submissions from now on, and cancels
        // still drop their tasks.
        if self.accepting {
            self.accepting = false;
            self.running.send_replace(false);
        }
        let mut owned = Vec::new();
        let arena = self.driver.engine().hub.arena().clone();
        let names = &self.step_names;
        let grace = self.stop_grace;
        if let Err(e) = self.driver.begin_stop(graceful, grace, &mut |e| owned.push(Owned::from(e, &arena, names))) {
            eprintln!("aqueduct: flow engine error: {e}");
        }
        if !graceful {
            owned.push(Owned::StopDone);
        }
        self.act(owned);
    }

    fn kill_all(&mut self) {
        if let Workers::Processes { children, .. } = &mut self.workers {
            for child in children.values_mut() {
                let _ = child.kill();
            }
        }
    }

    /// Asks every worker to exit and waits for them (killing processes that take too long).
    async fn shutdown(&mut self) {
        self.driver.stop_workers(false);
        match std::mem::replace(&mut self.workers, Workers::Threads { threads: Vec::new(), spawn: Box::new(no_spawn) })
        {
            Workers::Threads { threads, .. } => {
                let _ = tokio::task::spawn_blocking(move || {
                    for thread in threads {
                        let _ = thread.join();
                    }
                })
                .await;
            }
            Workers::Processes { children, .. } => {
                // Each worker exits after its current batch; one that has not within the grace
                // period is killed. The reaping thread ends either way.
                let pids: Vec<u32> = children.values().map(Child::id).collect();
                let mut reaping = tokio::task::spawn_blocking(move || {
                    for mut child in children.into_values() {
                        let _ = child.wait();
                    }
                });
                if tokio::time::timeout(Duration::from_secs(5), &mut reaping).await.is_err() {
                    for pid in pids.iter().filter_map(|&p| rustix::process::Pid::from_raw(p as i32)) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                    let _ = reaping.await;
                }
            }
        }
        for done in self.stopping.drain(..) {
            let _ = done.send(());
        }
    }
}

/// A driver event with its bytes copied out of shared memory (events borrow the engine).
enum Owned {
    Answer {
        ticket: u64,
        answer: Answer,
        result: Result<Vec<u8>, FlowError>,
    },
    Died {
        step: usize,
        pid: u32,
    },
    Respawn {
        slot: usize,
    },
    GiveUp(String),
    StartFailed {
        step: usize,
        message: String,
    },
    /// A stop has nothing left in flight (drained, or failed past its grace).
    StopDone,
    /// A part nobody will take (its stream was dropped): its room goes back to the worker.
    Unclaimed(PartReceipt),
    Nothing,
}

impl Owned {
    fn from(event: Event<'_, Token>, arena: &Arena, names: &[String]) -> Self {
        let name = |step: usize| names.get(step).cloned().unwrap_or_default();
        match event {
            Event::Done { call: (ticket, answer, _), body, bufs } => {
                for b in bufs {
                    let _ = arena.unhold(&b.extent());
                }
                Owned::Answer { ticket, answer, result: Ok(body.into_vec(arena)) }
            }
            Event::Failed { call: (ticket, answer, _), step, fault } => {
                let error = match fault {
                    Fault::Engine(Failure::Handler { step, body }) => FlowError::Handler {
                        step: name(step),
                        message: String::from_utf8_lossy(&body.into_vec(arena)).into_owned(),
                    },
                    Fault::Engine(Failure::Expired { step }) => FlowError::Expired { step: name(step) },
                    Fault::Engine(Failure::WorkerDied { step, pid }) => FlowError::WorkerDied { step: name(step), pid },
                    Fault::Engine(Failure::HandlerTimeout { step, pid }) => {
                        FlowError::HandlerTimeout { step: name(step), pid }
                    }
                    Fault::Engine(Failure::Stopped) | Fault::NotRunning => FlowError::NotRunning,
                    Fault::Engine(Failure::ArenaExhausted { step }) => {
                        FlowError::Engine(format!("no shared memory left for a task of {}", name(step)))
                    }
                    Fault::Timeout | Fault::TimeoutWaiting | Fault::IdleTimeout => {
                        let _ = step;
                        FlowError::Timeout
                    }
                };
                Owned::Answer { ticket, answer, result: Err(error) }
            }
            Event::Part { call: (_, _, parts), body, bufs, receipt } => {
                for b in bufs {
                    let _ = arena.unhold(&b.extent());
                }
                match parts {
                    // Handed on now: the reader gives the receipt back when it takes the part.
                    Some(parts) if parts.send((body.into_vec(arena), receipt)).is_ok() => Owned::Nothing,
                    _ => Owned::Unclaimed(receipt),
                }
            }
            Event::Exited { step, pid, expected: false, .. } => Owned::Died { step, pid },
            Event::Respawn { slot, .. } => Owned::Respawn { slot },
            Event::GiveUp(why) => Owned::GiveUp(match why {
                GiveUp::TooManyDeaths { step, deaths, window, max_restarts } => format!(
                    "workers of {} died {deaths} times within {window:?} (restart policy: {max_restarts})",
                    name(step)
                ),
                GiveUp::HandlerError { step } => {
                    format!("the handler of {} failed (stop_on_handler_error)", name(step))
                }
                GiveUp::CannotRestart { step } => format!("a worker of {} could not be replaced", name(step)),
            }),
            Event::StartFailed { step, message, .. } => Owned::StartFailed { step, message },
            Event::Drained | Event::GraceExpired => Owned::StopDone,
            // This front end's workers are processes, which the engine kills itself.
            Event::Ready { .. } | Event::Exited { .. } | Event::AllExited | Event::StopWorker { .. } => Owned::Nothing,
        }
    }
}
