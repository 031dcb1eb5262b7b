//! The driver end to end in one process: the test plays the workers (endpoints on the engine's
//! rings, driven by hand) and the front end (tokens are plain numbers).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aqueduct_core::driver::{Admission, DriverState, Event, Fault, GiveUp, RestartPolicy};
use aqueduct_core::hub::{Doorbell, Failure, HubConfig, Payload, StepSpec};
use aqueduct_core::message::{Status, ROUTE_DONE};
use aqueduct_core::metrics::CallEnd;
use aqueduct_core::shm::event::SpinPolicy;
use aqueduct_core::shm::{Arena, ArenaLayout};
use aqueduct_core::{Driver, Engine, Nanos, Received, WorkerEndpoint};
use proptest::prelude::*;

fn step(nprocs: usize, batch_size: usize, cap: usize) -> StepSpec {
    StepSpec { nprocs, batch_size, batch_timeout: Duration::ZERO, queue_capacity: cap, handle_timeout: None }
}

/// What the front end saw for a call.
#[derive(Clone, Debug, PartialEq)]
enum Got {
    Done,
    Handler,
    Died,
    Timeout,
    TimeoutWaiting,
    NotRunning,
    Stopped,
    Other(String),
}

/// What the front end was told.
#[derive(Default)]
struct Seen {
    got: HashMap<u64, Got>,
    events: Vec<String>,
    respawn: Vec<usize>,
    gave_up: Option<GiveUp>,
}

impl Seen {
    fn sink(&mut self) -> impl FnMut(Event<'_, u64>) + '_ {
        move |e| match e {
            Event::Done { call, body, bufs } => {
                assert!(bufs.is_empty());
                assert!(matches!(body, Payload::Inline(_)));
                self.record(call, Got::Done)
            }
            Event::Failed { call, fault, .. } => {
                let g = match fault {
                    Fault::Engine(Failure::Handler { .. }) => Got::Handler,
                    Fault::Engine(Failure::WorkerDied { .. }) => Got::Died,
                    Fault::Engine(Failure::Expired { .. }) | Fault::Timeout => Got::Timeout,
                    Fault::TimeoutWaiting => Got::TimeoutWaiting,
                    Fault::NotRunning => Got::NotRunning,
                    Fault::Engine(Failure::Stopped) => Got::Stopped,
                    other => Got::Other(format!("{other:?}")),
                };
                self.record(call, g)
            }
            Event::Respawn { slot, .. } => self.respawn.push(slot),
            Event::GiveUp(why) => self.gave_up = Some(why),
            Event::Ready { .. } | Event::Exited { .. } => {}
            other => self.events.push(format!("{other:?}")),
        }
    }

    fn record(&mut self, token: u64, g: Got) {
        if let Some(before) = self.got.insert(token, g.clone()) {
            panic!("call {token} answered twice: {before:?}, then {g:?}");
        }
    }
}

struct Rig {
    driver: Driver<u64>,
    workers: Vec<Option<WorkerEndpoint>>,
    seen: Seen,
    next_token: u64,
}

impl Rig {
    fn new(steps: Vec<StepSpec>, priorities: usize, admission: Admission, policy: RestartPolicy) -> Self {
        let cfg = HubConfig { steps, priorities, ring_capacity: 64 << 10, ..HubConfig::default() };
        let pool = Arc::new(Arena::create_in_heap(ArenaLayout::new(4 << 20, 4096, 64), u64::MAX).unwrap());
        let engine = Engine::new(&cfg, pool).unwrap();
        let driver = Driver::new(engine, admission, policy);
        let slots = driver.engine().hub.slot_count();
        let mut rig = Rig { driver, workers: (0..slots).map(|_| None).collect(), seen: Seen::default(), next_token: 1 };
        for slot in 0..slots {
            rig.start_worker(slot);
        }
        rig.poll();
        rig
    }

    fn start_worker(&mut self, slot: usize) {
        let engine = self.driver.engine();
        let index = engine.hub.arena().reserve_index().expect("a free process index");
        let arena = Arc::new(engine.hub.arena().as_process(index));
        let bell = Doorbell::from_fd(engine.doorbell_fd().try_clone_to_owned().unwrap());
        let mut w = WorkerEndpoint::attach(engine.hub.region().clone(), arena, slot, bell).unwrap();
        w.set_spin(SpinPolicy::NONE);
        self.driver.thread_worker_started(slot, index);
        w.ready().unwrap();
        self.workers[slot] = Some(w);
    }

    fn poll(&mut self) {
        self.driver.poll(false, &mut self.seen.sink()).unwrap();
    }

    /// Submits a call; returns its token and the driver's id, or `None` if refused.
    fn submit(&mut self, step: usize, priority: u8, deadline: Nanos) -> Option<(u64, u64)> {
        let token = self.next_token;
        self.next_token += 1;
        match self.driver.submit(token, step, priority, deadline, &token.to_le_bytes(), Vec::new()) {
            Ok(id) => Some((token, id)),
            Err(refused) => {
                assert_eq!(refused.call, token);
                None
            }
        }
    }

    /// The worker of `slot` takes one batch (if any) and answers each task with `status`,
    /// routing it to `route`; returns the batch's size.
    fn work(&mut self, slot: usize, status: Status, route: u16) -> usize {
        let Some(w) = self.workers[slot].as_mut() else { return 0 };
        match w.recv(Some(Duration::ZERO)).unwrap() {
            Received::Batch(n) => {
                let mut body = Vec::new();
                for i in 0..n {
                    w.read_body(i, &mut body).unwrap();
                    w.send_result(i, status, route, &body).unwrap();
                }
                w.finish_batch().unwrap();
                n
            }
            Received::Stop | Received::Timeout => 0,
        }
    }

    /// The worker of `slot` begins its batch and does not answer (yet).
    fn begin(&mut self, slot: usize) -> usize {
        let Some(w) = self.workers[slot].as_mut() else { return 0 };
        match w.recv(Some(Duration::ZERO)).unwrap() {
            Received::Batch(n) => n,
            Received::Stop | Received::Timeout => 0,
        }
    }

    /// The worker of `slot` dies (whatever it held).
    fn kill(&mut self, slot: usize) {
        if self.workers[slot].take().is_some() {
            self.driver.worker_gone(slot, &mut self.seen.sink()).unwrap();
        }
        for slot in std::mem::take(&mut self.seen.respawn) {
            self.start_worker(slot);
        }
    }
}

/// Whether the engine's descriptor is readable now (the owner would wake).
fn readable(rig: &Rig) -> bool {
    let fd = rig.driver.engine().fd();
    let mut pfd = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    rustix::event::poll(&mut pfd, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })).unwrap() == 1
}

fn far() -> Nanos {
    Nanos::now().saturating_add(Duration::from_secs(3600))
}

#[test]
fn a_call_gets_its_result_and_is_counted() {
    let mut rig = Rig::new(vec![step(1, 1, 4)], 1, Admission::Wait, RestartPolicy::default());
    let (token, _) = rig.submit(0, 0, far()).unwrap();
    assert_eq!(rig.work(0, Status::Ok, ROUTE_DONE), 1);
    rig.poll();
    assert_eq!(rig.seen.got[&token], Got::Done);
    assert_eq!(rig.driver.counts().by_priority()[0][CallEnd::Complete as usize], 1);
    assert!(rig.driver.is_idle());
}

#[test]
fn a_deadline_fails_the_call_wherever_its_task_is() {
    let mut rig = Rig::new(vec![step(1, 1, 4)], 1, Admission::Wait, RestartPolicy::default());
    // Held by a worker that does not answer in time.
    let (held, _) = rig.submit(0, 0, Nanos::now().saturating_add(Duration::from_millis(1))).unwrap();
    std::thread::sleep(Duration::from_millis(2)); // the deadline is the scenario
    rig.poll();
    assert_eq!(rig.seen.got[&held], Got::Timeout);
    // Its late result is dropped quietly.
    rig.work(0, Status::Ok, ROUTE_DONE);
    rig.poll();
    assert_eq!(rig.seen.got.len(), 1);
    assert_eq!(rig.driver.counts().by_priority()[0][CallEnd::Timeout as usize], 1);
    assert!(rig.driver.is_idle());
}

#[test]
fn a_full_step_never_holds_back_another_steps_calls() {
    // Both steps have one worker and room for one task. Step 0's worker never answers, so its
    // waiting call A stays; step 1's waiting call B arrived after A, at the same priority, and
    // must enter as soon as step 1 has room (a single FIFO per priority would hold it behind A).
    let mut rig = Rig::new(vec![step(1, 1, 1), step(1, 1, 1)], 1, Admission::Wait, RestartPolicy::default());
    let _running0 = rig.submit(0, 0, far()).unwrap();
    let _queued0 = rig.submit(0, 0, far()).unwrap();
    let (a, _) = rig.submit(0, 0, far()).unwrap();
    let (running1, _) = rig.submit(1, 0, far()).unwrap();
    let (queued1, _) = rig.submit(1, 0, far()).unwrap();
    let (b, _) = rig.submit(1, 0, far()).unwrap();
    let waiting = |rig: &Rig, s: usize| (rig.driver.health()[s].waiting, rig.driver.health()[s].waiting_room);
    assert_eq!((waiting(&rig, 0), waiting(&rig, 1)), ((1, 1), (1, 1)));
    for _ in 0..3 {
        rig.work(1, Status::Ok, ROUTE_DONE);
        rig.poll();
    }
    assert_eq!(rig.seen.got.get(&running1), Some(&Got::Done));
    assert_eq!(rig.seen.got.get(&queued1), Some(&Got::Done));
    assert_eq!(rig.seen.got.get(&b), Some(&Got::Done), "B entered although A still waits");
    assert!(!rig.seen.got.contains_key(&a));
    assert_eq!(waiting(&rig, 0), (1, 1));
}

#[test]
fn the_waiting_room_admits_the_most_urgent_first_and_times_out_waiting_calls() {
    let mut rig = Rig::new(vec![step(1, 1, 1)], 2, Admission::Wait, RestartPolicy::default());
    let (first, _) = rig.submit(0, 0, far()).unwrap(); // held by the worker
    let (queued, _) = rig.submit(0, 0, far()).unwrap(); // fills the queue
    let (low, _) = rig.submit(0, 0, far()).unwrap();
    let (high, _) = rig.submit(0, 1, far()).unwrap();
    let (short, _) = rig.submit(0, 0, Nanos::now().saturating_add(Duration::from_millis(1))).unwrap();
    std::thread::sleep(Duration::from_millis(2)); // the deadline is the scenario
    rig.poll();
    assert_eq!(rig.seen.got[&short], Got::TimeoutWaiting);
    let mut order = Vec::new();
    for _ in 0..8 {
        rig.work(0, Status::Ok, ROUTE_DONE);
        let before: Vec<u64> = rig.seen.got.keys().copied().collect();
        rig.poll();
        let mut new: Vec<u64> = rig.seen.got.keys().filter(|k| !before.contains(k)).copied().collect();
        new.sort();
        order.extend(new);
    }
    assert_eq!(order, vec![first, queued, high, low]);
}

#[test]
fn a_cancel_that_frees_room_wakes_the_owner_to_admit_a_waiting_call() {
    let mut rig = Rig::new(vec![step(1, 1, 1)], 1, Admission::Wait, RestartPolicy::default());
    let _running = rig.submit(0, 0, far()).unwrap();
    assert_eq!(rig.begin(0), 1);
    let (_, queued) = rig.submit(0, 0, far()).unwrap();
    let (waiting, _) = rig.submit(0, 0, far()).unwrap();
    rig.driver.engine_mut().prepare_sleep();
    assert!(!readable(&rig), "the owner may sleep: nothing to do");
    assert!(rig.driver.cancel(queued));
    // Nothing else happens in the flow: the engine's descriptor must wake the owner by itself.
    assert!(readable(&rig), "the cancel woke the owner");
    rig.poll();
    assert_eq!(rig.driver.health()[0].waiting_room, 0, "the waiting call entered");
    assert_eq!(rig.driver.health()[0].waiting, 1);
    assert!(!rig.seen.got.contains_key(&waiting));
}

#[test]
fn reject_refuses_at_once_and_hands_the_token_back() {
    let mut rig = Rig::new(vec![step(1, 1, 1)], 1, Admission::Reject, RestartPolicy::default());
    assert!(rig.submit(0, 0, far()).is_some());
    assert!(rig.submit(0, 0, far()).is_some());
    assert!(rig.submit(0, 0, far()).is_none());
}

#[test]
fn priorities_past_the_levels_and_unknown_steps_are_refused() {
    let mut rig = Rig::new(vec![step(1, 1, 4)], 2, Admission::Wait, RestartPolicy::default());
    assert!(rig.submit(0, 2, far()).is_none());
    assert!(rig.submit(1, 0, far()).is_none());
}

#[test]
fn deaths_restart_with_backoff_until_the_policy_gives_up() {
    let policy = RestartPolicy { max_restarts: 2, window: Duration::from_secs(60), stop_on_handler_error: false };
    let mut rig = Rig::new(vec![step(1, 1, 4)], 1, Admission::Wait, policy);
    let (held, _) = rig.submit(0, 0, far()).unwrap();
    assert_eq!(rig.begin(0), 1);
    rig.kill(0);
    assert_eq!(rig.seen.got[&held], Got::Died);
    assert!(rig.workers[0].is_some(), "the first replacement starts at once");
    assert_eq!(rig.driver.health()[0].restarts, 1);
    // The second waits out a backoff.
    rig.workers[0] = None;
    rig.driver.worker_gone(0, &mut rig.seen.sink()).unwrap();
    assert!(rig.seen.respawn.is_empty());
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while rig.seen.respawn.is_empty() && std::time::Instant::now() < until {
        rig.driver.wait(Some(Duration::from_millis(100)), &mut rig.seen.sink()).unwrap();
    }
    assert_eq!(rig.seen.respawn, vec![0], "the engine's timer brought the replacement");
    rig.kill(0); // the pending respawn is started first, by kill()'s loop
    rig.kill(0);
    assert!(matches!(rig.seen.gave_up, Some(GiveUp::TooManyDeaths { step: 0, deaths: 3, .. })));
    assert_eq!(rig.driver.health()[0].deaths, 3);
}

#[test]
fn a_worker_that_is_no_process_reports_its_end_from_any_thread_like_an_exit() {
    let mut rig = Rig::new(vec![step(1, 1, 4)], 1, Admission::Wait, RestartPolicy::default());
    let (begun, _) = rig.submit(0, 0, far()).unwrap();
    let (ahead, _) = rig.submit(0, 0, far()).unwrap();
    assert_eq!(rig.begin(0), 1);
    let notifier = rig.driver.engine().exit_notifier(0).unwrap();
    rig.driver.engine_mut().prepare_sleep();
    std::thread::spawn(move || notifier.notify()).join().unwrap();
    assert!(readable(&rig), "the notice woke the owner");
    rig.workers[0] = None;
    rig.driver.poll(true, &mut rig.seen.sink()).unwrap();
    assert_eq!(rig.seen.got[&begun], Got::Died);
    assert!(!rig.seen.got.contains_key(&ahead), "the batch it never began went back to the queue");
    assert_eq!(rig.seen.respawn, vec![0]);
    let replacement = std::mem::take(&mut rig.seen.respawn);
    for slot in replacement {
        rig.start_worker(slot);
    }
    rig.poll();
    rig.work(0, Status::Ok, ROUTE_DONE);
    rig.poll();
    assert_eq!(rig.seen.got[&ahead], Got::Done);
}

#[test]
fn a_worker_that_is_no_process_past_handle_timeout_is_handed_to_its_owner_to_end() {
    let spec = StepSpec { handle_timeout: Some(Duration::from_millis(50)), ..step(1, 1, 4) };
    let mut rig = Rig::new(vec![spec], 1, Admission::Wait, RestartPolicy::default());
    let (held, _) = rig.submit(0, 0, far()).unwrap();
    assert_eq!(rig.begin(0), 1);
    // The engine cannot kill a thread or a remote actor: the driver tells the front end.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while rig.seen.events.is_empty() && std::time::Instant::now() < until {
        rig.driver.wait(Some(Duration::from_millis(100)), &mut rig.seen.sink()).unwrap();
    }
    assert_eq!(rig.seen.events, vec!["StopWorker { slot: 0, step: 0 }".to_string()]);
    rig.poll();
    assert_eq!(rig.seen.events.len(), 1, "reported once");
    // Its owner ends it (an executor kills its actor): the exit fails the batch as overdue.
    rig.driver.engine().exit_notifier(0).unwrap().notify();
    rig.workers[0] = None;
    rig.driver.poll(true, &mut rig.seen.sink()).unwrap();
    assert_eq!(rig.seen.got[&held], Got::Other("Engine(HandlerTimeout { step: 0, pid: 0 })".to_string()));
    assert_eq!(rig.seen.respawn, vec![0]);
}

#[test]
fn a_graceful_stop_drains_then_reports_and_fails_what_waits() {
    let mut rig = Rig::new(vec![step(1, 1, 1)], 1, Admission::Wait, RestartPolicy::default());
    let (held, _) = rig.submit(0, 0, far()).unwrap();
    let (_queued, _) = rig.submit(0, 0, far()).unwrap();
    let (waiting, _) = rig.submit(0, 0, far()).unwrap();
    rig.driver.begin_stop(true, Duration::from_secs(60), &mut rig.seen.sink()).unwrap();
    assert_eq!(rig.seen.got[&waiting], Got::NotRunning);
    assert_eq!(rig.driver.state(), DriverState::Draining);
    assert!(rig.submit(0, 0, far()).is_none(), "no new calls while stopping");
    rig.work(0, Status::Ok, ROUTE_DONE);
    rig.poll();
    rig.work(0, Status::Ok, ROUTE_DONE);
    rig.poll();
    assert_eq!(rig.seen.got[&held], Got::Done);
    assert_eq!(rig.seen.events, vec!["Drained".to_string()]);
    assert!(rig.driver.stop_workers(false));
}

#[test]
fn a_death_while_a_graceful_stop_drains_is_replaced_and_the_tasks_it_never_began_finish() {
    let mut rig = Rig::new(vec![step(1, 1, 4)], 1, Admission::Wait, RestartPolicy::default());
    let (begun, _) = rig.submit(0, 0, far()).unwrap();
    let (ahead, _) = rig.submit(0, 0, far()).unwrap();
    assert_eq!(rig.begin(0), 1);
    rig.driver.begin_stop(true, Duration::from_secs(60), &mut rig.seen.sink()).unwrap();
    rig.kill(0); // the step's only worker dies mid-drain: replaced at once
    assert_eq!(rig.seen.got[&begun], Got::Died);
    assert!(rig.workers[0].is_some(), "a replacement serves the drain");
    rig.poll();
    rig.work(0, Status::Ok, ROUTE_DONE);
    rig.poll();
    assert_eq!(rig.seen.got[&ahead], Got::Done, "not failed at the end of the grace period");
    assert_eq!(rig.seen.events, vec!["Drained".to_string()]);
}

#[test]
fn a_hard_stop_escalates_a_graceful_one() {
    let mut rig = Rig::new(vec![step(1, 1, 4)], 1, Admission::Wait, RestartPolicy::default());
    let (held, _) = rig.submit(0, 0, far()).unwrap();
    rig.driver.begin_stop(true, Duration::from_secs(60), &mut rig.seen.sink()).unwrap();
    rig.driver.begin_stop(false, Duration::ZERO, &mut rig.seen.sink()).unwrap();
    assert_eq!(rig.seen.got[&held], Got::Stopped);
    assert_eq!(rig.seen.events, vec!["GraceExpired".to_string()]);
}

#[test]
fn stop_on_handler_error_gives_up_once() {
    let policy = RestartPolicy { stop_on_handler_error: true, ..RestartPolicy::default() };
    let mut rig = Rig::new(vec![step(1, 2, 4)], 1, Admission::Wait, policy);
    rig.submit(0, 0, far()).unwrap();
    rig.submit(0, 0, far()).unwrap();
    rig.work(0, Status::Error, ROUTE_DONE);
    rig.poll();
    assert_eq!(rig.seen.gave_up, Some(GiveUp::HandlerError { step: 0 }));
}

/// One thing the world does to a flow.
#[derive(Clone, Debug)]
enum Op {
    Submit { step: usize, priority: u8, deadline_us: Option<u64> },
    Cancel(usize),
    Work { slot: usize, status: u8, forward: bool },
    Kill(usize),
    Poll,
    Stop { graceful: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..2u8, prop::option::of(0..3000u64))
            .prop_map(|(step, priority, deadline_us)| Op::Submit { step, priority, deadline_us }),
        1 => (0..64usize).prop_map(Op::Cancel),
        4 => (0..3usize, 0..3u8, any::<bool>()).prop_map(|(slot, status, forward)| Op::Work { slot, status, forward }),
        1 => (0..3usize).prop_map(Op::Kill),
        2 => Just(Op::Poll),
        1 => any::<bool>().prop_map(|graceful| Op::Stop { graceful }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Under random submits, cancels, deadlines, full queues, handler errors, deaths and stops,
    /// every call the driver accepted gets exactly one answer unless its caller cancelled it,
    /// the counts agree with what the callers saw, and after every poll no step with room has
    /// calls waiting for it.
    #[test]
    fn every_call_gets_exactly_one_outcome(ops in prop::collection::vec(op(), 1..80), reject in any::<bool>()) {
        let admission = if reject { Admission::Reject } else { Admission::Wait };
        let policy = RestartPolicy { max_restarts: 100, window: Duration::from_secs(60), stop_on_handler_error: false };
        // Step 0: two workers, batches of 2, room for 3; step 1: one worker, room for 2.
        let mut rig = Rig::new(vec![step(2, 2, 3), step(1, 1, 2)], 2, admission, policy);
        let mut accepted: Vec<(u64, u64)> = Vec::new();
        let mut cancelled = Vec::new();
        for op in ops {
            match op {
                Op::Submit { step, priority, deadline_us } => {
                    let deadline = deadline_us.map_or(Nanos::ZERO, |us| Nanos::now().saturating_add(Duration::from_micros(us)));
                    if let Some(call) = rig.submit(step, priority, deadline) {
                        accepted.push(call);
                    }
                }
                Op::Cancel(k) => {
                    if let Some(&(token, id)) = accepted.get(k) {
                        if rig.driver.cancel(id) {
                            prop_assert!(!rig.seen.got.contains_key(&token), "cancelled after its answer");
                            cancelled.push(token);
                        }
                    }
                }
                Op::Work { slot, status, forward } => {
                    let status = [Status::Ok, Status::Ok, Status::Error][status as usize];
                    let route = if forward && rig.driver.engine().hub.slot_step(slot) == 0 { 1 } else { ROUTE_DONE };
                    rig.work(slot, status, route);
                }
                Op::Kill(slot) => rig.kill(slot),
                Op::Poll => {
                    rig.poll();
                    // The waiting room never holds a call back for a step that has room: not
                    // for a full step elsewhere, nor behind calls of another step.
                    if rig.driver.state() == DriverState::Running {
                        for (s, h) in rig.driver.health().iter().enumerate() {
                            let capacity = rig.driver.engine().hub.queue_capacity(s);
                            prop_assert!(
                                h.waiting_room == 0 || h.waiting >= capacity,
                                "step {} has room ({} of {}) but {} calls wait", s, h.waiting, capacity, h.waiting_room
                            );
                        }
                    }
                }
                Op::Stop { graceful } => {
                    rig.driver.begin_stop(graceful, Duration::from_millis(1), &mut rig.seen.sink()).unwrap();
                }
            }
            for slot in std::mem::take(&mut rig.seen.respawn) {
                rig.start_worker(slot);
            }
        }
        // Finish: serve until idle, then stop hard and check every call was answered once.
        for _ in 0..200 {
            if rig.driver.pending() == 0 {
                break;
            }
            for slot in 0..3 {
                let route = if slot < 2 { 1 } else { ROUTE_DONE };
                rig.work(slot, Status::Ok, route);
            }
            rig.poll();
        }
        rig.driver.begin_stop(false, Duration::ZERO, &mut rig.seen.sink()).unwrap();
        prop_assert_eq!(rig.driver.pending(), 0);
        for (token, _) in &accepted {
            let answered = rig.seen.got.contains_key(token);
            let was_cancelled = cancelled.contains(token);
            prop_assert!(answered != was_cancelled, "call {} answered={} cancelled={}", token, answered, was_cancelled);
        }
        let counts = rig.driver.counts().by_priority();
        let total: u64 = counts.iter().flatten().sum();
        prop_assert_eq!(total as usize, accepted.len());
        let cancels: u64 = counts.iter().map(|c| c[CallEnd::Cancel as usize]).sum();
        prop_assert_eq!(cancels as usize, cancelled.len());
    }
}

#[test]
fn a_pass_that_says_sleep_leaves_the_owner_woken_by_the_next_result() {
    let mut rig = Rig::new(vec![step(1, 1, 4)], 1, Admission::Wait, RestartPolicy::default());
    let (token, _) = rig.submit(0, 0, far()).unwrap();
    // No wake-up measured yet, so no spin budget: the pass says sleep, and lowers the flags.
    let (_, again) = rig.driver.poll_pass(false, &mut rig.seen.sink()).unwrap();
    assert!(!again, "with no budget and nothing arrived, the owner sleeps");
    while readable(&rig) {
        // The submit's own doorbell, if any, from before the pass.
        rig.driver.poll(true, &mut rig.seen.sink()).unwrap();
        rig.driver.poll_pass(false, &mut rig.seen.sink()).unwrap();
    }
    assert_eq!(rig.work(0, Status::Ok, ROUTE_DONE), 1);
    assert!(readable(&rig), "a worker answering a sleeping owner rings its doorbell");
    let (n, _) = rig.driver.poll_pass(false, &mut rig.seen.sink()).unwrap();
    assert_eq!(n, 1);
    assert_eq!(rig.seen.got[&token], Got::Done);
}
