#![forbid(unsafe_code)]
//! Time as the whole flow agrees on it: `CLOCK_MONOTONIC` nanoseconds.
//!
//! Deadlines cross process boundaries inside message headers, so they must be on a clock every
//! process reads the same way. `CLOCK_MONOTONIC` is system-wide on Linux, and Python's
//! `time.monotonic()` reads the same clock, so a deadline set in Python compares directly.

use std::time::Duration;

/// Nanoseconds on `CLOCK_MONOTONIC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(pub u64);

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);
    pub const MAX: Nanos = Nanos(u64::MAX);

    pub fn now() -> Nanos {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        Nanos(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    pub fn from_secs_f64(s: f64) -> Nanos {
        Nanos((s.max(0.0) * 1e9) as u64)
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    pub fn saturating_add(self, d: Duration) -> Nanos {
        Nanos(self.0.saturating_add(d.as_nanos().min(u64::MAX as u128) as u64))
    }

    pub fn saturating_sub(self, other: Nanos) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(other.0))
    }
}
