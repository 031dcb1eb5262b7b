#![forbid(unsafe_code)]
//! How the engine knows a process is still the one it started: through a pidfd where the kernel
//! offers one, otherwise by its identity in `/proc`, polled.
//!
//! A pidfd refers to one process for good (a reused pid cannot be mistaken for it) and becomes
//! readable the moment the process exits, so it is always tried first. `pidfd_open` is missing
//! on kernels older than 5.3 (the CentOS 7 era hosts our manylinux2014 wheel targets), under
//! valgrind 3.19 (which we need for callgrind's instruction counts), and in containers whose
//! seccomp profile predates it (older Docker answers EPERM for a system call it does not know).
//! On exactly those two errors, ENOSYS and EPERM, the watch falls back to a [`ProcIdentity`]:
//! the pid plus the start time the kernel records for it, which a later process reusing the
//! pid cannot share. Any other error stays an error: it means the process is gone or the
//! system is out of descriptors, and polling would hide that.
//!
//! A polled identity costs its owner a periodic wake-up (the reactor checks every 50 ms) and
//! sees a death up to one period late; a pidfd costs nothing until the process exits.
//!
//! `AQUEDUCT_EXIT_WATCH=poll` in the environment makes every watch polled even where pidfds
//! work, to test the fallback on a normal kernel; unset or `auto`, pidfds are used when the
//! kernel allows. It is read by [`ExitWatch::from_env`] alone.

use std::io;
use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal};

use crate::error::{EngineError, Result};

/// The environment variable that forces polling (see the module header).
pub const EXIT_WATCH_ENV: &str = "AQUEDUCT_EXIT_WATCH";

/// How processes are watched for exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExitWatch {
    /// A pidfd, or polling where the kernel refuses `pidfd_open` (ENOSYS, EPERM).
    #[default]
    Auto,
    /// Polling, always.
    Poll,
}

impl ExitWatch {
    /// The mode `AQUEDUCT_EXIT_WATCH` asks for; an unknown value is a configuration error
    /// rather than silently ignored, so a typo cannot leave a test on pidfds unnoticed.
    pub fn from_env() -> Result<Self> {
        match std::env::var_os(EXIT_WATCH_ENV) {
            None => Ok(ExitWatch::Auto),
            Some(v) if v.is_empty() || v == "auto" => Ok(ExitWatch::Auto),
            Some(v) if v == "poll" => Ok(ExitWatch::Poll),
            Some(v) => Err(EngineError::Config(format!(
                "{EXIT_WATCH_ENV} must be 'poll' or 'auto', got {:?}",
                v.to_string_lossy()
            ))),
        }
    }
}

/// A watched process: its pidfd, or its identity for polling.
#[derive(Debug)]
pub enum ProcessWatch {
    Pidfd(OwnedFd),
    Polled(ProcIdentity),
}

impl ProcessWatch {
    /// Starts watching `pid`. Fails if the process is already gone (reaped), as `pidfd_open`
    /// does; a zombie is watched, and is seen exited at once.
    pub fn open(pid: Pid, how: ExitWatch) -> Result<Self> {
        if how == ExitWatch::Auto {
            match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
                Ok(fd) => return Ok(ProcessWatch::Pidfd(fd)),
                Err(Errno::NOSYS | Errno::PERM) => {}
                Err(e) => return Err(EngineError::Os("pidfd_open", e.into())),
            }
        }
        ProcIdentity::of(pid).map(ProcessWatch::Polled)
    }
}

/// A process as the kernel knows it: its pid and its start time (clock ticks after boot,
/// field 22 of `/proc/<pid>/stat`). Two processes that share a pid never share a start time
/// unless the pid is reused within one clock tick, which needs the whole pid space to wrap
/// around within 10 ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcIdentity {
    pid: Pid,
    start_time: u64,
}

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    state: u8,
    start_time: u64,
}

impl ProcIdentity {
    /// The identity of the process `pid` now; fails if there is none, or if `/proc` is not
    /// this process's pid namespace (then its entries are other processes').
    pub fn of(pid: Pid) -> Result<Self> {
        proc_is_ours()?;
        let stat = read_stat(pid).map_err(|e| EngineError::Os("reading /proc/<pid>/stat", e))?.ok_or_else(|| {
            EngineError::Os("reading /proc/<pid>/stat", io::Error::new(io::ErrorKind::InvalidData, "unexpected format"))
        })?;
        Ok(Self { pid, start_time: stat.start_time })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Whether the process still runs: its `/proc` entry exists, has the same start time, and
    /// it is neither a zombie (exited, not yet reaped) nor dead.
    ///
    /// Only a missing entry counts as gone; an entry that cannot be read for another reason
    /// (out of descriptors, say) counts as alive, to be looked at again: reporting a live
    /// worker dead would put a second process on its rings, where a death seen a tick late
    /// costs only the delay.
    pub fn is_alive(&self) -> bool {
        match read_stat(self.pid) {
            Ok(Some(stat)) => stat.start_time == self.start_time && !matches!(stat.state, b'Z' | b'X' | b'x'),
            Ok(None) => true,
            Err(e) => {
                !matches!(e.kind(), io::ErrorKind::NotFound) && e.raw_os_error() != Some(Errno::SRCH.raw_os_error())
            }
        }
    }

    /// Sends `sig` if the process is still this one; a process that is gone is not an error.
    /// Between the check and the signal the pid could in principle be reaped and reused (a
    /// pidfd closes that window); that needs the pid space to wrap around within microseconds.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        if !self.is_alive() {
            return Ok(());
        }
        match rustix::process::kill_process(self.pid, sig) {
            Ok(()) | Err(Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Checks that `/proc` shows this process's pid namespace: `/proc/self` names our own pid.
/// A sandbox that unshares the pid namespace without mounting a new `/proc` would otherwise
/// have every pid looked up in somebody else's process table.
fn proc_is_ours() -> Result<()> {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let seen = std::fs::read_link("/proc/self").ok().and_then(|p| p.to_str().and_then(|s| s.parse::<i32>().ok()));
    if seen == Some(me) {
        return Ok(());
    }
    Err(EngineError::Config(format!(
        "cannot watch worker processes: pidfd_open is refused and /proc does not show this process's pid namespace \
         (/proc/self is {seen:?}, this process is {me}); mount /proc for the namespace or allow pidfd_open"
    )))
}

/// `/proc/<pid>/stat` parsed; `Ok(None)` if its text is not in the expected format.
fn read_stat(pid: Pid) -> io::Result<Option<Stat>> {
    let text = std::fs::read(format!("/proc/{}/stat", pid.as_raw_nonzero()))?;
    Ok(parse_stat(&text))
}

/// Parses the fields after the command name. That name (field 2) is in parentheses and may
/// hold spaces and ')' itself, but nothing after it can: the fields follow the *last* ')'.
fn parse_stat(text: &[u8]) -> Option<Stat> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    // `rest` starts at field 3 (the state), so field n is at index n - 3.
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.as_bytes();
    let [state] = state else { return None };
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(Stat { state: *state, start_time })
}

// Processes, epoll and timerfds: Miri emulates none of them, so these run in `cargo test` only.
#[cfg(all(test, not(miri)))]
mod tests {
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    use super::*;

    fn pid_of(child: &Child) -> Pid {
        Pid::from_raw(child.id() as i32).unwrap()
    }

    /// Waits (bounded) until `child` has exited without reaping it: a zombie.
    fn until_zombie(child: &Child) {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = read_stat(pid_of(child)).unwrap().unwrap();
            if stat.state == b'Z' {
                return;
            }
            assert!(Instant::now() < end, "child {} did not exit", child.id());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn parses_the_fields_after_the_last_parenthesis() {
        let line = b"4242 (a b) c) (d) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 \
                     18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_stat(line), Some(Stat { state: b'S', start_time: 987654 }));
        let zombie = b"7 (x) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0\n";
        assert_eq!(parse_stat(zombie), Some(Stat { state: b'Z', start_time: 55 }));
        assert_eq!(parse_stat(b"7 (no closing paren S 1 2"), None);
        assert_eq!(parse_stat(b"7 (short) S 1 2 3\n"), None);
    }

    #[test]
    fn this_process_is_alive() {
        let me = ProcIdentity::of(rustix::process::getpid()).unwrap();
        assert!(me.is_alive());
    }

    #[test]
    fn a_process_with_another_start_time_is_not_the_one_watched() {
        let me = ProcIdentity::of(rustix::process::getpid()).unwrap();
        let other = ProcIdentity { start_time: me.start_time + 1, ..me };
        assert!(!other.is_alive());
        // Nor is it signalled: SIGKILL would end this test process.
        other.signal(Signal::KILL).unwrap();
    }

    #[test]
    fn a_zombie_is_not_alive_and_a_reaped_child_neither() {
        let mut child = Command::new("sleep").arg("0").spawn().unwrap();
        let id = ProcIdentity::of(pid_of(&child)).unwrap();
        until_zombie(&child);
        assert!(!id.is_alive(), "a zombie has exited");
        id.signal(Signal::KILL).unwrap();
        child.wait().unwrap();
        assert!(!id.is_alive(), "a reaped child is gone");
        id.signal(Signal::KILL).unwrap();
        assert!(ProcIdentity::of(id.pid()).is_err(), "a reaped child cannot be watched");
    }

    #[test]
    fn a_running_child_is_alive_until_killed() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let id = ProcIdentity::of(pid_of(&child)).unwrap();
        assert!(id.is_alive());
        id.signal(Signal::KILL).unwrap();
        until_zombie(&child);
        assert!(!id.is_alive());
        child.wait().unwrap();
    }

    #[test]
    fn forced_polling_watches_by_identity() {
        let me = rustix::process::getpid();
        assert!(matches!(ProcessWatch::open(me, ExitWatch::Poll).unwrap(), ProcessWatch::Polled(_)));
    }
}
