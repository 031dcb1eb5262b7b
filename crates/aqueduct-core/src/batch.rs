#![forbid(unsafe_code)]
//! When a step sends a batch: the batching rule of the contract, as one pure function.
//!
//! - `batch_size` is an upper bound.
//! - `batch_timeout = 0`: take what is queued now, without waiting.
//! - `batch_timeout > 0`: wait until the batch is full or the timeout has passed, counted from
//!   the arrival of the oldest queued task at this step.
//!
//! Counting from the oldest task's arrival (rather than from when a worker started collecting)
//! bounds the latency batching adds to any task by `batch_timeout`, even when every worker was
//! busy while the batch filled.

use std::time::Duration;

use crate::clock::Nanos;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing queued.
    Idle,
    /// Send a batch of this many tasks now.
    Send(usize),
    /// A partial batch is waiting for more tasks; decide again at this time.
    WaitUntil(Nanos),
}

pub fn decide(
    queued: usize,
    oldest_arrival: Option<Nanos>,
    batch_size: usize,
    timeout: Duration,
    now: Nanos,
) -> Decision {
    let Some(oldest) = oldest_arrival.filter(|_| queued > 0) else {
        return Decision::Idle;
    };
    if queued >= batch_size || timeout.is_zero() {
        return Decision::Send(queued.min(batch_size));
    }
    let due = oldest.saturating_add(timeout);
    if now >= due {
        Decision::Send(queued)
    } else {
        Decision::WaitUntil(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn batching_rule(queued in 0usize..100, bs in 1usize..40, timeout_us in 0u64..1000,
                         arrival in 0u64..10_000, waited in 0u64..3000) {
            let timeout = Duration::from_micros(timeout_us);
            let arrival = Nanos(arrival * 1000);
            let now = Nanos(arrival.0 + waited * 1000);
            match decide(queued, Some(arrival), bs, timeout, now) {
                Decision::Idle => prop_assert_eq!(queued, 0),
                Decision::Send(n) => {
                    prop_assert!(n >= 1 && n <= bs, "batch size bound");
                    prop_assert!(n <= queued);
                    // A partial batch only leaves without waiting when the timeout is 0 or spent.
                    if n < bs { prop_assert!(timeout.is_zero() || now >= arrival.saturating_add(timeout)); }
                    if timeout.is_zero() { prop_assert_eq!(n, queued.min(bs)); }
                }
                Decision::WaitUntil(t) => {
                    prop_assert!(queued > 0 && queued < bs && !timeout.is_zero());
                    prop_assert_eq!(t, arrival.saturating_add(timeout));
                    prop_assert!(t > now);
                }
            }
        }
    }
}
