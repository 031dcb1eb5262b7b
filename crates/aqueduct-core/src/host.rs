#![forbid(unsafe_code)]
//! Whether this host's CPUs are contended right now: some runnable task waits for a CPU.
//!
//! Spinning is worth it only on a CPU nobody else wants. A spinner that is itself preempted
//! notices (see [`crate::shm::event::Spinner`]), but one that holds its CPU while a worker or
//! another program waits for one never does: the harm falls on somebody else. So the adaptive
//! spin budget is zero while the kernel reports CPU pressure: the share of recent time during
//! which at least one task was runnable but not running (`/proc/pressure/cpu`, "some"). Where
//! pressure information is missing (kernels before 4.20, or built without it), the fallback is
//! the instantaneous count of runnable tasks in `/proc/loadavg` against the CPU count.
//!
//! A reading opens and reads a small `/proc` file (a few µs), at most every [`REFRESH`];
//! between readings the last answer is returned from an atomic. Nothing stays open: a
//! descriptor kept for the process's life would be one more thing every fork inherits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the pressure is read again.
pub const REFRESH: Duration = Duration::from_millis(10);
/// CPUs count as contended when some task waited for one this share of the time or more.
pub const CONTENDED_SHARE: f64 = 0.10;

struct Probe {
    source: Source,
    /// The last reading: when, and the cumulative stall time then (µs, pressure source only).
    last: Mutex<(Instant, u64)>,
    next_read_ns: AtomicU64,
    contended: AtomicBool,
    epoch: Instant,
}

const PRESSURE: &str = "/proc/pressure/cpu";
const LOADAVG: &str = "/proc/loadavg";

enum Source {
    Pressure,
    LoadAvg(usize),
    Nothing,
}

fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let stall = read_stall_us();
        let source = match stall {
            Some(_) => Source::Pressure,
            None if read_runnable().is_some() => Source::LoadAvg(cpus),
            None => Source::Nothing,
        };
        let now = Instant::now();
        let stall = stall.unwrap_or(0);
        Probe {
            source,
            last: Mutex::new((now, stall)),
            next_read_ns: AtomicU64::new(0),
            contended: AtomicBool::new(false),
            epoch: now,
        }
    })
}

/// Whether some task has been waiting for a CPU lately (see the module documentation).
pub fn cpus_contended() -> bool {
    let p = probe();
    let now = Instant::now();
    let since_epoch = (now - p.epoch).as_nanos() as u64;
    if since_epoch < p.next_read_ns.load(Ordering::Relaxed) {
        return p.contended.load(Ordering::Relaxed);
    }
    // One reader at a time; the others keep the last answer.
    let Ok(mut last) = p.last.try_lock() else {
        return p.contended.load(Ordering::Relaxed);
    };
    p.next_read_ns.store(since_epoch + REFRESH.as_nanos() as u64, Ordering::Relaxed);
    let contended = match &p.source {
        Source::Pressure => match read_stall_us() {
            Some(stall) => {
                let (then, stall_then) = *last;
                let elapsed_us = (now - then).as_micros().max(1) as f64;
                *last = (now, stall);
                stall.saturating_sub(stall_then) as f64 / elapsed_us >= CONTENDED_SHARE
            }
            None => false,
        },
        Source::LoadAvg(cpus) => read_runnable().is_some_and(|n| n > *cpus),
        Source::Nothing => false,
    };
    p.contended.store(contended, Ordering::Relaxed);
    contended
}

/// The "some" line's cumulative `total=` (µs) of `/proc/pressure/cpu`.
fn read_stall_us() -> Option<u64> {
    parse_stall_us(&std::fs::read_to_string(PRESSURE).ok()?)
}

fn parse_stall_us(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace().find_map(|w| w.strip_prefix("total="))?.parse().ok()
}

/// The runnable count of `/proc/loadavg` (the fourth field, `running/total`).
fn read_runnable() -> Option<usize> {
    parse_runnable(&std::fs::read_to_string(LOADAVG).ok()?)
}

fn parse_runnable(text: &str) -> Option<usize> {
    text.split_whitespace().nth(3)?.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_formats() {
        let psi =
            "some avg10=4.41 avg60=4.48 avg300=4.84 total=1431905361\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_stall_us(psi), Some(1_431_905_361));
        assert_eq!(parse_stall_us("full avg10=0 total=5\n"), None);
        assert_eq!(parse_stall_us("some avg10=1 total=x\n"), None);
        assert_eq!(parse_runnable("1.00 1.45 1.49 3/80 15238\n"), Some(3));
        assert_eq!(parse_runnable("1.00 1.45\n"), None);
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads /proc: runs in `cargo test`")]
    fn linux_says_one_way_or_the_other() {
        assert!(!matches!(probe().source, Source::Nothing), "/proc/pressure/cpu or /proc/loadavg is readable");
        let _ = cpus_contended();
        assert!(probe().next_read_ns.load(Ordering::Relaxed) > 0, "a reading was taken and the next one scheduled");
    }
}
