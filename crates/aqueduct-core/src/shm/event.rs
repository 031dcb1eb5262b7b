//! A wake-up word in shared memory: waiters park on a futex, notifiers pay for a syscall only
//! when somebody is parked.
//!
//! Layout: two `AtomicU32` side by side, `waiters` (how many processes are parked or about to
//! park) and `seq` (bumped by every notification that found a waiter; the futex word).
//!
//! Protocol, with the condition being for example "the ring is not empty":
//! - waiter: `let t = ev.prepare()`; re-check the condition; if it holds, `ev.cancel()`,
//!   otherwise `ev.park(t, timeout)`.
//! - notifier: make the condition true with a release store, then `ev.notify()`.
//!
//! `prepare` and `notify` both issue a SeqCst fence between their store and their load, so
//! either the waiter sees the condition or the notifier sees the waiter (Dekker). A notification
//! that lands between `prepare` and `park` changes `seq`, and `FUTEX_WAIT` then returns at once.
//! The futex is process-shared (no `FUTEX_PRIVATE_FLAG`) because the word lives in a memfd.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::Duration;

/// A view on the two words of an event inside a shared region.
#[derive(Clone, Copy)]
pub struct FutexEvent<'a> {
    waiters: &'a AtomicU32,
    seq: &'a AtomicU32,
}

/// Bytes an event occupies in a layout.
pub const EVENT_BYTES: usize = 8;

/// What `prepare` observed; pass it to `park`.
#[derive(Clone, Copy, Debug)]
pub struct ParkToken(u32);

impl<'a> FutexEvent<'a> {
    pub fn new(waiters: &'a AtomicU32, seq: &'a AtomicU32) -> Self {
        Self { waiters, seq }
    }

    /// Announces an intent to park. The caller must re-check its condition afterwards and then
    /// call exactly one of `cancel` or `park`.
    pub fn prepare(&self) -> ParkToken {
        let token = ParkToken(self.seq.load(Ordering::Acquire));
        self.waiters.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        token
    }

    pub fn cancel(&self) {
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Parks until notified, the timeout passes, or a signal arrives (spurious wake-ups are
    /// allowed: callers loop on their condition).
    pub fn park(&self, token: ParkToken, timeout: Option<Duration>) {
        futex_wait(self.seq, token.0, timeout);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes every parked waiter, if there is one. Call after publishing the condition.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake(self.seq);
        }
    }

    /// Whether a waiter is parked or about to park.
    pub fn has_waiters(&self) -> bool {
        fence(Ordering::SeqCst);
        self.waiters.load(Ordering::SeqCst) > 0
    }
}

#[cfg(not(miri))]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    use rustix::thread::futex;
    let ts = timeout.map(|d| rustix::time::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos() as _,
    });
    // EAGAIN (the word changed), EINTR and ETIMEDOUT all mean "re-check the condition".
    let _ = futex::wait(word, futex::Flags::empty(), expected, ts.as_ref());
}

#[cfg(not(miri))]
fn futex_wake(word: &AtomicU32) {
    use rustix::thread::futex;
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}

// Miri runs the ring logic over heap memory in one process; a yield stands in for the futex.
#[cfg(miri)]
fn futex_wait(word: &AtomicU32, expected: u32, _timeout: Option<Duration>) {
    if word.load(Ordering::Acquire) == expected {
        std::thread::yield_now();
    }
}

#[cfg(miri)]
fn futex_wake(_word: &AtomicU32) {}

/// How long a consumer spins before it parks, and the loop that does it.
///
/// On the virtual machines this engine targets, waking a parked process costs 20-30 µs of
/// scheduler and hypervisor latency, while a message hop through a ring costs well under 1 µs.
/// Spinning briefly after going idle keeps back-to-back messages at ring speed; parking after
/// the budget keeps an idle flow at ~0% CPU. The budget is small and bounded, and the spin
/// yields the CPU between probes once it has lasted a few microseconds, so a busy sibling
/// process on the same core is not starved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpinPolicy {
    pub spin: Duration,
}

/// The environment variable that overrides the spin budget, in microseconds.
pub const SPIN_ENV: &str = "AQUEDUCT_SPIN_US";

impl Default for SpinPolicy {
    /// 50 µs, or `AQUEDUCT_SPIN_US` when it is set.
    fn default() -> Self {
        let us = std::env::var(SPIN_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(50);
        Self { spin: Duration::from_micros(us) }
    }
}

impl SpinPolicy {
    pub const NONE: SpinPolicy = SpinPolicy { spin: Duration::ZERO };

    /// The policy for a flow of `processes` busy processes (workers and the main one): spin
    /// only when each can have a CPU of its own. When they outnumber the CPUs, a spinning
    /// process takes the CPU that the process it waits for needs, and parking is cheaper.
    /// `AQUEDUCT_SPIN_US` overrides the choice.
    pub fn for_processes(processes: usize) -> Self {
        if std::env::var_os(SPIN_ENV).is_some() {
            return Self::default();
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if processes <= cpus {
            Self::default()
        } else {
            Self::NONE
        }
    }

    /// Polls `ready` until it returns `Some`, spinning for the budget and then parking on `ev`.
    /// Returns `None` if `deadline` passes first. Stateless; see [`Spinner`] for the adaptive
    /// version the rings use.
    pub fn wait_until<T>(
        &self,
        ev: FutexEvent<'_>,
        deadline: Option<std::time::Instant>,
        ready: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        Spinner::default().wait(*self, ev, deadline, ready)
    }
}

/// Spinning that backs off when it hurts.
///
/// Spinning pays only when the process being waited for runs on another CPU. When the scheduler
/// has put both on the same CPU (a futex wake-up tends to place the woken process next to its
/// waker), the waiter's spin keeps the other process from running, and the wait ends just after
/// the spin budget runs out and the waiter parks. A `Spinner` notices waits that end within a
/// few budgets of parking, which is that signature, and then parks at once for the next
/// `COOLDOWN` waits before it tries spinning again. A long wait (an idle flow) is not counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spinner {
    failures: u8,
    cooldown: u16,
}

impl Spinner {
    const FAILURES_BEFORE_COOLDOWN: u8 = 2;
    const COOLDOWN: u16 = 256;

    /// Polls `ready` until it returns `Some`, spinning for the policy's budget (unless cooling
    /// down) and then parking on `ev`. Returns `None` if `deadline` passes first.
    pub fn wait<T>(
        &mut self,
        policy: SpinPolicy,
        ev: FutexEvent<'_>,
        deadline: Option<std::time::Instant>,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        if let Some(v) = ready() {
            return Some(v);
        }
        let budget = if self.cooldown > 0 {
            self.cooldown -= 1;
            Duration::ZERO
        } else {
            policy.spin
        };
        let start = std::time::Instant::now();
        let mut probes: u32 = 0;
        while start.elapsed() < budget {
            for _ in 0..32 {
                std::hint::spin_loop();
            }
            probes += 1;
            if probes > 64 {
                std::thread::yield_now();
            }
            if let Some(v) = ready() {
                self.failures = 0;
                return Some(v);
            }
        }
        let got = loop {
            let token = ev.prepare();
            if let Some(v) = ready() {
                ev.cancel();
                break Some(v);
            }
            let timeout = match deadline {
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        ev.cancel();
                        break None;
                    }
                    Some(d - now)
                }
                None => None,
            };
            ev.park(token, timeout);
            if let Some(v) = ready() {
                break Some(v);
            }
        };
        if got.is_some() && !budget.is_zero() && start.elapsed() < budget * 3 {
            self.failures += 1;
            if self.failures >= Self::FAILURES_BEFORE_COOLDOWN {
                self.failures = 0;
                self.cooldown = Self::COOLDOWN;
            }
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn notify_wakes_a_parked_thread() {
        let words = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let flag = Arc::new(AtomicBool::new(false));
        let (w2, f2) = (words.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            let ev = FutexEvent::new(&w2[0], &w2[1]);
            SpinPolicy::NONE.wait_until(ev, None, || f2.load(Ordering::Acquire).then_some(()))
        });
        flag.store(true, Ordering::Release);
        FutexEvent::new(&words[0], &words[1]).notify();
        assert_eq!(t.join().unwrap(), Some(()));
    }

    #[test]
    fn wait_until_times_out() {
        let words = [AtomicU32::new(0), AtomicU32::new(0)];
        let ev = FutexEvent::new(&words[0], &words[1]);
        let deadline = std::time::Instant::now() + Duration::from_millis(5);
        let r: Option<()> = SpinPolicy::NONE.wait_until(ev, Some(deadline), || None);
        assert!(r.is_none());
        assert_eq!(words[0].load(Ordering::SeqCst), 0, "waiter count restored");
    }
}
