#![forbid(unsafe_code)]
//! The main process's engine: a [`Hub`] plus the [`Reactor`] that tells it when to run.
//!
//! An owner (the Python event loop, a tokio task, or a plain loop in a benchmark) watches
//! [`Engine::fd`], calls [`Engine::poll`] when it is readable, and before going idle calls
//! [`Engine::prepare_sleep`]; a worker then rings the doorbell when it publishes, which makes
//! the fd readable.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Nanos;
use crate::error::Result;
use crate::hub::{Doorbell, Hub, HubConfig, Outcome};
use crate::reactor::Reactor;
use crate::shm::Arena;

pub struct Engine {
    pub hub: Hub,
    reactor: Reactor,
}

impl Engine {
    /// A flow's engine; large payloads go to `pool` (the main process's handle).
    pub fn new(cfg: &HubConfig, pool: Arc<Arena>) -> Result<Self> {
        let hub = Hub::create(cfg, pool)?;
        let reactor = Reactor::new(Doorbell::new()?)?;
        Ok(Self { hub, reactor })
    }

    /// Readable when the engine has work: poll it then.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.reactor.fd()
    }

    /// The doorbell eventfd, for worker processes.
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

    /// Handles everything that is ready, never blocking.
    pub fn poll(&mut self, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        self.poll_with(Some(Duration::ZERO), out)
    }

    /// Handles what workers published, without asking the kernel about exits, timers or the
    /// doorbell (no system call). For an owner that polls in a tight loop and learns about those
    /// from the descriptor becoming readable, when it then calls [`Engine::poll`].
    pub fn poll_rings(&mut self, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        let n = self.hub.poll(Nanos::now(), out)?;
        self.reactor.arm_timer(self.hub.next_timer())?;
        Ok(n)
    }

    /// Waits up to `timeout` for something to happen, then handles it. Lowers the doorbell flag
    /// only if it is safe to sleep; otherwise handles pending records at once.
    pub fn wait(&mut self, timeout: Option<Duration>, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        if self.hub.prepare_sleep() {
            self.poll_with(timeout, out)
        } else {
            self.poll(out)
        }
    }

    fn poll_with(&mut self, timeout: Option<Duration>, out: &mut dyn FnMut(Outcome<'_>)) -> Result<usize> {
        let ready = self.reactor.wait(timeout)?;
        self.hub.woke();
        let mut n = 0;
        for slot in ready.exited {
            self.hub.worker_exited(slot, out)?;
            n += 1;
        }
        n += self.hub.poll(Nanos::now(), out)?;
        self.reactor.arm_timer(self.hub.next_timer())?;
        Ok(n)
    }

    /// Blocks until the engine's fd is readable or `timeout` passes, without handling anything
    /// (the readiness stays pending for the next `poll`). For owners that must release a lock,
    /// such as an interpreter lock, between waiting and handling.
    pub fn block(&self, timeout: Option<Duration>) -> Result<()> {
        self.reactor.block(timeout)
    }

    /// Raises the doorbell flag; returns false when work is already pending (poll instead).
    pub fn prepare_sleep(&mut self) -> bool {
        self.hub.prepare_sleep()
    }

    pub fn reactor(&self) -> &Reactor {
        &self.reactor
    }
}
