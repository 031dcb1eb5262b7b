#![forbid(unsafe_code)]
//! The main process's engine: a [`Hub`] plus the [`Reactor`] that tells it when to run, and the
//! [`port`](crate::port)s through which other processes submit tasks.
//!
//! An owner (the Python event loop, a tokio task, or a plain loop in a benchmark) watches
//! [`Engine::fd`], calls [`Engine::poll`] when it is readable, and before going idle calls
//! [`Engine::prepare_sleep`]; a worker or a port client then rings the doorbell when it
//! publishes, which makes the fd readable.
//!
//! Outcomes of tasks that came through a port never reach the owner: the engine writes them to
//! the port's response ring in the same poll.

use rustc_hash::FxHashMap as HashMap;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Nanos;
use crate::error::{EngineError, Result};
use crate::hub::{Doorbell, Failure, Hub, HubConfig, Outcome};
use crate::metrics::{CallEnd, OutcomeCounts};
use crate::port::{EnginePort, Remote};
use crate::reactor::Reactor;
use crate::shm::Arena;

pub struct Engine {
    pub hub: Hub,
    reactor: Reactor,
    /// Open ports by id (`None`: closed, the id is free again).
    ports: Vec<Option<EnginePort>>,
    /// Hub id of a task that came through a port -> where it came from.
    remote: HashMap<u64, Remote>,
    /// The port that drains first in the next poll.
    first_port: usize,
    /// How port clients' calls ended (the owner's calls are counted by its driver).
    port_counts: OutcomeCounts,
    /// The owner's next deadline (see [`Engine::set_host_timer`]).
    host_timer: Option<Nanos>,
    /// Slots whose worker is not a watched process and has reported that it is gone (see
    /// [`ExitNotifier`]); handled in the next poll like a process exit.
    gone: Arc<Mutex<Vec<usize>>>,
    /// Slots whose worker is not a process and ran past its step's `handle_timeout`: the engine
    /// cannot kill it, its owner must (the driver's `Event::StopWorker`).
    overdue_hosted: Vec<usize>,
}

/// How a worker that is not a process of the engine's (an executor's worker: a thread, a
/// remote actor's local end) tells the engine it has stopped serving its slot: from any
/// thread, at any time. The engine handles it in its next poll exactly as it handles a process
/// exit seen through a pidfd (tasks failed or handed back, the restart policy applied).
pub struct ExitNotifier {
    slot: usize,
    gone: Arc<Mutex<Vec<usize>>>,
    doorbell: Doorbell,
}

impl ExitNotifier {
    pub fn notify(&self) {
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).push(self.slot);
        // Wake the owner whether or not it sleeps: the reactor clears the doorbell.
        self.doorbell.ring();
    }
}

/// Requests a port may hand over in one turn before the next port's turn.
const PORT_TURN: usize = 8;

/// Where the engine's outcomes go: to the port a task came from (counted), or to the owner.
struct Router<'a> {
    ports: &'a mut [Option<EnginePort>],
    remote: &'a mut HashMap<u64, Remote>,
    counts: &'a mut OutcomeCounts,
    arena: &'a Arena,
    err: Option<EngineError>,
}

impl<'a> Router<'a> {
    fn new(
        ports: &'a mut [Option<EnginePort>],
        remote: &'a mut HashMap<u64, Remote>,
        counts: &'a mut OutcomeCounts,
        arena: &'a Arena,
    ) -> Self {
        Self { ports, remote, counts, arena, err: None }
    }

    fn route(&mut self, out: &mut dyn FnMut(Outcome<'_>), o: Outcome<'_>) {
        if let Outcome::Part { task_id, .. } = &o {
            // A part of a port's task goes to its port; the task goes on.
            if let Some(r) = self.remote.get(task_id).copied() {
                if let Some(p) = self.ports.get_mut(r.port).and_then(Option::as_mut) {
                    if let Err(e) = p.respond(self.arena, r.client_id, o) {
                        self.err.get_or_insert(e);
                    }
                }
                return;
            }
        }
        let (task_id, end) = match &o {
            Outcome::Done { task_id, .. } => (Some(*task_id), CallEnd::Complete),
            Outcome::Failed { task_id, failure: Failure::Expired { .. } } => (Some(*task_id), CallEnd::Timeout),
            Outcome::Failed { task_id, .. } => (Some(*task_id), CallEnd::Error),
            _ => (None, CallEnd::Error),
        };
        if let Some(r) = task_id.and_then(|id| self.remote.remove(&id)) {
            self.counts.add(r.step as usize, r.priority, end);
            if let Some(p) = self.ports.get_mut(r.port).and_then(Option::as_mut) {
                if let Err(e) = p.respond(self.arena, r.client_id, o) {
                    self.err.get_or_insert(e);
                }
            }
            return;
        }
        out(o)
    }
}

impl Engine {
    /// A flow's engine; large payloads go to `pool` (the main process's handle).
    pub fn new(cfg: &HubConfig, pool: Arc<Arena>) -> Result<Self> {
        let hub = Hub::create(cfg, pool)?;
        let reactor = Reactor::new(Doorbell::new()?)?;
        let port_counts = OutcomeCounts::new(cfg.steps.len(), cfg.priorities);
        Ok(Self {
            hub,
            reactor,
            ports: Vec::new(),
            remote: HashMap::default(),
            first_port: 0,
            port_counts,
            host_timer: None,
            gone: Arc::new(Mutex::new(Vec::new())),
            overdue_hosted: Vec::new(),
        })
    }

    /// Readable when the engine has work: poll it then.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.reactor.fd()
    }

    /// The doorbell eventfd, for worker processes and port clients.
    pub fn doorbell_fd(&self) -> BorrowedFd<'_> {
        self.reactor.doorbell().fd()
    }

    /// The shared region's memfd, for worker processes.
    pub fn region_fd(&self) -> BorrowedFd<'_> {
        self.hub.region().fd().expect("the engine's region is a memfd")
    }

    /// Registers a newly started worker process for `slot` (process `pool_index` in the pool)
    /// and watches it for exit.
    pub fn worker_spawned(&mut self, slot: usize, pid: u32, pool_index: u32) -> Result<()> {
        self.reactor.watch(slot, pid)?;
        self.hub.worker_spawned(slot, pid, pool_index);
        Ok(())
    }

    /// Registers a worker *thread* for `slot` (process `pool_index` in the pool): like
    /// [`Engine::worker_spawned`], without a process to watch.
    pub fn thread_worker_started(&mut self, slot: usize, pool_index: u32) {
        self.hub.worker_spawned(slot, 0, pool_index);
    }

    /// A notifier for the worker of `slot` that is not a process (see [`ExitNotifier`]).
    pub fn exit_notifier(&self, slot: usize) -> Result<ExitNotifier> {
        let fd = self.doorbell_fd().try_clone_to_owned().map_err(|e| EngineError::Os("dup", e))?;
        Ok(ExitNotifier { slot, gone: self.gone.clone(), doorbell: Doorbell::from_fd(fd) })
    }

    /// Opens a port (rings of `capacity` bytes) for a client acting as process `pool_index` of
    /// the pool; returns its id.
    pub fn open_port(&mut self, capacity: usize, pool_index: u32) -> Result<usize> {
        let port = EnginePort::create(capacity, pool_index)?;
        self.add_port(port)
    }

    /// Adds a port created by the caller (tests use heap ports); returns its id.
    pub fn add_port(&mut self, port: EnginePort) -> Result<usize> {
        if let Some(free) = self.ports.iter().position(Option::is_none) {
            self.ports[free] = Some(port);
            return Ok(free);
        }
        self.ports.push(Some(port));
        Ok(self.ports.len() - 1)
    }

    pub fn port(&self, id: usize) -> Result<&EnginePort> {
        self.ports.get(id).and_then(Option::as_ref).ok_or_else(|| EngineError::Config(format!("no port {id}")))
    }

    /// Closes a port whose client is gone or disconnected: its tasks are cancelled (their
    /// references released by the hub) and the region is unmapped. Returns the client's pool
    /// index, which the caller reaps once the client process is dead.
    pub fn close_port(&mut self, id: usize) -> Result<u32> {
        let port = self
            .ports
            .get_mut(id)
            .and_then(Option::take)
            .ok_or_else(|| EngineError::Config(format!("no port {id}")))?;
        for hub_id in port.hub_ids() {
            if let Some(r) = self.remote.remove(&hub_id) {
                self.port_counts.add(r.step as usize, r.priority, CallEnd::Cancel);
            }
            self.hub.cancel(hub_id);
        }
        Ok(port.pool_index())
    }

    /// Open ports.
    pub fn port_count(&self) -> usize {
        self.ports.iter().flatten().count()
    }

    /// Handles everything that is ready, never blocking.
    pub fn poll(&mut self, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        self.poll_with(Some(Duration::ZERO), out)
    }

    /// Handles what workers and port clients published, without asking the kernel about exits,
    /// timers or the doorbell (no system call unless a client must be woken). For an owner that
    /// polls in a tight loop and learns about those from the descriptor becoming readable, when
    /// it then calls [`Engine::poll`].
    pub fn poll_rings(&mut self, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        let n = self.poll_hub_and_ports(out)?;
        self.kill_overdue();
        self.arm_timer()?;
        Ok(n)
    }

    /// Tells the engine the owner's next deadline (a caller's timeout, a restart's backoff, a
    /// stop's grace): the engine's descriptor becomes readable then, as for its own timers.
    pub fn set_host_timer(&mut self, at: Option<Nanos>) -> Result<()> {
        self.host_timer = at;
        self.arm_timer()
    }

    fn arm_timer(&mut self) -> Result<()> {
        let at = match (self.hub.next_timer(), self.host_timer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.reactor.arm_timer(at)
    }

    /// How port clients' calls ended.
    pub fn port_counts(&self) -> &OutcomeCounts {
        &self.port_counts
    }

    /// A worker that is not a watched process (a thread, or host code) is gone: handled as a
    /// process exit would be, its tasks failed or handed back.
    pub fn worker_gone(&mut self, slot: usize, out: &mut dyn FnMut(Outcome<'_>)) -> Result<()> {
        let arena = self.hub.arena().clone();
        let mut router = Router::new(&mut self.ports, &mut self.remote, &mut self.port_counts, &arena);
        self.hub.worker_exited(slot, &mut |o| router.route(out, o))?;
        router.err.map_or(Ok(()), Err)
    }

    /// Waits up to `timeout` for something to happen, then handles it. Lowers the doorbell flag
    /// only if it is safe to sleep; otherwise handles pending records at once.
    pub fn wait(&mut self, timeout: Option<Duration>, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        if self.prepare_sleep() {
            self.poll_with(timeout, out)
        } else {
            self.poll(out)
        }
    }

    fn poll_with(&mut self, timeout: Option<Duration>, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        let ready = self.reactor.wait(timeout)?;
        self.woke();
        if ready.doorbell {
            self.hub.woken_by_doorbell();
        }
        let mut n = 0;
        let notified = std::mem::take(&mut *self.gone.lock().unwrap_or_else(|p| p.into_inner()));
        // Every exit is handled even if one fails (its error is reported after the others).
        let mut failed = None;
        for slot in ready.exited.into_iter().chain(notified) {
            if let Err(e) = self.worker_gone(slot, out) {
                failed.get_or_insert(e);
            }
            n += 1;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        n += self.poll_hub_and_ports(out)?;
        self.kill_overdue();
        self.arm_timer()?;
        Ok(n)
    }

    /// Kills the workers whose batch ran past their step's `handle_timeout` (see the hub's
    /// "Hung workers"); their exit, seen by the reactor, fails the batch.
    fn kill_overdue(&mut self) {
        for slot in self.hub.take_overdue() {
            if self.reactor.watches(slot) {
                // A worker that exited meanwhile is already gone: nothing to kill.
                let _ = self.reactor.signal(slot, rustix::process::Signal::KILL);
            } else {
                self.overdue_hosted.push(slot);
            }
        }
    }

    /// The workers that are not processes found overdue since the last call: their owner is
    /// to end them, and their exit fails the batch as a killed process's does.
    pub fn take_overdue_hosted(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.overdue_hosted)
    }

    /// One round: workers' results, then ports' requests, then the ports' responses published.
    fn poll_hub_and_ports(&mut self, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        let arena = self.hub.arena().clone();
        let mut router = Router::new(&mut self.ports, &mut self.remote, &mut self.port_counts, &arena);
        let mut n = self.hub.poll(Nanos::now(), &mut |o| router.route(out, o))?;
        let mut err = router.err.take();
        if self.ports.is_empty() {
            return err.map_or(Ok(n), Err);
        }
        // Clients take turns, a few requests each, so that one busy client cannot fill the
        // queues while another's requests wait; the first turn rotates between polls.
        let count = self.ports.len();
        self.first_port = (self.first_port + 1) % count;
        let mut took = 0;
        loop {
            let mut round = 0;
            for i in 0..count {
                let id = (self.first_port + i) % count;
                if let Some(p) = self.ports[id].as_mut() {
                    if p.has_requests() {
                        round += p.drain(id, &mut self.hub, &mut self.remote, PORT_TURN)?;
                    }
                }
            }
            took += round;
            if round == 0 {
                break;
            }
        }
        if took > 0 {
            // Failures found while dispatching the new tasks (expired on arrival) go out now.
            let mut router = Router::new(&mut self.ports, &mut self.remote, &mut self.port_counts, &arena);
            n += self.hub.poll(Nanos::now(), &mut |o| router.route(out, o))?;
            if let Some(e) = router.err {
                err.get_or_insert(e);
            }
        }
        for p in self.ports.iter_mut().flatten() {
            p.publish()?;
        }
        err.map_or(Ok(n), Err)
    }

    /// Blocks until the engine's fd is readable or `timeout` passes, without handling anything
    /// (the readiness stays pending for the next `poll`). For owners that must release a lock,
    /// such as an interpreter lock, between waiting and handling.
    pub fn block(&self, timeout: Option<Duration>) -> Result<()> {
        self.reactor.block(timeout)
    }

    /// Raises the doorbell flags (the workers' and every port's); returns false, with the flags
    /// lowered again, when work is already pending: poll instead.
    pub fn prepare_sleep(&mut self) -> bool {
        for p in self.ports.iter().flatten() {
            p.set_engine_sleeping(true);
        }
        let hub_idle = self.hub.prepare_sleep();
        let hub = &self.hub;
        if !hub_idle || self.ports.iter_mut().flatten().any(|p| p.has_takeable_requests(hub)) {
            self.woke();
            return false;
        }
        true
    }

    /// The owner polls again without having been woken (see [`Hub::resumed`]).
    pub fn resumed(&mut self) {
        self.hub.resumed();
        self.lower_port_flags();
    }

    /// Lowers the doorbell flags: nobody rings while the engine is awake.
    fn woke(&self) {
        self.hub.woke();
        self.lower_port_flags();
    }

    fn lower_port_flags(&self) {
        for p in self.ports.iter().flatten() {
            p.set_engine_sleeping(false);
        }
    }

    pub fn reactor(&self) -> &Reactor {
        &self.reactor
    }
}
