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
//! Both files describe the whole machine: in a container limited by a CPU quota, throttling by
//! that quota is not seen (the spinner's own preemption check still is).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use crate::clock::Nanos;

/// How often the pressure is read again.
pub const REFRESH: Duration = Duration::from_millis(10);
/// CPUs count as contended when some task waited for one this share of the time or more.
pub const CONTENDED_SHARE: f64 = 0.10;
/// A reader that has held the reading this long is taken over: it was forked away mid-read
/// (the child inherits the claim, not the reader) or died.
const STALE_CLAIM: Duration = Duration::from_secs(1);

const PRESSURE: &str = "/proc/pressure/cpu";
const LOADAVG: &str = "/proc/loadavg";

// All state is in atomics, not behind a lock or a `OnceLock`: a process forked while another
// of its threads was reading must not inherit a lock held forever (a flow's zygote forks from
// the main process, which may have threads).
const SOURCE_UNKNOWN: u8 = 0;
const SOURCE_PRESSURE: u8 = 1;
const SOURCE_LOADAVG: u8 = 2;
const SOURCE_NOTHING: u8 = 3;
static SOURCE: AtomicU8 = AtomicU8::new(SOURCE_UNKNOWN);
/// When the next reading is due (`CLOCK_MONOTONIC` ns).
static NEXT_READ_NS: AtomicU64 = AtomicU64::new(0);
/// 0, or when the thread now reading claimed it.
static CLAIMED_AT_NS: AtomicU64 = AtomicU64::new(0);
/// The previous pressure reading: when, and the cumulative stall (µs) then.
static LAST_AT_NS: AtomicU64 = AtomicU64::new(0);
static LAST_STALL_US: AtomicU64 = AtomicU64::new(0);
static CONTENDED: AtomicBool = AtomicBool::new(false);

/// Whether some task has been waiting for a CPU lately (see the module documentation).
pub fn cpus_contended() -> bool {
    let now = Nanos::now().0;
    if now < NEXT_READ_NS.load(Ordering::Relaxed) {
        return CONTENDED.load(Ordering::Relaxed);
    }
    let claimed = CLAIMED_AT_NS.load(Ordering::Acquire);
    if claimed != 0 && now.saturating_sub(claimed) < STALE_CLAIM.as_nanos() as u64 {
        return CONTENDED.load(Ordering::Relaxed);
    }
    if CLAIMED_AT_NS.compare_exchange(claimed, now, Ordering::AcqRel, Ordering::Relaxed).is_err() {
        return CONTENDED.load(Ordering::Relaxed);
    }
    NEXT_READ_NS.store(now + REFRESH.as_nanos() as u64, Ordering::Relaxed);
    let contended = read(now);
    CONTENDED.store(contended, Ordering::Relaxed);
    CLAIMED_AT_NS.store(0, Ordering::Release);
    contended
}

/// One reading, by the one thread that claimed it.
fn read(now: u64) -> bool {
    let mut source = SOURCE.load(Ordering::Relaxed);
    if source == SOURCE_UNKNOWN {
        source = if let Some(stall) = read_stall_us() {
            LAST_AT_NS.store(now, Ordering::Relaxed);
            LAST_STALL_US.store(stall, Ordering::Relaxed);
            SOURCE_PRESSURE
        } else if read_runnable().is_some() {
            SOURCE_LOADAVG
        } else {
            SOURCE_NOTHING
        };
        SOURCE.store(source, Ordering::Relaxed);
        if source == SOURCE_PRESSURE {
            return false; // a share needs two readings
        }
    }
    match source {
        SOURCE_PRESSURE => match read_stall_us() {
            Some(stall) => {
                let then = LAST_AT_NS.swap(now, Ordering::Relaxed);
                let stall_then = LAST_STALL_US.swap(stall, Ordering::Relaxed);
                let elapsed_us = (now.saturating_sub(then) / 1000).max(1) as f64;
                stall.saturating_sub(stall_then) as f64 / elapsed_us >= CONTENDED_SHARE
            }
            None => false,
        },
        // The system-wide count against the machine's CPUs (not this process's affinity: the
        // count is the whole machine's too).
        SOURCE_LOADAVG => read_runnable().is_some_and(|n| n > online_cpus()),
        _ => false,
    }
}

/// CPUs online on the machine (`cpuN` lines of `/proc/stat`), at least 1.
fn online_cpus() -> usize {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let n =
        stat.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count();
    n.max(1)
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

    // One test: the state is process-wide, and other tests of this binary may read it too.
    #[test]
    #[cfg_attr(miri, ignore = "reads /proc: runs in `cargo test`")]
    fn linux_says_one_way_or_the_other_and_a_stale_claim_is_taken_over() {
        let _ = cpus_contended();
        let source = SOURCE.load(Ordering::Relaxed);
        assert!(
            source == SOURCE_PRESSURE || source == SOURCE_LOADAVG,
            "/proc/pressure/cpu or /proc/loadavg is readable"
        );
        assert!(NEXT_READ_NS.load(Ordering::Relaxed) > 0, "a reading was taken and the next one scheduled");
        assert!(online_cpus() >= 1);
        // As a child forked while its parent's thread was reading finds it: claimed long ago.
        let stale = Nanos::now().0.saturating_sub(2 * STALE_CLAIM.as_nanos() as u64).max(1);
        CLAIMED_AT_NS.store(stale, Ordering::Release);
        NEXT_READ_NS.store(0, Ordering::Relaxed);
        let _ = cpus_contended();
        assert_ne!(CLAIMED_AT_NS.load(Ordering::Acquire), stale, "the stale claim was taken over");
    }
}
