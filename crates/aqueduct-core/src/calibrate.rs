#![forbid(unsafe_code)]
//! What waiting costs on this host: waking a parked peer, and a hop between two spinning ones.
//!
//! The engine's waiting strategy (spin, then park; see [`crate::shm::event::SpinPolicy`]) pays
//! off only when a wake-up costs far more than a spin. That ratio is a property of the host, not
//! of its CPU count: on one 2-vCPU VM a futex wake-up of an idle vCPU costs 20 µs, on another
//! of the same size 60 µs and more, because the hypervisor has to run the halted vCPU again,
//! while a busy host (the vCPU is running something else) wakes in a few microseconds. This
//! module measures both costs with two threads playing ping-pong over the same [`FutexEvent`]
//! protocol the rings use: once with a peer that parks at once while the caller keeps its CPU
//! busy (a round trip is one wake-up of a parked peer on another CPU, as a worker is woken by a
//! main process that goes on with its own work), once with both spinning (each half round trip
//! is one cache-line hop). A caller that parked as well would measure something cheaper that a
//! flow never pays: the scheduler would run the woken peer on the caller's own CPU.
//!
//! `python -m aqueduct calibrate` prints it; the benchmark suite records it beside its numbers.
//! A flow does not run it: each process measures the wake-ups it actually pays as it goes
//! ([`crate::shm::event::record_wake_up`]), which follows the host's load as it changes.
//! Threads and processes wake through the same kernel path (a futex wake of a task on another
//! CPU), so two threads measure what two processes of a flow pay, without forking.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::shm::event::{EventWords, SpinPolicy};

/// The costs [`measure`] found, as percentiles over its rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostCosts {
    /// CPUs this process may run on.
    pub cpus: usize,
    /// One wake-up: a notify to the moment the parked peer runs on its own CPU.
    pub wake_p50: Duration,
    pub wake_p99: Duration,
    /// One hop between two spinning peers (half a spinning round trip).
    pub spin_hop_p50: Duration,
    pub spin_hop_p99: Duration,
}

impl HostCosts {
    /// How many spinning hops one wake-up is worth: the ratio the waiting strategy rests on.
    pub fn wake_to_hop(&self) -> f64 {
        self.wake_p50.as_secs_f64() / self.spin_hop_p50.as_secs_f64().max(1e-9)
    }
}

/// Plays `rounds` parked and `rounds * 10` spinning round trips between two threads (a few
/// milliseconds on a host where a wake-up costs 20-60 µs) and returns the percentiles.
pub fn measure(rounds: usize) -> HostCosts {
    let rounds = rounds.max(10);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Long enough that a spinning side never parks: the other answers within nanoseconds. On
    // one CPU a spinner only keeps its peer from running, so there both sides park.
    let spin = if cpus > 1 { SpinPolicy { spin: Duration::from_millis(50) } } else { SpinPolicy::NONE };
    let spinning = ping_pong(rounds * 10, spin, spin, Duration::ZERO);
    let hop = percentile(&spinning, 50) / 2;
    // The gap lets the parked peer's CPU go idle (halt, on a VM) before it is woken.
    let parked = ping_pong(rounds, spin, SpinPolicy::NONE, Duration::from_micros(100));
    HostCosts {
        cpus,
        wake_p50: percentile(&parked, 50).saturating_sub(hop),
        wake_p99: percentile(&parked, 99).saturating_sub(hop),
        spin_hop_p50: hop,
        spin_hop_p99: percentile(&spinning, 99) / 2,
    }
}

/// Round-trip times of `rounds` exchanges: the caller's thread writes an odd turn and waits for
/// the even one its peer writes back (waiting with `caller`, the peer with `peer`), `gap` apart.
fn ping_pong(rounds: usize, caller: SpinPolicy, peer: SpinPolicy, gap: Duration) -> Vec<Duration> {
    let turn = AtomicU64::new(0);
    let (to_peer, to_caller) = (EventWords::default(), EventWords::default());
    let quit = AtomicBool::new(false);
    let mut samples = Vec::with_capacity(rounds);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut seen = 0u64;
            loop {
                let next = peer.wait_until(to_peer.event(), None, || {
                    let t = turn.load(Ordering::Acquire);
                    (t > seen || quit.load(Ordering::Acquire)).then_some(t)
                });
                let Some(t) = next else { continue };
                if quit.load(Ordering::Acquire) {
                    return;
                }
                seen = t + 1;
                turn.store(seen, Ordering::Release);
                to_caller.event().notify();
            }
        });
        for i in 0..rounds as u64 {
            let idle = Instant::now();
            while idle.elapsed() < gap {
                std::hint::spin_loop();
            }
            let start = Instant::now();
            turn.store(2 * i + 1, Ordering::Release);
            to_peer.event().notify();
            let want = 2 * i + 2;
            caller.wait_until(to_caller.event(), None, || (turn.load(Ordering::Acquire) >= want).then_some(()));
            samples.push(start.elapsed());
        }
        quit.store(true, Ordering::Release);
        to_peer.event().notify();
    });
    samples
}

fn percentile(samples: &[Duration], p: usize) -> Duration {
    let mut v = samples.to_vec();
    v.sort_unstable();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "times thousands of spinning rounds: runs in `cargo test`, not under the interpreter")]
    fn both_costs_are_measured_and_ordered_by_percentile() {
        let costs = measure(50);
        assert!(costs.cpus >= 1);
        assert!(costs.wake_p50 > Duration::ZERO && costs.spin_hop_p50 > Duration::ZERO);
        assert!(costs.wake_p50 <= costs.wake_p99 && costs.spin_hop_p50 <= costs.spin_hop_p99);
    }
}
