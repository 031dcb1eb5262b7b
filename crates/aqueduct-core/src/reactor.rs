#![forbid(unsafe_code)]
//! What the hub's owner sleeps on: one epoll instance holding the doorbell eventfd, a timerfd
//! for batch timeouts, and a pidfd per worker process.
//!
//! The epoll descriptor is itself pollable, so an event loop (asyncio's `add_reader`, tokio's
//! `AsyncFd`) watches this single fd and calls [`crate::engine::Engine::poll`] when it fires.
//! A worker's death is seen the moment the kernel marks its pidfd readable: no periodic
//! liveness polling.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::epoll;
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};

use crate::clock::Nanos;
use crate::error::{EngineError, Result};
use crate::hub::Doorbell;

const KEY_DOORBELL: u64 = u64::MAX;
const KEY_TIMER: u64 = u64::MAX - 1;

#[derive(Debug, Default)]
pub struct Ready {
    /// Slots whose process exited.
    pub exited: Vec<usize>,
    pub doorbell: bool,
    pub timer: bool,
}

pub struct Reactor {
    epoll: OwnedFd,
    doorbell: Doorbell,
    timer: OwnedFd,
    armed: Option<Nanos>,
    pidfds: HashMap<usize, OwnedFd>,
}

fn timespec(n: Nanos) -> Timespec {
    Timespec { tv_sec: (n.0 / 1_000_000_000) as i64, tv_nsec: (n.0 % 1_000_000_000) as _ }
}

impl Reactor {
    pub fn new(doorbell: Doorbell) -> Result<Self> {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(EngineError::os("epoll_create"))?;
        let timer =
            rustix::time::timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK)
                .map_err(EngineError::os("timerfd_create"))?;
        epoll::add(&ep, doorbell.fd(), epoll::EventData::new_u64(KEY_DOORBELL), epoll::EventFlags::IN)
            .map_err(EngineError::os("epoll_ctl"))?;
        epoll::add(&ep, &timer, epoll::EventData::new_u64(KEY_TIMER), epoll::EventFlags::IN)
            .map_err(EngineError::os("epoll_ctl"))?;
        Ok(Self { epoll: ep, doorbell, timer, armed: None, pidfds: HashMap::new() })
    }

    /// The descriptor an event loop watches for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }

    /// Starts watching the process `pid` as the worker of `slot`.
    pub fn watch(&mut self, slot: usize, pid: u32) -> Result<()> {
        let pid = rustix::process::Pid::from_raw(pid as i32).ok_or(EngineError::Config("pid 0".into()))?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .map_err(EngineError::os("pidfd_open"))?;
        epoll::add(&self.epoll, &fd, epoll::EventData::new_u64(slot as u64), epoll::EventFlags::IN)
            .map_err(EngineError::os("epoll_ctl"))?;
        if let Some(old) = self.pidfds.insert(slot, fd) {
            let _ = epoll::delete(&self.epoll, &old);
        }
        Ok(())
    }

    /// Arms the timer for an absolute time on the monotonic clock (or disarms it).
    pub fn arm_timer(&mut self, at: Option<Nanos>) -> Result<()> {
        if self.armed == at {
            return Ok(());
        }
        let value = match at {
            // 1 ns is "immediately": an all-zero value would disarm.
            Some(t) => timespec(Nanos(t.0.max(1))),
            None => Timespec { tv_sec: 0, tv_nsec: 0 },
        };
        let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
        rustix::time::timerfd_settime(&self.timer, TimerfdTimerFlags::ABSTIME, &spec)
            .map_err(EngineError::os("timerfd_settime"))?;
        self.armed = at;
        Ok(())
    }

    /// Collects what is ready, waiting at most `timeout` (`Some(ZERO)` never blocks).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Ready> {
        let ts = timeout.map(|d| Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as _ });
        // A stack buffer: epoll events hold a raw-pointer union, which would make the reactor
        // (and the engine) !Send if it were stored.
        let mut buf: [std::mem::MaybeUninit<epoll::Event>; 64] = [const { std::mem::MaybeUninit::uninit() }; 64];
        let events: &[epoll::Event] = match epoll::wait(&self.epoll, &mut buf, ts.as_ref()) {
            Ok((events, _)) => events,
            Err(rustix::io::Errno::INTR) => &[],
            Err(e) => return Err(EngineError::Os("epoll_wait", e.into())),
        };
        let mut ready = Ready::default();
        for ev in events {
            match ev.data.u64() {
                KEY_DOORBELL => ready.doorbell = true,
                KEY_TIMER => ready.timer = true,
                slot => ready.exited.push(slot as usize),
            }
        }
        if ready.doorbell {
            self.doorbell.clear();
        }
        if ready.timer {
            let mut buf = [0u8; 8];
            let _ = rustix::io::read(&self.timer, &mut buf);
            self.armed = None;
        }
        for slot in &ready.exited {
            if let Some(fd) = self.pidfds.remove(slot) {
                let _ = epoll::delete(&self.epoll, &fd);
            }
        }
        Ok(ready)
    }

    /// Waits until something is ready, leaving it pending (epoll is level-triggered).
    pub fn block(&self, timeout: Option<Duration>) -> Result<()> {
        block_on(self.epoll.as_fd(), timeout)
    }

    /// Whether the process of `slot` is being watched (alive as far as the reactor knows).
    pub fn watching(&self, slot: usize) -> bool {
        self.pidfds.contains_key(&slot)
    }

    /// Sends a signal to the worker of `slot` through its pidfd (no pid-reuse race).
    pub fn signal(&self, slot: usize, sig: rustix::process::Signal) -> Result<()> {
        if let Some(fd) = self.pidfds.get(&slot) {
            rustix::process::pidfd_send_signal(fd, sig).map_err(EngineError::os("pidfd_send_signal"))?;
        }
        Ok(())
    }
}

/// Waits until the reactor descriptor `epoll` (or a duplicate of it) is readable or `timeout`
/// passes, consuming nothing. Lets an owner wait without holding the lock around the engine.
pub fn block_on(epoll: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<()> {
    let ts = timeout.map(|d| Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as _ });
    let mut events: [std::mem::MaybeUninit<epoll::Event>; 1] = [std::mem::MaybeUninit::uninit()];
    match epoll::wait(epoll, &mut events, ts.as_ref()) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(EngineError::Os("epoll_wait", e.into())),
    }
}
