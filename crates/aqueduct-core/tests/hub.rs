//! The hub and worker endpoints end to end in one process: the test plays the workers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aqueduct_core::hub::pipeline_depth;
use aqueduct_core::hub::{
    Doorbell, Failure, Hub, HubConfig, Outcome, Payload, SlotState, StepSpec, MAX_PIPELINE_DEPTH,
};
use aqueduct_core::message::{Status, ROUTE_DONE};
use aqueduct_core::shm::event::SpinPolicy;
use aqueduct_core::shm::{Arena, ArenaLayout, BufRef};
use aqueduct_core::{Nanos, Received, WorkerEndpoint};
use proptest::prelude::*;

fn step(nprocs: usize, batch_size: usize, timeout_ms: u64, cap: usize) -> StepSpec {
    StepSpec {
        nprocs,
        batch_size,
        batch_timeout: Duration::from_millis(timeout_ms),
        queue_capacity: cap,
        handle_timeout: None,
    }
}

fn config(steps: Vec<StepSpec>) -> HubConfig {
    HubConfig { steps, ring_capacity: 64 << 10, ..HubConfig::default() }
}

fn pool() -> Arc<Arena> {
    Arc::new(Arena::create_in_heap(ArenaLayout::new(4 << 20, 4096, 32), u64::MAX).unwrap())
}

/// A worker endpoint for `slot`, acting as a fresh process of the pool.
fn worker(hub: &mut Hub, slot: usize, pid: u32) -> WorkerEndpoint {
    let index = hub.arena().reserve_index().expect("a free process index");
    let arena = Arc::new(hub.arena().as_process(index));
    let mut w = WorkerEndpoint::attach(hub.region().clone(), arena, slot, Doorbell::new().unwrap()).unwrap();
    w.set_spin(SpinPolicy::NONE);
    hub.worker_spawned(slot, pid, index);
    w
}

/// Owned outcome, for assertions.
#[derive(Debug, PartialEq)]
enum Got {
    Done(Vec<u8>),
    Handler(usize),
    Expired(usize),
    Died(usize),
    TimedOut(usize),
    Stopped,
}

struct Rig {
    hub: Hub,
    workers: Vec<WorkerEndpoint>,
    got: HashMap<u64, Got>,
}

impl Rig {
    fn new(cfg: HubConfig) -> Self {
        let mut hub = Hub::create_in_heap(&cfg, pool()).unwrap();
        let mut workers = Vec::new();
        for slot in 0..hub.slot_count() {
            let mut w = worker(&mut hub, slot, 1000 + slot as u32);
            w.ready().unwrap();
            workers.push(w);
        }
        let mut rig = Rig { hub, workers, got: HashMap::new() };
        rig.poll();
        rig
    }

    fn poll_at(&mut self, now: Nanos) {
        let (hub, got) = (&mut self.hub, &mut self.got);
        let arena = hub.arena().clone();
        let mut sink = |o: Outcome<'_>| {
            let record = |id: u64, g: Got, got: &mut HashMap<u64, Got>| {
                assert!(got.insert(id, g).is_none(), "task {id} reported twice");
            };
            match o {
                Outcome::Done { task_id, body, bufs } => {
                    assert!(bufs.is_empty());
                    let bytes = match body {
                        Payload::Inline(b) => b.to_vec(),
                        Payload::Extent(e) => {
                            let mut v = vec![0; e.len as usize];
                            arena.read(&e, 0, &mut v).unwrap();
                            arena.unhold(&e).unwrap();
                            v
                        }
                    };
                    record(task_id, Got::Done(bytes), got)
                }
                Outcome::Failed { task_id, failure } => {
                    let g = match failure {
                        Failure::Handler { step, .. } => Got::Handler(step),
                        Failure::Expired { step } => Got::Expired(step),
                        Failure::WorkerDied { step, .. } => Got::Died(step),
                        Failure::HandlerTimeout { step, .. } => Got::TimedOut(step),
                        Failure::Stopped => Got::Stopped,
                        Failure::ArenaExhausted { .. } => panic!("arena exhausted"),
                    };
                    record(task_id, g, got)
                }
                _ => {}
            }
        };
        hub.poll(now, &mut sink).unwrap();
    }

    fn poll(&mut self) {
        self.poll_at(Nanos::now());
    }

    /// Worker `slot` takes its batch (if any) and answers every task with `f`.
    fn work(&mut self, slot: usize, f: impl Fn(usize, &[u8]) -> (Status, u16, Vec<u8>)) -> Vec<usize> {
        let w = &mut self.workers[slot];
        match w.recv(Some(Duration::ZERO)).unwrap() {
            Received::Batch(n) => {
                let mut lens = Vec::new();
                for i in 0..n {
                    let mut body = Vec::new();
                    w.read_body(i, &mut body).unwrap();
                    lens.push(body.len());
                    let (st, route, out) = f(i, &body);
                    w.send_result(i, st, route, &out).unwrap();
                }
                w.finish_batch().unwrap();
                lens
            }
            Received::Stop => panic!("unexpected stop"),
            Received::Timeout => Vec::new(),
        }
    }

    fn echo(&mut self, slot: usize) -> usize {
        self.work(slot, |_, b| (Status::Ok, ROUTE_DONE, b.to_vec())).len()
    }
}

#[test]
fn a_task_makes_a_round_trip() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 20)]));
    let id = rig.hub.submit(0, 0, Nanos::ZERO, b"hello").unwrap();
    assert_eq!(rig.hub.held_by(0), vec![id], "dispatched inline at submit");
    assert_eq!(rig.echo(0), 1);
    rig.poll();
    assert_eq!(rig.got.remove(&id), Some(Got::Done(b"hello".to_vec())));
    assert_eq!(rig.hub.in_flight(), 0);
    assert_eq!(rig.hub.slot_state(0), SlotState::Idle);
}

#[test]
fn timeout_zero_takes_what_is_queued_up_to_batch_size() {
    let mut rig = Rig::new(config(vec![step(1, 4, 0, 20)]));
    let first = rig.hub.submit(0, 0, Nanos::ZERO, b"a").unwrap();
    assert_eq!(rig.hub.held_by(0), vec![first], "an idle worker gets a batch of 1 at once");
    for _ in 0..6 {
        rig.hub.submit(0, 0, Nanos::ZERO, b"b").unwrap();
    }
    assert_eq!(rig.echo(0), 1);
    rig.poll();
    assert_eq!(rig.echo(0), 4, "full batch from the backlog");
    rig.poll();
    assert_eq!(rig.echo(0), 2, "the rest, without waiting");
    rig.poll();
    assert_eq!(rig.got.len(), 7);
}

#[test]
fn timeout_waits_for_a_full_batch_or_the_deadline_from_the_first_task() {
    let mut rig = Rig::new(config(vec![step(1, 4, 50, 20)]));
    let t0 = Nanos::now();
    rig.hub.submit(0, 0, Nanos::ZERO, b"a").unwrap();
    rig.hub.submit(0, 0, Nanos::ZERO, b"b").unwrap();
    assert!(rig.hub.held_by(0).is_empty(), "partial batch waits");
    let due = rig.hub.next_timer().expect("a batch timer is armed");
    assert!(due >= t0.saturating_add(Duration::from_millis(50)));
    assert!(due <= Nanos::now().saturating_add(Duration::from_millis(50)));
    rig.poll_at(Nanos(due.0 - 1));
    assert!(rig.hub.held_by(0).is_empty(), "not before the timeout");
    rig.poll_at(due);
    assert_eq!(rig.hub.held_by(0).len(), 2, "partial batch leaves at the timeout");
    // A full batch leaves without waiting.
    rig.echo(0);
    rig.poll();
    for _ in 0..4 {
        rig.hub.submit(0, 0, Nanos::ZERO, b"c").unwrap();
    }
    assert_eq!(rig.hub.held_by(0).len(), 4);
}

#[test]
fn with_several_workers_one_batch_goes_to_one_worker() {
    let mut rig = Rig::new(config(vec![step(2, 3, 50, 20)]));
    for _ in 0..3 {
        rig.hub.submit(0, 0, Nanos::ZERO, b"x").unwrap();
    }
    let held: Vec<usize> = (0..2).map(|s| rig.hub.held_by(s).len()).collect();
    assert!(held == vec![3, 0] || held == vec![0, 3], "one worker got the whole batch: {held:?}");
}

#[test]
fn higher_priority_is_served_first() {
    let mut cfg = config(vec![step(1, 1, 0, 20)]);
    cfg.priorities = 3;
    let mut rig = Rig::new(cfg);
    let blocker = rig.hub.submit(0, 0, Nanos::ZERO, b"busy").unwrap();
    let low = rig.hub.submit(0, 0, Nanos::ZERO, b"low").unwrap();
    let high = rig.hub.submit(0, 2, Nanos::ZERO, b"high").unwrap();
    let mid = rig.hub.submit(0, 1, Nanos::ZERO, b"mid").unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        order.extend(rig.hub.held_by(0));
        rig.echo(0);
        rig.poll();
    }
    assert_eq!(order, vec![blocker, high, mid, low]);
}

#[test]
fn expired_tasks_are_dropped_before_a_worker_sees_them_and_counted() {
    // batch_size 2: the lone waiting task is a partial batch, so it stays in the hub.
    let mut rig = Rig::new(config(vec![step(1, 2, 0, 20)]));
    let blocker = rig.hub.submit(0, 0, Nanos::ZERO, b"busy").unwrap();
    let soon = Nanos::now().saturating_add(Duration::from_millis(1));
    let doomed = rig.hub.submit(0, 0, soon, b"late").unwrap();
    std::thread::sleep(Duration::from_millis(2)); // let the deadline pass: time is the input here
    rig.echo(0);
    rig.poll();
    assert_eq!(rig.got.remove(&doomed), Some(Got::Expired(0)));
    assert_eq!(rig.got.remove(&blocker), Some(Got::Done(b"busy".to_vec())));
    assert_eq!(rig.hub.step_stats(0).expired, 1);
    assert_eq!(rig.echo(0), 0, "the worker never saw it");
}

#[test]
fn results_route_through_steps_and_may_skip_one() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 20), step(1, 1, 0, 20), step(1, 1, 0, 20)]));
    let a = rig.hub.submit(0, 0, Nanos::ZERO, b"a").unwrap();
    rig.work(0, |_, b| (Status::Ok, 2, [b, b"1"].concat())); // skip step 1
    rig.poll();
    assert!(rig.hub.held_by(1).is_empty());
    rig.work(2, |_, b| (Status::Ok, ROUTE_DONE, [b, b"3"].concat()));
    rig.poll();
    assert_eq!(rig.got.remove(&a), Some(Got::Done(b"a13".to_vec())));
}

#[test]
fn a_handler_error_fails_only_its_task() {
    let mut rig = Rig::new(config(vec![step(1, 2, 0, 20)]));
    rig.hub.submit(0, 0, Nanos::ZERO, b"first").unwrap();
    let ok = rig.hub.submit(0, 0, Nanos::ZERO, b"ok").unwrap();
    let bad = rig.hub.submit(0, 0, Nanos::ZERO, b"bad").unwrap();
    rig.echo(0);
    rig.poll();
    rig.work(0, |_, b| {
        if b == b"bad" {
            (Status::Error, ROUTE_DONE, b"ValueError".to_vec())
        } else {
            (Status::Ok, ROUTE_DONE, b.to_vec())
        }
    });
    rig.poll();
    assert_eq!(rig.got.remove(&bad), Some(Got::Handler(0)));
    assert_eq!(rig.got.remove(&ok), Some(Got::Done(b"ok".to_vec())));
    assert_eq!(rig.hub.step_stats(0).failed, 1);
}

#[test]
fn a_dead_worker_fails_only_what_it_began_and_its_published_results_survive() {
    let mut rig = Rig::new(config(vec![step(2, 2, 0, 20)]));
    let (dying, healthy) = (0, 1);
    // Keep the healthy worker busy so that the dying one gets the next batches.
    let busy = rig.hub.submit(0, 0, Nanos::ZERO, b"busy").unwrap();
    let healthy = if rig.hub.held_by(healthy).contains(&busy) { healthy } else { dying };
    let dying = 1 - healthy;
    let ids: Vec<u64> = (0..5).map(|i| rig.hub.submit(0, 0, Nanos::ZERO, &[i]).unwrap()).collect();
    // The dying worker got one task while idle, then a full batch of two ahead of time.
    let held = rig.hub.held_by(dying);
    assert_eq!(held.len(), 3);
    assert_eq!(held[0], ids[0]);
    assert_eq!(rig.hub.batches_outstanding(dying), 2);
    // It answers its first batch, begins the second, answers one task, publishes, and dies.
    rig.echo(dying);
    {
        let w = &mut rig.workers[dying];
        assert_eq!(w.recv(Some(Duration::ZERO)).unwrap(), Received::Batch(2));
        w.send_result(0, Status::Ok, ROUTE_DONE, b"survivor").unwrap();
        w.flush();
    }
    let mut exits = Vec::new();
    let mut sink = |o: Outcome<'_>| match o {
        Outcome::Failed { task_id, failure: Failure::WorkerDied { step, pid } } => exits.push((task_id, step, pid)),
        Outcome::Done { task_id, .. } => exits.push((task_id, 99, 0)),
        _ => {}
    };
    rig.hub.worker_exited(dying, &mut sink).unwrap();
    assert_eq!(
        exits,
        vec![(held[0], 99, 0), (held[1], 99, 0), (held[2], 0, 1000 + dying as u32)],
        "published results survive; only the unanswered task of the begun batch fails"
    );
    assert_eq!(rig.hub.slot_state(dying), SlotState::Dead);
    // A replacement in the same slot picks up work.
    rig.workers[dying] = worker(&mut rig.hub, dying, 2000);
    rig.workers[dying].ready().unwrap();
    rig.poll();
    let id = rig.hub.submit(0, 0, Nanos::ZERO, b"after").unwrap();
    for _ in 0..3 {
        rig.echo(dying);
        rig.echo(healthy);
        rig.poll();
    }
    assert_eq!(rig.got.remove(&id), Some(Got::Done(b"after".to_vec())));
    assert_eq!(rig.hub.in_flight(), 0);
}

#[test]
fn batches_a_dead_worker_never_began_go_back_to_the_queue() {
    let mut rig = Rig::new(config(vec![step(2, 1, 0, 20)]));
    let first = rig.hub.submit(0, 0, Nanos::ZERO, b"1").unwrap();
    let dying = if rig.hub.held_by(0) == vec![first] { 0 } else { 1 };
    let healthy = 1 - dying;
    rig.hub.submit(0, 0, Nanos::ZERO, b"2").unwrap(); // to the other idle worker
    let ahead = rig.hub.submit(0, 0, Nanos::ZERO, b"3").unwrap(); // sent ahead to one of them
    let victim = if rig.hub.held_by(dying).contains(&ahead) { dying } else { healthy };
    let mut died = Vec::new();
    rig.hub
        .worker_exited(victim, &mut |o| {
            if let Outcome::Failed { task_id, .. } = o {
                died.push(task_id)
            }
        })
        .unwrap();
    assert!(died.is_empty(), "the victim had begun nothing, so nothing failed: {died:?}");
    let survivor = 1 - victim;
    for _ in 0..3 {
        rig.echo(survivor);
        rig.poll();
    }
    assert_eq!(rig.got.len(), 3, "every task, including those handed back, completed on the survivor");
}

#[test]
fn large_bodies_travel_through_the_arena_and_are_freed() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 20), step(1, 1, 0, 20)]));
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let id = rig.hub.submit(0, 0, Nanos::ZERO, &big).unwrap();
    assert!(rig.hub.arena().used_pages() > 0);
    let lens = rig.work(0, |_, b| (Status::Ok, 1, b.to_vec()));
    assert_eq!(lens, vec![big.len()]);
    rig.poll();
    rig.work(1, |_, b| (Status::Ok, ROUTE_DONE, b.to_vec()));
    rig.poll();
    assert_eq!(rig.got.remove(&id), Some(Got::Done(big)));
    assert_eq!(rig.hub.arena().used_pages(), 0, "every extent freed");
}

#[test]
fn cancel_removes_queued_tasks_and_drops_held_results() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 20)]));
    let held = rig.hub.submit(0, 0, Nanos::ZERO, b"held").unwrap();
    let queued = rig.hub.submit(0, 0, Nanos::ZERO, b"queued").unwrap();
    assert!(rig.hub.cancel(queued));
    assert!(rig.hub.cancel(held));
    assert!(!rig.hub.cancel(held), "second cancel is a no-op");
    assert_eq!(rig.hub.in_flight(), 0);
    rig.echo(0);
    rig.poll();
    assert!(rig.got.is_empty(), "cancelled tasks report nothing");
    assert_eq!(rig.echo(0), 0, "the queued one never reached the worker");
}

#[test]
fn a_full_queue_refuses_submissions() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 3)]));
    // One batch to the idle worker (it is being handled: not waiting), then batches of 1 sent
    // ahead: they are waiting, and count against the bound like queued tasks.
    rig.hub.submit(0, 0, Nanos::ZERO, b"running").unwrap();
    rig.hub.submit(0, 0, Nanos::ZERO, b"ahead1").unwrap();
    rig.hub.submit(0, 0, Nanos::ZERO, b"ahead2").unwrap();
    assert_eq!(rig.hub.batches_outstanding(0), 3);
    rig.hub.submit(0, 0, Nanos::ZERO, b"ahead3").unwrap();
    assert_eq!(rig.hub.waiting(0), 3);
    let err = rig.hub.submit(0, 0, Nanos::ZERO, b"over").unwrap_err();
    assert!(err.to_string().contains("full"), "{err}");
    assert!(!rig.hub.has_room(0));
    // The worker finishes its batch: one waiting task is now running, so one more fits.
    rig.echo(0);
    rig.poll();
    assert!(rig.hub.has_room(0));
    rig.hub.submit(0, 0, Nanos::ZERO, b"fits").unwrap();
    assert!(rig.hub.submit(0, 0, Nanos::ZERO, b"over").is_err());
}

#[test]
fn the_bound_holds_whatever_the_pipeline_depth() {
    // A queue of 1 with a worker of batch size 1 (pipeline depth 8): at most one task waits.
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 1)]));
    assert!(pipeline_depth(1) > 2);
    rig.hub.submit(0, 0, Nanos::ZERO, b"running").unwrap();
    rig.hub.submit(0, 0, Nanos::ZERO, b"waiting").unwrap();
    assert!(rig.hub.submit(0, 0, Nanos::ZERO, b"over").is_err());
    assert_eq!(rig.hub.in_flight(), 2);
}

#[test]
fn a_batch_sent_ahead_goes_to_a_worker_that_falls_idle() {
    let mut rig = Rig::new(config(vec![step(2, 1, 0, 20)]));
    let a = rig.hub.submit(0, 0, Nanos::ZERO, b"a").unwrap();
    let slow = if rig.hub.held_by(0) == vec![a] { 0 } else { 1 };
    let quick = 1 - slow;
    rig.hub.submit(0, 0, Nanos::ZERO, b"b").unwrap(); // the other idle worker
    let c = rig.hub.submit(0, 0, Nanos::ZERO, b"c").unwrap(); // ahead, to one of the two busy ones
    let behind = if rig.hub.held_by(slow).contains(&c) { slow } else { quick };
    let other = 1 - behind;
    // The worker `c` is not behind finishes while the other is still busy: `c` moves to it.
    assert_eq!(rig.echo(other), 1);
    rig.poll();
    assert_eq!(rig.hub.batches_outstanding(behind), 1, "the batch sent ahead was taken back");
    assert!(rig.hub.held_by(other).contains(&c), "and given to the idle worker");
    assert_eq!(rig.echo(other), 1);
    assert_eq!(rig.echo(behind), 1);
    assert_eq!(rig.echo(behind), 0, "the worker it was taken from skips it");
    rig.poll();
    assert_eq!(rig.got.len(), 3);
    assert_eq!(rig.got.remove(&c), Some(Got::Done(b"c".to_vec())));
    assert_eq!(rig.hub.in_flight(), 0);
}

#[test]
fn a_result_that_arrives_after_fail_all_is_dropped_without_a_protocol_error() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 20)]));
    let ids: Vec<u64> = (0..3).map(|_| rig.hub.submit(0, 0, Nanos::ZERO, b"x").unwrap()).collect();
    rig.hub.fail_all(&mut |_| {});
    // The worker was still running: its answers come in after the tasks were failed.
    for _ in 0..3 {
        rig.echo(0);
    }
    rig.poll();
    assert!(ids.iter().all(|id| !rig.got.contains_key(id)), "nothing reported twice");
    assert_eq!(rig.hub.in_flight(), 0);
}

#[test]
fn a_batch_running_past_handle_timeout_is_reported_and_fails_as_such() {
    let mut spec = step(1, 1, 0, 20);
    spec.handle_timeout = Some(Duration::from_millis(50));
    let mut rig = Rig::new(config(vec![spec]));
    let sent = Nanos::now();
    let id = rig.hub.submit(0, 0, Nanos::ZERO, b"hangs").unwrap();
    assert_eq!(rig.workers[0].recv(Some(Duration::ZERO)).unwrap(), Received::Batch(1), "the worker begins it");
    let timer = rig.hub.next_timer().expect("the hub wakes itself for the limit");
    assert!(timer.0 >= sent.0 + 50_000_000 && timer.0 < sent.0 + 5_000_000_000, "{timer:?}");
    rig.poll_at(Nanos(sent.0 + 10_000_000));
    assert!(rig.hub.take_overdue().is_empty(), "within the limit");
    assert!(rig.hub.batch_running_for(0, Nanos(sent.0 + 10_000_000)).is_some());
    rig.poll_at(Nanos(timer.0 + 1));
    assert_eq!(rig.hub.take_overdue(), vec![0]);
    assert!(rig.hub.overran(0));
    rig.poll_at(Nanos(timer.0 + 2));
    assert!(rig.hub.take_overdue().is_empty(), "reported once");
    let mut failed = Vec::new();
    rig.hub
        .worker_exited(0, &mut |o| {
            if let Outcome::Failed { task_id, failure: Failure::HandlerTimeout { step, pid } } = o {
                failed.push((task_id, step, pid));
            }
        })
        .unwrap();
    assert_eq!(failed, vec![(id, 0, 1000)]);
    assert!(!rig.hub.overran(0));
}

#[test]
fn a_busy_worker_is_sent_its_next_full_batch_ahead_of_time() {
    let mut rig = Rig::new(config(vec![step(1, 2, 0, 20)]));
    rig.hub.submit(0, 0, Nanos::ZERO, b"a").unwrap();
    rig.hub.submit(0, 0, Nanos::ZERO, b"b").unwrap();
    assert_eq!(rig.hub.batches_outstanding(0), 1, "a partial batch waits for an idle worker");
    rig.hub.submit(0, 0, Nanos::ZERO, b"c").unwrap();
    assert_eq!(rig.hub.batches_outstanding(0), 2, "a full batch is sent ahead");
    rig.hub.submit(0, 0, Nanos::ZERO, b"d").unwrap();
    assert_eq!(rig.hub.batches_outstanding(0), 2, "d alone is a partial batch: it waits");
    rig.hub.submit(0, 0, Nanos::ZERO, b"e").unwrap();
    assert_eq!(rig.hub.batches_outstanding(0), 3);
    for _ in 0..4 {
        rig.hub.submit(0, 0, Nanos::ZERO, b"f").unwrap();
    }
    assert_eq!(rig.hub.batches_outstanding(0), pipeline_depth(2), "never more than the pipeline depth");
    // The worker goes through its batches without the hub polling in between.
    assert_eq!(rig.echo(0), 1);
    assert_eq!(rig.echo(0), 2);
    assert_eq!(rig.echo(0), 2);
    assert_eq!(rig.echo(0), 2);
    rig.poll();
    assert_eq!(rig.got.len(), 7);
    assert_eq!(rig.echo(0), 2, "the rest, once the hub polled");
}

#[test]
fn only_the_most_urgent_level_is_sent_ahead() {
    let mut cfg = config(vec![step(1, 1, 0, 20)]);
    cfg.priorities = 2;
    let mut rig = Rig::new(cfg);
    rig.hub.submit(0, 1, Nanos::ZERO, b"busy").unwrap();
    rig.hub.submit(0, 0, Nanos::ZERO, b"low").unwrap();
    assert_eq!(rig.hub.batches_outstanding(0), 1, "a low-priority task is not committed early");
    rig.hub.submit(0, 1, Nanos::ZERO, b"high").unwrap();
    assert_eq!(rig.hub.batches_outstanding(0), 1, "not while a lower level waits either");
}

#[test]
fn cancelling_a_task_sent_ahead_takes_its_batch_back() {
    let mut rig = Rig::new(config(vec![step(1, 2, 0, 20)]));
    rig.hub.submit(0, 0, Nanos::ZERO, b"first").unwrap();
    let keep = rig.hub.submit(0, 0, Nanos::ZERO, b"keep").unwrap();
    let drop = rig.hub.submit(0, 0, Nanos::ZERO, b"drop").unwrap();
    assert_eq!(rig.hub.batches_outstanding(0), 2);
    assert!(rig.hub.cancel(drop));
    assert_eq!(rig.hub.batches_outstanding(0), 1, "the batch sent ahead was taken back");
    assert_eq!(rig.echo(0), 1);
    assert_eq!(rig.echo(0), 0, "the worker skips the recalled batch");
    rig.poll();
    let lens = rig.work(0, |_, b| (Status::Ok, ROUTE_DONE, b.to_vec()));
    assert_eq!(lens, vec![4], "only 'keep' came back, the cancelled task never reached the worker");
    rig.poll();
    assert_eq!(rig.got.remove(&keep), Some(Got::Done(b"keep".to_vec())));
    assert!(!rig.got.contains_key(&drop));
}

#[test]
fn fail_all_reports_every_pending_task_once() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 20)]));
    let ids: Vec<u64> = (0..3).map(|_| rig.hub.submit(0, 0, Nanos::ZERO, b"x").unwrap()).collect();
    let mut stopped = Vec::new();
    rig.hub.fail_all(&mut |o| {
        if let Outcome::Failed { task_id, failure: Failure::Stopped } = o {
            stopped.push(task_id)
        }
    });
    stopped.sort();
    assert_eq!(stopped, ids);
    assert!(rig.hub.submit(0, 0, Nanos::ZERO, b"x").is_err());
}

#[test]
fn batches_failed_by_a_hard_stop_are_not_run_again_when_their_worker_dies() {
    // Found by the driver's property test: a dead worker's batches it never began went back to
    // the queue even after `fail_all` had answered for them, and ran (and were counted) twice.
    let mut rig = Rig::new(config(vec![step(2, 1, 0, 20)]));
    for _ in 0..4 {
        rig.hub.submit(0, 0, Nanos::ZERO, b"x").unwrap();
    }
    assert!(rig.hub.batches_outstanding(0) >= 2, "a batch was sent ahead to worker 0");
    let mut failed = 0;
    rig.hub.fail_all(&mut |o| failed += usize::from(matches!(o, Outcome::Failed { .. })));
    assert_eq!(failed, 4);
    let mut after = 0;
    rig.hub
        .worker_exited(0, &mut |o| after += usize::from(matches!(o, Outcome::Failed { .. } | Outcome::Done { .. })))
        .unwrap();
    assert_eq!(after, 0);
    assert_eq!(rig.hub.queue_len(0), 0, "nothing went back to the queue");
    assert_eq!(rig.echo(1), 1, "worker 1 finishes the batch it had");
    rig.poll();
    assert_eq!(rig.echo(1), 1, "and the one sent ahead to it");
    rig.poll();
    assert_eq!(rig.echo(1), 0, "but nothing of worker 0's");
    assert_eq!(rig.hub.in_flight(), 0);
    assert!(rig.got.is_empty(), "failed tasks report nothing more: {:?}", rig.got);
}

#[test]
fn a_stop_behind_a_full_window_of_the_largest_inline_batches_reaches_the_worker() {
    // A worker that is not a process is stopped by its stop record alone. With bodies of
    // exactly the inline limit, the batches sent ahead did not fit the ring (their own records
    // and the padding at the wrap were not budgeted): the last one was cut off mid-way and the
    // worker read the stop record where a task should be. A stop that finds no room waits
    // (`stop_pending`) rather than failing.
    let cfg = HubConfig { steps: vec![step(1, 1, 0, 10_000)], ring_capacity: 4096, ..HubConfig::default() };
    let mut rig = Rig::new(cfg);
    let mut sent = 0;
    // Bodies as large as the ring allows inline, so that the batches sent ahead fill it.
    let body = vec![7u8; rig.hub.inline_max(0)];
    while rig.hub.submit(0, 0, Nanos::ZERO, &body).is_ok() && sent < 200 {
        sent += 1;
        if rig.hub.batches_outstanding(0) >= pipeline_depth(1) {
            break;
        }
    }
    assert!(rig.hub.batches_outstanding(0) >= pipeline_depth(1), "a full window sent ahead");
    rig.hub.send_stop(0).unwrap();
    let mut stopped = false;
    for _ in 0..64 {
        let w = &mut rig.workers[0];
        match w.recv(Some(Duration::ZERO)).unwrap() {
            Received::Batch(n) => {
                for i in 0..n {
                    w.send_result(i, Status::Ok, ROUTE_DONE, b"").unwrap();
                }
                w.finish_batch().unwrap();
            }
            Received::Stop => {
                stopped = true;
                break;
            }
            Received::Timeout => {}
        }
        rig.poll();
    }
    assert!(stopped, "the worker got its stop record once it had made room");
}

#[test]
fn config_errors_name_the_problem() {
    let cases = [
        (config(vec![step(0, 1, 0, 1)]), "nprocs"),
        (config(vec![step(1, 0, 0, 1)]), "batch_size"),
        (config(vec![]), "at least one step"),
        (HubConfig { priorities: 0, ..config(vec![step(1, 1, 0, 1)]) }, "queue_priorities"),
    ];
    for (cfg, needle) in cases {
        let err = Hub::create_in_heap(&cfg, pool()).err().expect("invalid config accepted");
        assert!(err.to_string().contains(needle), "{err} should mention {needle}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Whatever the interleaving of submissions, worker progress, handler errors and worker
    /// deaths, every accepted task gets exactly one outcome, queues respect their bound, and
    /// batches respect batch_size.
    #[test]
    fn every_task_gets_exactly_one_outcome(
        ops in proptest::collection::vec((0u8..6, 0usize..4, 0u8..3), 1..200),
        nprocs in 1usize..3, batch_size in 1usize..5, cap in 1usize..8,
    ) {
        let mut cfg = config(vec![step(nprocs, batch_size, 0, cap), step(nprocs, batch_size, 0, cap)]);
        cfg.priorities = 3;
        let mut rig = Rig::new(cfg);
        let mut accepted = Vec::new();
        let slots = rig.hub.slot_count();
        for (op, arg, prio) in ops {
            match op {
                0 | 1 => {
                    if let Ok(id) = rig.hub.submit(arg % 2, prio, Nanos::ZERO, &[prio]) { accepted.push(id); }
                }
                2 | 3 => {
                    let slot = arg % slots;
                    let last = rig.hub.slot_step(slot) == 1;
                    let lens = rig.work(slot, |i, b| {
                        if b[0] == 2 && i == 0 { (Status::Error, ROUTE_DONE, vec![]) }
                        else if last { (Status::Ok, ROUTE_DONE, b.to_vec()) }
                        else { (Status::Ok, 1, b.to_vec()) }
                    });
                    prop_assert!(lens.len() <= batch_size);
                    rig.poll();
                }
                4 => rig.poll(),
                _ => {
                    let slot = arg % slots;
                    if rig.hub.slot_state(slot) != SlotState::Dead {
                        let got = &mut rig.got;
                        rig.hub.worker_exited(slot, &mut |o| match o {
                            Outcome::Failed { task_id, .. } => { assert!(got.insert(task_id, Got::Died(0)).is_none()); }
                            Outcome::Done { task_id, .. } => { assert!(got.insert(task_id, Got::Done(vec![])).is_none()); }
                            _ => {}
                        }).unwrap();
                        let mut w = worker(&mut rig.hub, slot, 1);
                        w.ready().unwrap();
                        rig.workers[slot] = w;
                        rig.poll();
                    }
                }
            }
            // The documented bound: submissions stop at `cap`; on top come tasks forwarded from
            // batches already running upstream and tasks handed back by a dead worker, at most
            // MAX_PIPELINE_DEPTH batches per worker.
            let bound = cap + (nprocs + 1) * batch_size * MAX_PIPELINE_DEPTH;
            for s in 0..2 {
                prop_assert!(rig.hub.queue_len(s) <= bound, "queue bound");
            }
        }
        // Drain: keep every worker working until nothing is in flight.
        let mut rounds = 0;
        while rig.hub.in_flight() > 0 {
            for slot in 0..slots {
                let last = rig.hub.slot_step(slot) == 1;
                rig.work(slot, |_, b| (Status::Ok, if last { ROUTE_DONE } else { 1 }, b.to_vec()));
            }
            rig.poll();
            rounds += 1;
            prop_assert!(rounds < 1000, "no progress");
        }
        let mut reported: Vec<u64> = rig.got.keys().copied().collect();
        reported.sort();
        accepted.sort();
        prop_assert_eq!(reported, accepted);
        prop_assert_eq!(rig.hub.arena().used_pages(), 0);
    }
}

#[test]
fn out_of_band_buffers_travel_by_reference_and_are_freed_once() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 20), step(1, 1, 0, 20)]));
    let arena = rig.hub.arena().clone();
    // The caller places a buffer in the pool and hands its reference to the task.
    let ext = arena.alloc(100_000).unwrap();
    arena.write(&ext, 0, &[7u8; 100_000]).unwrap();
    let buf = BufRef { head: ext.head, pages: ext.pages, offset: 10, len: 90_000 };
    let id = rig.hub.submit_with_bufs(0, 0, Nanos::ZERO, b"task", vec![buf]).unwrap();
    // Each step sees the same buffer, keeps it for its result (zero copy), and sends it on.
    for (slot, route) in [(0usize, 1u16), (1, ROUTE_DONE)] {
        let w = &mut rig.workers[slot];
        assert_eq!(w.recv(Some(Duration::ZERO)).unwrap(), Received::Batch(1));
        let seen = w.tasks()[0].bufs.clone();
        assert_eq!(seen, vec![buf]);
        w.arena().hold(&seen[0].extent()).unwrap(); // the reference the result carries
        w.send_result_with_bufs(0, Status::Ok, route, b"task", &seen).unwrap();
        w.finish_batch().unwrap();
        let mut done = Vec::new();
        rig.hub
            .poll(Nanos::now(), &mut |o| {
                if let Outcome::Done { task_id, bufs, .. } = o {
                    done.push((task_id, bufs));
                }
            })
            .unwrap();
        if route == ROUTE_DONE {
            assert_eq!(done, vec![(id, vec![buf])]);
        }
    }
    assert!(arena.used_pages() > 0, "the caller now owns the result's reference");
    assert!(arena.unhold(&ext).unwrap(), "and it was the last one");
    assert_eq!(arena.used_pages(), 0);
}

#[test]
fn a_dead_workers_references_are_reaped() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 20)]));
    let arena = rig.hub.arena().clone();
    let ext = arena.alloc(10_000).unwrap();
    rig.hub.submit_with_bufs(0, 0, Nanos::ZERO, b"t", vec![BufRef::whole(ext)]).unwrap();
    {
        let w = &mut rig.workers[0];
        assert_eq!(w.recv(Some(Duration::ZERO)).unwrap(), Received::Batch(1));
        w.arena().hold(&ext).unwrap(); // a view the handler keeps
        w.alloc(50_000).unwrap(); // an output it never sends
    }
    let mut died = 0;
    rig.hub.worker_exited(0, &mut |o| died += usize::from(matches!(o, Outcome::Failed { .. }))).unwrap();
    assert_eq!(died, 1);
    assert_eq!(arena.used_pages(), 0, "the task's buffer, the worker's view and its lost output are all freed");
}

#[test]
fn every_batch_sent_ahead_to_a_hung_worker_goes_to_one_that_falls_idle() {
    let mut rig = Rig::new(config(vec![step(2, 1, 0, 40)]));
    let first = rig.hub.submit(0, 0, Nanos::ZERO, b"hangs").unwrap();
    let hung = if rig.hub.held_by(0) == vec![first] { 0 } else { 1 };
    let other = 1 - hung;
    // The hung worker begins its batch and never finishes it.
    assert_eq!(rig.workers[hung].recv(Some(Duration::ZERO)).unwrap(), Received::Batch(1));
    let ids: Vec<u64> = (0..20).map(|i| rig.hub.submit(0, 0, Nanos::ZERO, &[i]).unwrap()).collect();
    assert!(rig.hub.batches_outstanding(hung) > 2, "batches were sent ahead to the hung worker");
    // The other worker goes through everything, including what was sent ahead to the hung one.
    for _ in 0..200 {
        if ids.iter().all(|id| rig.got.contains_key(id)) {
            break;
        }
        rig.echo(other);
        rig.poll();
    }
    assert!(ids.iter().all(|id| rig.got.contains_key(id)), "{} of 20 done", rig.got.len());
    assert_eq!(rig.hub.held_by(hung), vec![first], "the hung worker keeps only the batch it runs");
}

/// Found in review: the doorbell's stamp of a ring made while the owner was polling (not asleep)
/// was later read as a wake-up of hundreds of µs, and the owner's spin budget grew to its cap on
/// any host. Resuming polling drops the stamp and lowers the flag.
#[test]
fn the_owner_resuming_drops_a_doorbell_stamp_and_lowers_the_flag() {
    let mut hub = Hub::create_in_heap(&config(vec![step(1, 1, 0, 16)]), pool()).unwrap();
    assert!(hub.prepare_sleep(), "nothing pending: the owner may sleep");
    let region = hub.region().clone();
    let layout = *hub.layout();
    assert_eq!(layout.doorbell_waiting(&region).load(std::sync::atomic::Ordering::SeqCst), 1);
    layout.doorbell_rung_at(&region).store(Nanos::now().0, std::sync::atomic::Ordering::Release);
    hub.resumed();
    assert_eq!(layout.doorbell_waiting(&region).load(std::sync::atomic::Ordering::SeqCst), 0, "workers stop ringing");
    assert_eq!(
        layout.doorbell_rung_at(&region).load(std::sync::atomic::Ordering::Acquire),
        0,
        "the stamp measured no wake-up"
    );
}

/// Found with the HTTP front, whose poller runs on its own thread: a replacement's ready
/// record was read before the front end registered the process, and the slot then stayed
/// `Starting` for ever (its tasks timed out). The ready report is kept until registration.
#[test]
fn a_replacement_ready_before_it_is_registered_is_given_work() {
    let mut rig = Rig::new(config(vec![step(1, 1, 0, 16)]));
    rig.hub.worker_exited(0, &mut |_| {}).unwrap();
    assert_eq!(rig.hub.slot_state(0), SlotState::Dead);
    let index = rig.hub.arena().reserve_index().expect("a free process index");
    let arena = Arc::new(rig.hub.arena().as_process(index));
    let mut replacement = WorkerEndpoint::attach(rig.hub.region().clone(), arena, 0, Doorbell::new().unwrap()).unwrap();
    replacement.set_spin(SpinPolicy::NONE);
    replacement.ready().unwrap();
    rig.poll(); // the ready record, read before registration
    rig.hub.worker_spawned(0, 2000, index);
    assert_eq!(rig.hub.slot_state(0), SlotState::Idle);
    rig.hub.submit(0, 0, Nanos::ZERO, b"t").unwrap();
    assert_eq!(replacement.recv(Some(Duration::ZERO)).unwrap(), Received::Batch(1));
}
