#![forbid(unsafe_code)]
//! What the hub's owner sleeps on: one epoll instance holding the doorbell eventfd, a timerfd
//! for batch timeouts, and a pidfd per worker process.
//!
//! The epoll descriptor is itself pollable, so an event loop (asyncio's `add_reader`, tokio's
//! `AsyncFd`) watches this single fd and calls [`crate::engine::Engine::poll`] when it fires.
//! A worker's death is seen the moment the kernel marks its pidfd readable: no periodic
//! liveness polling.
//!
//! Where the kernel refuses `pidfd_open` (older than 5.3, valgrind, a seccomp profile that
//! predates it; see [`crate::proc_watch`]), a worker is watched by its identity in `/proc`
//! instead, and only then a second timerfd wakes the reactor every 50 ms to look at those
//! workers: each one gone is reported in [`Ready::exited`] exactly as a pidfd exit is. That
//! costs twenty wake-ups a second and a death seen up to 50 ms late; the timer is disarmed
//! whenever no worker is polled, so a flow on pidfds never has a periodic wake-up.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::epoll;
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};

use crate::clock::Nanos;
use crate::error::{EngineError, Result};
use crate::hub::Doorbell;
use crate::proc_watch::{ExitWatch, ProcIdentity, ProcessWatch};

const KEY_DOORBELL: u64 = u64::MAX;
const KEY_TIMER: u64 = u64::MAX - 1;
const KEY_POLL: u64 = u64::MAX - 2;

/// How often polled workers are looked at: a death is seen at most this late.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

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
    /// `Auto` until the kernel first refuses a pidfd; polling from then on, since the refusal
    /// (a missing system call, a seccomp rule) does not change while the process runs.
    exit_watch: ExitWatch,
    pidfds: HashMap<usize, OwnedFd>,
    /// Workers watched by polling; a slot is in this map or in `pidfds`, never both.
    polled: HashMap<usize, ProcIdentity>,
    /// The periodic timer for `polled`, created with the first polled watch (a flow on pidfds
    /// never has one), and armed exactly while `polled` is not empty.
    poll_timer: Option<OwnedFd>,
    poll_armed: bool,
}

fn timespec(n: Nanos) -> Timespec {
    Timespec { tv_sec: (n.0 / 1_000_000_000) as i64, tv_nsec: (n.0 % 1_000_000_000) as _ }
}

impl Reactor {
    /// A reactor that watches processes as `AQUEDUCT_EXIT_WATCH` says (pidfds by default).
    pub fn new(doorbell: Doorbell) -> Result<Self> {
        Self::with_exit_watch(doorbell, ExitWatch::from_env()?)
    }

    /// A reactor that watches processes as `exit_watch` says, whatever the environment.
    pub fn with_exit_watch(doorbell: Doorbell, exit_watch: ExitWatch) -> Result<Self> {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(EngineError::os("epoll_create"))?;
        let timer =
            rustix::time::timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK)
                .map_err(EngineError::os("timerfd_create"))?;
        epoll::add(&ep, doorbell.fd(), epoll::EventData::new_u64(KEY_DOORBELL), epoll::EventFlags::IN)
            .map_err(EngineError::os("epoll_ctl"))?;
        epoll::add(&ep, &timer, epoll::EventData::new_u64(KEY_TIMER), epoll::EventFlags::IN)
            .map_err(EngineError::os("epoll_ctl"))?;
        Ok(Self {
            epoll: ep,
            doorbell,
            timer,
            armed: None,
            exit_watch,
            pidfds: HashMap::new(),
            polled: HashMap::new(),
            poll_timer: None,
            poll_armed: false,
        })
    }

    /// The descriptor an event loop watches for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }

    /// Starts watching the process `pid` as the worker of `slot`, in place of any process
    /// watched for it before.
    pub fn watch(&mut self, slot: usize, pid: u32) -> Result<()> {
        let pid = rustix::process::Pid::from_raw(pid as i32).ok_or_else(|| EngineError::Config("pid 0".into()))?;
        match ProcessWatch::open(pid, self.exit_watch)? {
            ProcessWatch::Pidfd(fd) => {
                epoll::add(&self.epoll, &fd, epoll::EventData::new_u64(slot as u64), epoll::EventFlags::IN)
                    .map_err(EngineError::os("epoll_ctl"))?;
                self.polled.remove(&slot);
                if let Some(old) = self.pidfds.insert(slot, fd) {
                    let _ = epoll::delete(&self.epoll, &old);
                }
            }
            ProcessWatch::Polled(identity) => {
                self.exit_watch = ExitWatch::Poll;
                if let Some(old) = self.pidfds.remove(&slot) {
                    let _ = epoll::delete(&self.epoll, &old);
                }
                self.polled.insert(slot, identity);
            }
        }
        self.arm_poll_timer()
    }

    /// Whether processes are watched by polling (forced, or because the kernel refused a pidfd).
    pub fn polls_exits(&self) -> bool {
        self.exit_watch == ExitWatch::Poll
    }

    /// Arms the periodic timer while some worker is polled, disarms it once none is.
    fn arm_poll_timer(&mut self) -> Result<()> {
        let want = !self.polled.is_empty();
        if want == self.poll_armed {
            return Ok(());
        }
        let timer = match &self.poll_timer {
            Some(t) => t,
            None => {
                let t = rustix::time::timerfd_create(
                    TimerfdClockId::Monotonic,
                    TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
                )
                .map_err(EngineError::os("timerfd_create"))?;
                epoll::add(&self.epoll, &t, epoll::EventData::new_u64(KEY_POLL), epoll::EventFlags::IN)
                    .map_err(EngineError::os("epoll_ctl"))?;
                self.poll_timer.insert(t)
            }
        };
        let period = if want { timespec(Nanos(POLL_INTERVAL.as_nanos() as u64)) } else { timespec(Nanos::ZERO) };
        // Relative and periodic: its first expiry one period from now (all zero disarms).
        let spec = Itimerspec { it_interval: period, it_value: period };
        rustix::time::timerfd_settime(timer, TimerfdTimerFlags::empty(), &spec)
            .map_err(EngineError::os("timerfd_settime"))?;
        self.poll_armed = want;
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
        let mut poll_tick = false;
        for ev in events {
            match ev.data.u64() {
                KEY_DOORBELL => ready.doorbell = true,
                KEY_TIMER => ready.timer = true,
                KEY_POLL => poll_tick = true,
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
        if poll_tick {
            if let Some(t) = &self.poll_timer {
                // Consume the expiration count, or the level-triggered epoll stays readable.
                let mut buf = [0u8; 8];
                let _ = rustix::io::read(t, &mut buf);
            }
            let gone: Vec<usize> = self.polled.iter().filter(|(_, id)| !id.is_alive()).map(|(&slot, _)| slot).collect();
            for slot in gone {
                self.polled.remove(&slot);
                ready.exited.push(slot);
            }
            // Disarming cannot fail on a timer that was just read; if it did, the next ticks
            // would find nothing to look at, which is harmless, and the exits must still go out.
            let _ = self.arm_poll_timer();
        }
        Ok(ready)
    }

    /// Waits until something is ready, leaving it pending (epoll is level-triggered).
    pub fn block(&self, timeout: Option<Duration>) -> Result<()> {
        block_on(self.epoll.as_fd(), timeout)
    }

    /// Whether the process of `slot` is being watched (alive as far as the reactor knows).
    pub fn watching(&self, slot: usize) -> bool {
        self.pidfds.contains_key(&slot) || self.polled.contains_key(&slot)
    }

    /// Sends a signal to the worker of `slot` through its pidfd (no pid-reuse race), or, for
    /// a polled worker, by pid once its identity is checked. A slot not watched, or whose
    /// polled process is gone, is not an error.
    /// Whether the worker of `slot` is a process the reactor watches (not an executor's).
    pub fn watches(&self, slot: usize) -> bool {
        self.pidfds.contains_key(&slot) || self.polled.contains_key(&slot)
    }

    pub fn signal(&self, slot: usize, sig: rustix::process::Signal) -> Result<()> {
        if let Some(fd) = self.pidfds.get(&slot) {
            rustix::process::pidfd_send_signal(fd, sig).map_err(EngineError::os("pidfd_send_signal"))?;
        } else if let Some(identity) = self.polled.get(&slot) {
            identity.signal(sig).map_err(|e| EngineError::Os("kill", e))?;
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

// Processes, epoll and timerfds: Miri emulates none of them, so these run in `cargo test` only.
#[cfg(all(test, not(miri)))]
mod tests {
    use std::process::{Child, Command};
    use std::time::Instant;

    use rustix::process::{kill_process, Pid, Signal};

    use super::*;

    fn polled() -> Reactor {
        Reactor::with_exit_watch(Doorbell::new().unwrap(), ExitWatch::Poll).unwrap()
    }

    /// A child that sleeps for `secs` seconds, killed and reaped when the test is done.
    struct Sleeper(Child);

    impl Sleeper {
        fn new(secs: &str) -> Self {
            Sleeper(Command::new("sleep").arg(secs).spawn().unwrap())
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }

        /// Whether the process runs (has not exited, not even as a zombie).
        fn running(&self) -> bool {
            ProcIdentity::of(Pid::from_raw(self.0.id() as i32).unwrap()).is_ok_and(|id| id.is_alive())
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The slots reported exited within `within` (returns as soon as one is).
    fn exits(r: &mut Reactor, within: Duration) -> Vec<usize> {
        let end = Instant::now() + within;
        loop {
            let now = Instant::now();
            if now >= end {
                return Vec::new();
            }
            let ready = r.wait(Some(end - now)).unwrap();
            if !ready.exited.is_empty() {
                return ready.exited;
            }
        }
    }

    #[test]
    fn a_polled_worker_that_exits_is_reported_once() {
        let mut r = polled();
        let child = Sleeper::new("0.1");
        r.watch(3, child.pid()).unwrap();
        assert!(r.polls_exits() && r.watching(3));
        // Not reaped meanwhile: the engine sees its workers exit as zombies.
        assert_eq!(exits(&mut r, Duration::from_secs(10)), vec![3]);
        assert!(!r.watching(3));
        assert_eq!(exits(&mut r, Duration::from_millis(200)), Vec::<usize>::new(), "reported once");
    }

    #[test]
    fn a_sigkilled_polled_worker_is_reported_promptly() {
        let mut r = polled();
        let child = Sleeper::new("30");
        r.watch(0, child.pid()).unwrap();
        let killed_at = Instant::now();
        r.signal(0, Signal::KILL).unwrap();
        assert_eq!(exits(&mut r, Duration::from_secs(10)), vec![0]);
        let noticed = killed_at.elapsed();
        // One poll period, and room for a loaded machine.
        assert!(noticed < Duration::from_secs(1), "took {noticed:?}");
        // The slot is no longer watched: signalling it is not an error and reaches nobody.
        r.signal(0, Signal::KILL).unwrap();
    }

    #[test]
    fn a_live_polled_worker_is_not_reported_and_an_idle_reactor_stops_ticking() {
        let mut r = polled();
        let child = Sleeper::new("30");
        r.watch(1, child.pid()).unwrap();
        // Several poll periods pass with the timer firing and the worker alive.
        assert_eq!(exits(&mut r, Duration::from_millis(300)), Vec::<usize>::new());
        assert!(r.watching(1) && r.poll_armed);
        kill_process(Pid::from_raw(child.pid() as i32).unwrap(), Signal::KILL).unwrap();
        assert_eq!(exits(&mut r, Duration::from_secs(10)), vec![1]);
        assert!(!r.poll_armed, "the timer is disarmed with nothing to poll");
        // Nothing wakes an idle reactor now.
        let start = Instant::now();
        r.block(Some(Duration::from_millis(200))).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(190), "woke after {:?}", start.elapsed());
    }

    #[test]
    fn a_new_watch_for_a_slot_drops_the_old_one_of_either_kind() {
        let mut r = polled();
        let (first, second) = (Sleeper::new("30"), Sleeper::new("30"));
        r.watch(2, first.pid()).unwrap();
        r.watch(2, second.pid()).unwrap();
        r.signal(2, Signal::KILL).unwrap();
        assert_eq!(exits(&mut r, Duration::from_secs(10)), vec![2]);
        assert!(first.running(), "the worker of a replaced watch was signalled");

        // A pidfd watch (where the kernel has pidfds) replaced by a polled one, and back.
        let mut r = Reactor::with_exit_watch(Doorbell::new().unwrap(), ExitWatch::Auto).unwrap();
        r.watch(4, first.pid()).unwrap();
        if r.polls_exits() {
            return; // this kernel refuses pidfds
        }
        assert!(r.poll_timer.is_none(), "no periodic timer at all for pidfd watches");
        let third = Sleeper::new("30");
        r.exit_watch = ExitWatch::Poll;
        r.watch(4, third.pid()).unwrap();
        assert!(r.pidfds.is_empty() && r.polled.len() == 1 && r.poll_armed);
        r.exit_watch = ExitWatch::Auto;
        r.watch(4, first.pid()).unwrap();
        assert!(r.polled.is_empty() && r.pidfds.len() == 1 && !r.poll_armed);
        r.signal(4, Signal::KILL).unwrap();
        assert_eq!(exits(&mut r, Duration::from_secs(10)), vec![4]);
        assert!(third.running(), "the worker of a replaced watch was signalled");
    }
}
