//! A wake-up word in shared memory: waiters park on a futex, notifiers pay for a syscall only
//! when somebody is parked.
//!
//! Layout: two `AtomicU32` side by side, `waiters` (how many processes are parked or about to
//! park) and `seq` (bumped by every notification that found a waiter; the futex word), then an
//! `AtomicU64` stamp: when the last such notification was sent (`CLOCK_MONOTONIC` ns). A waiter
//! that was woken reads the stamp and learns what its wake-up cost ([`record_wake_up`]).
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

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Nanos;

/// A view on the two words of an event inside a shared region.
#[derive(Clone, Copy)]
pub struct FutexEvent<'a> {
    waiters: &'a AtomicU32,
    seq: &'a AtomicU32,
    stamp: &'a AtomicU64,
}

/// Bytes an event occupies in a layout.
pub const EVENT_BYTES: usize = 16;

/// What `prepare` observed; pass it to `park`.
#[derive(Clone, Copy, Debug)]
pub struct ParkToken(u32);

impl<'a> FutexEvent<'a> {
    pub fn new(waiters: &'a AtomicU32, seq: &'a AtomicU32, stamp: &'a AtomicU64) -> Self {
        Self { waiters, seq, stamp }
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
    /// allowed: callers loop on their condition). Returns whether it slept and was woken (not
    /// when the word had already changed, nor on a timeout or a signal).
    pub fn park(&self, token: ParkToken, timeout: Option<Duration>) -> bool {
        let woken = futex_wait(self.seq, token.0, timeout);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        woken
    }

    /// Wakes every parked waiter, if there is one. Call after publishing the condition.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.stamp.store(Nanos::now().0, Ordering::Relaxed);
            self.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake(self.seq);
        }
    }

    /// When the last notification that found a waiter was sent.
    pub fn notified_at(&self) -> Nanos {
        Nanos(self.stamp.load(Ordering::Relaxed))
    }

    /// Whether a waiter is parked or about to park.
    pub fn has_waiters(&self) -> bool {
        fence(Ordering::SeqCst);
        self.waiters.load(Ordering::SeqCst) > 0
    }
}

/// An event's words in ordinary memory, for waiters that are threads of one process (tests, the
/// host calibration); flows keep theirs in ring headers.
#[derive(Debug, Default)]
pub struct EventWords {
    pub waiters: AtomicU32,
    pub seq: AtomicU32,
    pub stamp: AtomicU64,
}

impl EventWords {
    pub fn event(&self) -> FutexEvent<'_> {
        FutexEvent::new(&self.waiters, &self.seq, &self.stamp)
    }
}

#[cfg(not(miri))]
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> bool {
    use rustix::thread::futex;
    let ts = timeout.map(|d| rustix::time::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos() as _,
    });
    // EAGAIN (the word changed), EINTR and ETIMEDOUT all mean "re-check the condition".
    futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()).is_ok()
}

#[cfg(not(miri))]
fn futex_wake(word: &AtomicU32) {
    use rustix::thread::futex;
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}

// Miri runs the ring logic over heap memory in one process; a yield stands in for the futex.
#[cfg(miri)]
fn futex_wait(word: &AtomicU32, expected: u32, _timeout: Option<Duration>) -> bool {
    if word.load(Ordering::Acquire) == expected {
        std::thread::yield_now();
    }
    false
}

#[cfg(miri)]
fn futex_wake(_word: &AtomicU32) {}

/// How long a consumer spins before it parks, and the loop that does it.
///
/// Waking a parked process costs 2-60 µs depending on the host (on a VM whose idle vCPUs halt,
/// the hypervisor must run the vCPU again; on a busy host the woken process just preempts
/// whatever runs), while a message hop through a ring costs well under 1 µs. Spinning briefly
/// after going idle keeps back-to-back messages at ring speed; parking after the budget keeps
/// an idle flow at ~0% CPU. A flow's policy is normally [`SpinPolicy::ADAPTIVE`]: the budget is
/// worth a few wake-ups as this process has measured them ([`wake_up_cost`]), and a [`Spinner`]
/// stops spinning as soon as the scheduler shows that its CPU is wanted by someone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpinPolicy {
    /// The budget; `Duration::MAX` stands for [`SpinPolicy::ADAPTIVE`].
    pub spin: Duration,
}

/// The environment variable that overrides the spin budget, in microseconds.
pub const SPIN_ENV: &str = "AQUEDUCT_SPIN_US";

/// How many wake-ups a spin budget is worth. The peer's turnaround between two messages (its
/// Python work, a few tens of µs) has to fit in the budget for spinning to pay; 8 is a judgement
/// that lands where fixed budgets covered it on the hosts measured (ARCHITECTURE.md, "Waiting").
pub const WAKE_UPS_PER_BUDGET: u32 = 8;
/// The budget never exceeds this, whatever a wake-up costs: beyond it an idle gap, not a
/// turnaround, is what is being waited for.
pub const MAX_SPIN: Duration = Duration::from_micros(250);
/// Below this a wake-up is too cheap to be worth spinning for (a busy host, where the woken
/// process preempts whatever runs on its CPU).
pub const MIN_WORTHWHILE_WAKE: Duration = Duration::from_micros(4);
/// A measured wake-up longer than this counts as this long: beyond it the woken process waited
/// for a CPU, which says the host is busy, not what waking costs.
pub const MAX_WAKE_SAMPLE: Duration = Duration::from_micros(500);

impl Default for SpinPolicy {
    /// 50 µs, or `AQUEDUCT_SPIN_US` when it is set.
    fn default() -> Self {
        Self::from_env().unwrap_or(Self { spin: Duration::from_micros(50) })
    }
}

impl SpinPolicy {
    pub const NONE: SpinPolicy = SpinPolicy { spin: Duration::ZERO };
    /// Spin for [`SpinPolicy::for_wake_cost`] of this process's measured wake-up cost; not at
    /// all until one wake-up has been measured.
    pub const ADAPTIVE: SpinPolicy = SpinPolicy { spin: Duration::MAX };

    fn from_env() -> Option<Self> {
        let us: u64 = std::env::var(SPIN_ENV).ok()?.trim().parse().ok()?;
        Some(Self { spin: Duration::from_micros(us.min(1_000_000)) })
    }

    /// The budget worth spinning when one wake-up costs `wake`: [`WAKE_UPS_PER_BUDGET`] of them,
    /// at most [`MAX_SPIN`], nothing when a wake-up is cheaper than [`MIN_WORTHWHILE_WAKE`].
    pub fn for_wake_cost(wake: Duration) -> Self {
        if wake < MIN_WORTHWHILE_WAKE {
            return Self::NONE;
        }
        Self { spin: wake.saturating_mul(WAKE_UPS_PER_BUDGET).min(MAX_SPIN) }
    }

    /// The policy for a flow of `processes` busy processes (workers and the main one): spin
    /// only when each can have a CPU of its own (when they outnumber the CPUs, a spinning
    /// process takes the CPU that the process it waits for needs), and then adaptively.
    /// `AQUEDUCT_SPIN_US` overrides both.
    pub fn for_host(processes: usize) -> Self {
        if let Some(policy) = Self::from_env() {
            return policy;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if processes > cpus {
            Self::NONE
        } else {
            Self::ADAPTIVE
        }
    }

    /// The budget this policy gives when a wake-up costs `wake` and the CPUs are free: what
    /// `python -m aqueduct calibrate` reports a flow would choose.
    pub fn budget_for(&self, wake: Duration) -> Duration {
        if *self == Self::ADAPTIVE {
            Self::for_wake_cost(wake).spin
        } else {
            self.spin
        }
    }

    /// The budget to spin now: for an adaptive policy, nothing while the host's CPUs are
    /// contended ([`crate::host::cpus_contended`]) or before a wake-up has been measured.
    pub fn budget(&self) -> Duration {
        if *self != Self::ADAPTIVE {
            return self.spin;
        }
        match wake_up_cost() {
            Some(w) if !crate::host::cpus_contended() => self.budget_for(w),
            _ => Duration::ZERO,
        }
    }

    /// The policy as a flow header stores it: microseconds, `u32::MAX` for adaptive.
    pub fn to_word(self) -> u32 {
        if self == Self::ADAPTIVE {
            u32::MAX
        } else {
            self.spin.as_micros().min(u32::MAX as u128 - 1) as u32
        }
    }

    pub fn from_word(word: u32) -> Self {
        if word == u32::MAX {
            Self::ADAPTIVE
        } else {
            Self { spin: Duration::from_micros(word as u64) }
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

/// This process's estimate of one wake-up's cost (ns; 0 until one was measured): a moving
/// average over the wake-ups its waits actually paid, so it follows the host as its load
/// changes (on a VM an idle host wakes slowest, a busy one fast).
static WAKE_UP_NS: AtomicU64 = AtomicU64::new(0);

/// Records one measured wake-up: a notification's stamp to the moment the woken process ran.
pub fn record_wake_up(cost: Duration) {
    let sample = cost.min(MAX_WAKE_SAMPLE).as_nanos().max(1) as u64;
    let old = WAKE_UP_NS.load(Ordering::Relaxed);
    // Racing updates from several threads may lose a sample; the average is all that matters.
    let new = if old == 0 { sample } else { old - old / 8 + sample / 8 };
    WAKE_UP_NS.store(new.max(1), Ordering::Relaxed);
}

/// What a wake-up costs this process, as far as it has measured ([`record_wake_up`]).
pub fn wake_up_cost() -> Option<Duration> {
    match WAKE_UP_NS.load(Ordering::Relaxed) {
        0 => None,
        ns => Some(Duration::from_nanos(ns)),
    }
}

/// Spinning that backs off when it hurts.
///
/// Spinning pays only when the process being waited for runs on another CPU and nobody else
/// wants the spinner's. The sign that this is not so is that the scheduler took the CPU away
/// mid-spin: two probes of the clock far apart, and the kernel counting an involuntary context
/// switch of this thread since the spin began. Whoever ran meanwhile (the process being waited
/// for, placed on this CPU, or a CPU hog beside the flow) would lose the CPU again to more
/// spinning, so the `Spinner` parks at once, and does not spin for a while (see `Backoff`). A
/// gap alone is not enough: on a VM the hypervisor deschedules whole vCPUs, which nobody in the
/// guest asked for, and that is no reason to stop.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spinner {
    backoff: Backoff,
    /// The last wait ran out (an idle consumer waiting in slices, as a worker does to check
    /// for signals): the next one parks at once instead of spinning again every slice.
    idle: bool,
}

/// How long spinning stays off after the scheduler showed the CPU is wanted: `BASE` waits (or
/// windows) the first time, twice as many each time it happens again before a spin has paid,
/// up to `MAX`. Under a CPU hog that stays, a retry (which costs the hog a slice) becomes rare.
#[derive(Clone, Copy, Debug, Default)]
struct Backoff {
    cooldown: u32,
    next: u32,
}

impl Backoff {
    const BASE: u32 = 64;
    const MAX: u32 = 16 * 1024;

    /// Whether spinning is off for this wait (counting it).
    fn cooling(&mut self) -> bool {
        if self.cooldown > 0 {
            self.cooldown -= 1;
            true
        } else {
            false
        }
    }

    fn preempted(&mut self) {
        self.cooldown = self.next.max(Self::BASE);
        self.next = (self.cooldown * 2).min(Self::MAX);
    }

    /// A spin ended with what it waited for, undisturbed.
    fn paid(&mut self) {
        self.next = Self::BASE;
    }
}

/// Two clock probes of a spin this far apart mean the spinner was descheduled (a probe itself
/// takes well under a microsecond).
pub const PREEMPTED_GAP: Duration = Duration::from_micros(20);

impl Spinner {
    /// Polls `ready` until it returns `Some`, spinning for the policy's budget (unless cooling
    /// down) and then parking on `ev`. Returns `None` if `deadline` passes first. A wait that
    /// parked and was notified records what its wake-up cost ([`record_wake_up`]).
    pub fn wait<T>(
        &mut self,
        policy: SpinPolicy,
        ev: FutexEvent<'_>,
        deadline: Option<std::time::Instant>,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        if let Some(v) = ready() {
            self.idle = false;
            return Some(v);
        }
        let budget = if self.idle || self.backoff.cooling() { Duration::ZERO } else { policy.budget() };
        if !budget.is_zero() {
            if let Some(v) = self.spin(budget, &mut ready) {
                return Some(v);
            }
        }
        let parking_since = Nanos::now();
        let mut woken = false;
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
            woken |= ev.park(token, timeout);
            if let Some(v) = ready() {
                break Some(v);
            }
        };
        self.idle = got.is_none();
        if woken && got.is_some() {
            let sent = ev.notified_at();
            if sent >= parking_since {
                record_wake_up(Nanos::now().saturating_sub(sent));
            }
        }
        got
    }

    /// Spins for up to `budget`, unless the scheduler shows the CPU is wanted elsewhere.
    fn spin<T>(&mut self, budget: Duration, ready: &mut impl FnMut() -> Option<T>) -> Option<T> {
        let start = std::time::Instant::now();
        let mut watch = PreemptionWatch::begin(start);
        loop {
            for _ in 0..32 {
                std::hint::spin_loop();
            }
            if let Some(v) = ready() {
                self.backoff.paid();
                return Some(v);
            }
            let now = std::time::Instant::now();
            if watch.preempted(now) {
                self.backoff.preempted();
                return None;
            }
            if now - start >= budget {
                return None;
            }
        }
    }
}

/// Whether the scheduler has taken this thread's CPU for another during a spin, for the
/// [`Spinner`] and the [`SpinWindow`] alike: one system call at the start (~0.5 µs) and one
/// after each suspicious gap between two probes of the clock.
#[derive(Debug)]
struct PreemptionWatch {
    switches: u64,
    last_probe: std::time::Instant,
}

impl PreemptionWatch {
    fn begin(now: std::time::Instant) -> Self {
        Self { switches: involuntary_switches(), last_probe: now }
    }

    /// A probe at `now`: whether it came [`PREEMPTED_GAP`] or more after the previous one and
    /// the kernel counted an involuntary switch since the last look.
    fn preempted(&mut self, now: std::time::Instant) -> bool {
        let gap = now - std::mem::replace(&mut self.last_probe, now);
        if gap <= PREEMPTED_GAP {
            return false;
        }
        let switches = involuntary_switches();
        std::mem::replace(&mut self.switches, switches) < switches
    }
}

/// The owner's spin (the main process polling the engine from its event loop instead of
/// sleeping): the same budget and the same back-off as a [`Spinner`], for a loop that polls
/// between other work rather than in a tight loop. The window lasts while tasks are in flight
/// and results keep coming within the budget of each other; it closes early, and stays shut for
/// a while (see `Backoff`), when the scheduler took the CPU from this thread meanwhile (the
/// event loop sharing its CPU with a worker or a CPU hog: spinning on would take it again).
#[derive(Debug)]
pub struct SpinWindow {
    policy: SpinPolicy,
    budget: Duration,
    last_progress: std::time::Instant,
    /// Set while the window has a budget.
    watch: Option<PreemptionWatch>,
    backoff: Backoff,
}

impl SpinWindow {
    pub fn new(policy: SpinPolicy) -> Self {
        let now = std::time::Instant::now();
        Self { policy, budget: Duration::ZERO, last_progress: now, watch: None, backoff: Backoff::default() }
    }

    /// The owner starts polling (it was asleep, or idle): a new window.
    pub fn open(&mut self) {
        let now = std::time::Instant::now();
        self.last_progress = now;
        self.budget = if self.backoff.cooling() { Duration::ZERO } else { self.policy.budget() };
        self.watch = (!self.budget.is_zero()).then(|| PreemptionWatch::begin(now));
    }

    /// Results arrived: the window runs on from now.
    pub fn progressed(&mut self) {
        self.last_progress = std::time::Instant::now();
        if !self.budget.is_zero() {
            self.backoff.paid();
        }
    }

    /// Whether the owner should poll again rather than sleep, with `in_flight` tasks out.
    pub fn keep_polling(&mut self, in_flight: bool) -> bool {
        if !in_flight || self.budget.is_zero() {
            return false;
        }
        let now = std::time::Instant::now();
        if self.watch.as_mut().is_some_and(|w| w.preempted(now)) {
            self.budget = Duration::ZERO;
            self.backoff.preempted();
            return false;
        }
        now - self.last_progress < self.budget
    }

    /// The budget of the current window.
    pub fn budget(&self) -> Duration {
        self.budget
    }
}

/// This thread's involuntary context switches (`ru_nivcsw`), or 0 if the kernel will not say.
#[cfg(not(miri))]
fn involuntary_switches() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which points to
    // one we own; RUSAGE_THREAD is a valid `who` on Linux. On error nothing is read back.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) } == 0;
    if !ok {
        return 0;
    }
    // SAFETY: the call succeeded, so the struct is initialised (and it was zeroed before).
    let usage = unsafe { usage.assume_init() };
    usage.ru_nivcsw.max(0) as u64
}

#[cfg(miri)]
fn involuntary_switches() -> u64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn notify_wakes_a_parked_thread() {
        let words = Arc::new(EventWords::default());
        let flag = Arc::new(AtomicBool::new(false));
        let (w2, f2) = (words.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            let ev = w2.event();
            SpinPolicy::NONE.wait_until(ev, None, || f2.load(Ordering::Acquire).then_some(()))
        });
        flag.store(true, Ordering::Release);
        words.event().notify();
        assert_eq!(t.join().unwrap(), Some(()));
    }

    #[test]
    fn wait_until_times_out() {
        let words = EventWords::default();
        let ev = words.event();
        let deadline = std::time::Instant::now() + Duration::from_millis(5);
        let r: Option<()> = SpinPolicy::NONE.wait_until(ev, Some(deadline), || None);
        assert!(r.is_none());
        assert_eq!(words.waiters.load(Ordering::SeqCst), 0, "waiter count restored");
    }

    #[test]
    fn a_notification_that_finds_a_waiter_stamps_the_event_and_one_that_does_not_leaves_it() {
        let words = EventWords::default();
        words.event().notify();
        assert_eq!(words.event().notified_at(), Nanos::ZERO, "nobody waited: no system call, no stamp");
        // As a parked waiter leaves it (between `prepare` and its wake-up).
        words.waiters.store(1, Ordering::SeqCst);
        let before = Nanos::now();
        words.event().notify();
        assert!(words.event().notified_at() >= before, "the waker stamped when it woke the waiter");
        assert_eq!(words.seq.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_budget_is_worth_a_few_wake_ups_within_bounds() {
        assert_eq!(SpinPolicy::for_wake_cost(Duration::from_micros(2)), SpinPolicy::NONE, "too cheap to spin for");
        assert_eq!(SpinPolicy::for_wake_cost(Duration::from_micros(20)).spin, Duration::from_micros(160));
        assert_eq!(SpinPolicy::for_wake_cost(Duration::from_millis(3)).spin, MAX_SPIN);
        for policy in [SpinPolicy::NONE, SpinPolicy::ADAPTIVE, SpinPolicy { spin: Duration::from_micros(75) }] {
            assert_eq!(SpinPolicy::from_word(policy.to_word()), policy);
        }
        let fixed = SpinPolicy { spin: Duration::from_micros(75) };
        assert_eq!(fixed.budget(), Duration::from_micros(75), "a fixed budget ignores measurements");
        assert_eq!(fixed.budget_for(Duration::from_micros(20)), Duration::from_micros(75));
        assert_eq!(SpinPolicy::ADAPTIVE.budget_for(Duration::from_micros(20)), Duration::from_micros(160));
        assert_eq!(SpinPolicy::NONE.budget_for(Duration::from_micros(20)), Duration::ZERO);
    }

    #[test]
    fn the_average_follows_the_samples_and_caps_outliers() {
        // The estimate is process-wide; other tests may add samples, so only bounds are checked.
        for _ in 0..200 {
            record_wake_up(Duration::from_secs(5));
        }
        let cost = wake_up_cost().unwrap();
        assert!(cost <= MAX_WAKE_SAMPLE && cost > MAX_WAKE_SAMPLE / 2, "{cost:?}");
    }

    #[test]
    fn the_owners_window_polls_only_with_tasks_in_flight_and_a_budget() {
        let mut none = SpinWindow::new(SpinPolicy::NONE);
        none.open();
        assert!(!none.keep_polling(true), "no budget: sleep at once");
        let mut long = SpinWindow::new(SpinPolicy { spin: Duration::from_secs(60) });
        long.open();
        assert_eq!(long.budget(), Duration::from_secs(60));
        // (Whether it says "poll again" with tasks in flight also depends on the scheduler: a
        // preempted window closes, so that is not asserted here.)
        assert!(!long.keep_polling(false), "nothing in flight: nothing to poll for");
    }

    #[test]
    fn a_wait_that_ran_out_makes_the_next_one_park_at_once_until_data_comes() {
        let words = EventWords::default();
        let mut spinner = Spinner::default();
        let policy = SpinPolicy { spin: Duration::from_micros(100) };
        let soon = || Some(std::time::Instant::now() + Duration::from_millis(1));
        let nothing: Option<()> = spinner.wait(policy, words.event(), soon(), || None);
        assert!(nothing.is_none() && spinner.idle, "an idle consumer waiting in slices stops spinning each slice");
        assert_eq!(spinner.wait(policy, words.event(), soon(), || Some(7)), Some(7));
        assert!(!spinner.idle, "data came: the next wait spins again");
    }
}
