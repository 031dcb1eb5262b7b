//! Ports end to end in one process: the test plays the engine's owner, the workers and a port
//! client (a web worker sharing the flow).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use aqueduct_core::hub::{Doorbell, HubConfig, Outcome, Payload, StepSpec};
use aqueduct_core::message::{Status, ROUTE_DONE};
use aqueduct_core::port::{EnginePort, FailureKind, PortClient, Response, NO_STEP};
use aqueduct_core::shm::event::SpinPolicy;
use aqueduct_core::shm::{Arena, ArenaLayout, BufRef};
use aqueduct_core::{Engine, Nanos, Received, WorkerEndpoint};

fn step(batch_size: usize, cap: usize) -> StepSpec {
    StepSpec { nprocs: 1, batch_size, batch_timeout: Duration::ZERO, queue_capacity: cap, handle_timeout: None }
}

/// What a client saw, owned.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Done(u64, Vec<u8>, Vec<BufRef>),
    Part(u64, Vec<u8>, Vec<BufRef>),
    Failed(u64, FailureKind, u16, Vec<u8>),
}

struct Rig {
    engine: Engine,
    workers: Vec<WorkerEndpoint>,
    client: PortClient,
    port: usize,
    /// Outcomes the engine's owner received (tasks of its own, worker events).
    owner_saw: usize,
}

fn dup(fd: std::os::fd::BorrowedFd<'_>) -> Doorbell {
    Doorbell::from_fd(fd.try_clone_to_owned().unwrap())
}

impl Rig {
    fn new(steps: Vec<StepSpec>, port_capacity: usize) -> Self {
        let pool = Arc::new(Arena::create_in_heap(ArenaLayout::new(8 << 20, 4096, 16), u64::MAX).unwrap());
        let cfg = HubConfig { steps, ring_capacity: 64 << 10, ..HubConfig::default() };
        let mut engine = Engine::new(&cfg, pool.clone()).unwrap();
        let mut workers = Vec::new();
        for slot in 0..engine.hub.slot_count() {
            let index = pool.reserve_index().unwrap();
            let arena = Arc::new(pool.as_process(index));
            let region = engine.hub.region().clone();
            let mut w = WorkerEndpoint::attach(region, arena, slot, dup(engine.doorbell_fd())).unwrap();
            w.set_spin(SpinPolicy::NONE);
            engine.worker_spawned(slot, std::process::id(), index).unwrap();
            w.ready().unwrap();
            workers.push(w);
        }
        let client_index = pool.reserve_index().unwrap();
        let port = engine.add_port(EnginePort::create_in_heap(port_capacity, client_index).unwrap()).unwrap();
        let p = engine.port(port).unwrap();
        let client = PortClient::attach(
            p.region().clone(),
            Arc::new(pool.as_process(client_index)),
            dup(engine.doorbell_fd()),
            dup(p.bell().fd()),
        )
        .unwrap();
        let mut rig = Rig { engine, workers, client, port, owner_saw: 0 };
        rig.poll();
        rig.owner_saw = 0; // the workers' ready events
        rig
    }

    fn pool(&self) -> Arc<Arena> {
        self.engine.hub.arena().clone()
    }

    fn poll(&mut self) {
        let mut saw = 0;
        self.engine.poll(&mut |_o: Outcome<'_>| saw += 1).unwrap();
        self.owner_saw += saw;
    }

    /// Worker `slot` answers every task of its batch with `f(body)`; returns how many.
    fn work(&mut self, slot: usize, f: impl Fn(&[u8]) -> (Status, Vec<u8>)) -> usize {
        let w = &mut self.workers[slot];
        match w.recv(Some(Duration::ZERO)).unwrap() {
            Received::Batch(n) => {
                for i in 0..n {
                    let mut body = Vec::new();
                    w.read_body(i, &mut body).unwrap();
                    let (status, out) = f(&body);
                    w.send_result(i, status, ROUTE_DONE, &out).unwrap();
                }
                w.finish_batch().unwrap();
                n
            }
            _ => 0,
        }
    }

    fn responses(&mut self) -> Vec<Got> {
        let arena = self.client.arena().clone();
        let read = |p: Payload<'_>| match p {
            Payload::Inline(b) => b.to_vec(),
            Payload::Extent(e) => {
                let mut v = vec![0; e.len as usize];
                arena.read(&e, 0, &mut v).unwrap();
                arena.unhold(&e).unwrap();
                v
            }
        };
        let mut got = Vec::new();
        self.client
            .poll(&mut |r| {
                got.push(match r {
                    Response::Done { task_id, body, bufs } => Got::Done(task_id, read(body), bufs),
                    Response::Part { task_id, body, bufs } => Got::Part(task_id, read(body), bufs),
                    Response::Failed { task_id, kind, step, detail, .. } => {
                        Got::Failed(task_id, kind, step, detail.map(read).unwrap_or_default())
                    }
                })
            })
            .unwrap();
        got
    }
}

#[test]
fn tasks_from_a_port_run_and_their_results_go_back_to_it_not_to_the_owner() {
    let mut rig = Rig::new(vec![step(4, 20)], 64 << 10);
    for id in [7u64, 8, 9] {
        assert!(rig.client.submit(id, 0, 0, Nanos::ZERO, format!("t{id}").as_bytes(), &[], false).unwrap());
    }
    rig.client.flush();
    rig.poll();
    assert_eq!(rig.engine.hub.in_flight(), 3);
    let mut got = Vec::new();
    for _ in 0..5 {
        rig.work(0, |b| (Status::Ok, [b, b"!"].concat()));
        rig.poll();
        got.extend(rig.responses());
    }
    assert_eq!(rig.owner_saw, 0, "the owner never sees a port's tasks");
    assert_eq!(
        got,
        vec![
            Got::Done(7, b"t7!".to_vec(), vec![]),
            Got::Done(8, b"t8!".to_vec(), vec![]),
            Got::Done(9, b"t9!".to_vec(), vec![])
        ]
    );
    assert_eq!(rig.engine.hub.in_flight(), 0);
    // The engine counts a port's calls where the owner's driver counts its own.
    let counts = rig.engine.port_counts().by_priority();
    assert_eq!(counts[0][aqueduct_core::metrics::CallEnd::Complete as usize], 3);
}

#[test]
fn large_bodies_and_buffers_move_by_reference_and_end_in_the_clients_row() {
    let mut rig = Rig::new(vec![step(1, 20)], 64 << 10);
    let pool = rig.pool();
    let client_arena = rig.client.arena().clone();
    let big = vec![3u8; 300_000];
    let buf_ext = client_arena.alloc(200_000).unwrap();
    client_arena.write(&buf_ext, 0, &[5u8; 200_000]).unwrap();
    let buf = BufRef::whole(buf_ext);
    assert!(rig.client.submit(1, 0, 0, Nanos::ZERO, &big, &[buf], false).unwrap());
    rig.client.flush();
    rig.poll();
    assert_eq!(client_arena.holds_of(client_arena.me(), buf.head), 0, "the engine adopted the request's buffer");
    {
        let w = &mut rig.workers[0];
        assert_eq!(w.recv(Some(Duration::ZERO)).unwrap(), Received::Batch(1));
        assert_eq!(w.tasks()[0].bufs, vec![buf]);
        let mut body = Vec::new();
        w.read_body(0, &mut body).unwrap();
        assert_eq!(body, big);
        w.arena().hold(&buf.extent()).unwrap();
        w.send_result_with_bufs(0, Status::Ok, ROUTE_DONE, &body, &[buf]).unwrap();
        w.finish_batch().unwrap();
    }
    rig.poll();
    assert_eq!(client_arena.holds_of(client_arena.me(), buf.head), 1, "the result's buffer is the client's");
    let got = rig.responses();
    assert_eq!(got, vec![Got::Done(1, big, vec![buf])]);
    client_arena.unhold(&buf.extent()).unwrap();
    assert_eq!(pool.used_pages(), 0, "nothing left in the pool");
}

#[test]
fn failures_reach_the_client_with_their_kind() {
    let mut rig = Rig::new(vec![step(1, 20)], 64 << 10);
    rig.client.submit(1, 0, 0, Nanos::ZERO, b"boom", &[], false).unwrap();
    rig.client.submit(2, 5, 0, Nanos::ZERO, b"no such step", &[], false).unwrap();
    rig.client.submit(3, 0, 0, Nanos(1), b"expired long ago", &[], false).unwrap();
    rig.client.flush();
    rig.poll();
    rig.work(0, |_| (Status::Error, b"pickled error".to_vec()));
    rig.poll();
    let mut got = rig.responses();
    got.sort_by_key(|g| match g {
        Got::Done(id, ..) | Got::Part(id, ..) | Got::Failed(id, ..) => *id,
    });
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], Got::Failed(1, FailureKind::Handler, 0, b"pickled error".to_vec()));
    assert!(
        matches!(&got[1], Got::Failed(2, FailureKind::Rejected, NO_STEP, why) if String::from_utf8_lossy(why).contains("no step 5"))
    );
    assert_eq!(got[2], Got::Failed(3, FailureKind::Expired, 0, vec![]));
    assert_eq!(rig.engine.hub.in_flight(), 0);
}

#[test]
fn requests_wait_in_the_ring_while_their_queue_is_full_without_busy_polling() {
    let mut rig = Rig::new(vec![step(1, 2)], 64 << 10);
    for id in 0..30 {
        assert!(rig.client.submit(id, 0, 0, Nanos::ZERO, b"x", &[], false).unwrap());
    }
    rig.client.flush();
    rig.poll();
    // Batches went to the worker (some ahead of time) until the step held its bound of waiting
    // tasks; the rest wait in the port's ring.
    assert_eq!(rig.engine.hub.waiting(0), 2);
    assert!(rig.engine.hub.in_flight() < 30);
    assert!(rig.engine.prepare_sleep(), "waiting requests do not keep the engine awake");
    let mut answered = 0;
    for _ in 0..100 {
        rig.work(0, |b| (Status::Ok, b.to_vec()));
        rig.poll();
        answered += rig.responses().len();
    }
    assert_eq!(answered, 30, "every request ran once room was made");
}

#[test]
fn cancelled_tasks_are_dropped_and_a_closed_port_leaves_nothing_behind() {
    let mut rig = Rig::new(vec![step(1, 20)], 64 << 10);
    let pool = rig.pool();
    let client_arena = rig.client.arena().clone();
    for id in 0..4 {
        let ext = client_arena.alloc(100_000).unwrap();
        rig.client.submit(id, 0, 0, Nanos::ZERO, b"x", &[BufRef::whole(ext)], false).unwrap();
    }
    rig.client.cancel(3).unwrap();
    rig.client.flush();
    rig.poll();
    assert_eq!(rig.engine.hub.in_flight(), 3, "the cancelled task left");
    // The client dies with a result on its way and a reference of its own.
    let _kept = client_arena.alloc(10_000).unwrap();
    rig.work(0, |b| (Status::Ok, b.to_vec()));
    rig.poll();
    let index = rig.engine.close_port(rig.port).unwrap();
    assert_eq!(rig.engine.hub.in_flight(), 0, "its tasks in flight were cancelled");
    // The worker still answers for batches it had begun; the hub drops those answers.
    for _ in 0..10 {
        rig.poll();
        rig.work(0, |b| (Status::Ok, b.to_vec()));
    }
    rig.poll();
    pool.reap(index);
    pool.release_index(index);
    assert_eq!(pool.used_pages(), 0, "requests, responses and the client's own pages are all freed");
    assert_eq!(rig.engine.port_count(), 0);
}

#[test]
fn each_side_rings_the_other_only_when_it_sleeps() {
    let mut rig = Rig::new(vec![step(1, 20)], 64 << 10);
    let readable = |fd: std::os::fd::BorrowedFd<'_>| {
        let mut pfd = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        rustix::event::poll(&mut pfd, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })).unwrap() == 1
    };
    rig.poll();
    // The engine is awake: a request does not ring.
    rig.client.submit(1, 0, 0, Nanos::ZERO, b"a", &[], false).unwrap();
    rig.client.flush();
    assert!(!readable(rig.engine.fd()));
    rig.poll();
    // The engine sleeps: the next request rings its doorbell.
    rig.work(0, |b| (Status::Ok, b.to_vec()));
    rig.poll();
    assert!(rig.engine.prepare_sleep());
    rig.client.submit(2, 0, 0, Nanos::ZERO, b"b", &[], false).unwrap();
    rig.client.flush();
    assert!(readable(rig.engine.fd()), "a sleeping engine is woken by a client");
    rig.poll();
    rig.work(0, |b| (Status::Ok, b.to_vec()));
    // The client sleeps (its normal state): the response rings its bell.
    let bell = rig.engine.port(rig.port).unwrap().bell().fd().try_clone_to_owned().unwrap();
    rig.responses();
    assert!(rig.client.prepare_sleep());
    rig.poll();
    assert!(readable(bell.as_fd()), "a sleeping client is woken by a response");
    assert_eq!(rig.responses().len(), 1);
}

#[test]
fn responses_that_do_not_fit_wait_in_the_engine_until_the_client_makes_room() {
    // The smallest rings: a few responses fill the response ring.
    let mut rig = Rig::new(vec![step(1, 200)], 256);
    let body = vec![1u8; 60];
    let mut sent = 0u64;
    let mut got = Vec::new();
    for round in 0..1000 {
        if got.len() == 60 {
            break;
        }
        while sent < 60 && rig.client.submit(sent, 0, 0, Nanos::ZERO, &body, &[], false).unwrap() {
            sent += 1;
        }
        rig.client.flush();
        rig.poll();
        rig.work(0, |b| (Status::Ok, b.to_vec()));
        rig.poll();
        // The client reads only every third round: the engine keeps what does not fit.
        if round % 3 == 2 {
            got.extend(rig.responses());
        }
    }
    got.extend(rig.responses());
    rig.poll();
    got.extend(rig.responses());
    let ids: Vec<u64> = got
        .iter()
        .map(|g| match g {
            Got::Done(id, b, _) => {
                assert_eq!(b, &body);
                *id
            }
            Got::Failed(id, kind, ..) => panic!("task {id} failed: {kind:?}"),
            Got::Part(id, ..) => panic!("task {id} does not stream"),
        })
        .collect();
    assert_eq!(ids, (0..60).collect::<Vec<_>>(), "every response, once, in order");
}

fn readable(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut pfd = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    rustix::event::poll(&mut pfd, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })).unwrap() == 1
}

#[test]
fn every_response_gets_out_when_each_side_only_runs_on_wake_ups() {
    // The smallest rings, and an engine owner and a client that, like event loops, run only
    // when their descriptor is readable and go back to sleep properly: a lost wake-up stalls.
    let mut rig = Rig::new(vec![step(4, 500)], 256);
    let bell = rig.engine.port(rig.port).unwrap().bell().fd().try_clone_to_owned().unwrap();
    // Small requests (4 fit in the ring), large responses (2 fit): most responses wait in the
    // engine until the client has made room, again and again.
    let body = vec![1u8; 8];
    let total = 200u64;
    let (mut sent, mut got) = (0u64, Vec::new());
    rig.poll();
    while !rig.engine.prepare_sleep() {
        rig.poll();
    }
    for _ in 0..20_000 {
        if got.len() as u64 == total {
            break;
        }
        // The client: submit what fits; read responses when its bell rings.
        let before = sent;
        while sent < total && rig.client.submit(sent, 0, 0, Nanos::ZERO, &body, &[], false).unwrap() {
            sent += 1;
        }
        if sent > before {
            rig.client.flush();
        }
        if readable(bell.as_fd()) {
            loop {
                got.extend(rig.responses());
                if rig.client.prepare_sleep() {
                    break;
                }
            }
        }
        // The engine's owner: poll when the engine's descriptor is readable, then sleep.
        if readable(rig.engine.fd()) {
            rig.poll();
            while !rig.engine.prepare_sleep() {
                rig.poll();
            }
        }
        // The worker: it blocks on its ring in real life; here it answers what it has.
        rig.work(0, |b| (Status::Ok, b.repeat(9)));
    }
    let ids: Vec<u64> = got
        .iter()
        .map(|g| match g {
            Got::Done(id, ..) => *id,
            Got::Failed(id, kind, ..) => panic!("task {id} failed: {kind:?}"),
            Got::Part(id, ..) => panic!("task {id} does not stream"),
        })
        .collect();
    assert_eq!(ids, (0..total).collect::<Vec<_>>(), "every response, once, in order");
}

/// One round of a caller's test: the engine takes what the port sent, every worker answers its
/// batch with the bodies unchanged, the engine sends the results to the port.
fn echo_round(engine: &mut Engine, workers: &mut [WorkerEndpoint]) {
    engine.poll(&mut |_| {}).unwrap();
    for w in workers.iter_mut() {
        if let Received::Batch(n) = w.recv(Some(Duration::ZERO)).unwrap() {
            for i in 0..n {
                let mut body = Vec::new();
                w.read_body(i, &mut body).unwrap();
                w.send_result(i, Status::Ok, ROUTE_DONE, &body).unwrap();
            }
            w.finish_batch().unwrap();
        }
    }
    engine.poll(&mut |_| {}).unwrap();
}

#[test]
fn a_callers_calls_get_one_answer_each_through_a_full_ring_deadlines_and_cancels() {
    use aqueduct_core::caller::{Answer, Caller};
    // A small request ring: most submissions wait in the caller's backlog at first.
    let Rig { mut engine, mut workers, client, .. } = Rig::new(vec![step(4, 20)], 4096);
    let mut caller: Caller<u64> = Caller::new(client);
    let far = Nanos::now().saturating_add(Duration::from_secs(3600));
    let mut ids = Vec::new();
    for token in 0..200u64 {
        // Every fifth call's deadline has passed already: it must time out, never run twice.
        let deadline = if token % 5 == 0 { Nanos(1) } else { far };
        ids.push(caller.submit(token, 0, 0, deadline, &[token as u8; 64], Vec::new(), false).unwrap());
    }
    let mut cancelled = Vec::new();
    for token in (3..200u64).step_by(7) {
        if caller.cancel(ids[token as usize]) {
            cancelled.push(token);
        }
    }
    caller.flush();
    let mut answered: HashMap<u64, &str> = HashMap::new();
    for _ in 0..2000 {
        if caller.pending() == 0 {
            break;
        }
        caller
            .poll(Nanos::now(), &mut |a| {
                let (token, what) = match a {
                    Answer::Done { call, .. } => (call, "done"),
                    Answer::Failed { call, .. } => (call, "failed"),
                    Answer::TimedOut { call } => (call, "timed out"),
                    Answer::Lost { call } => (call, "lost"),
                    Answer::Part { .. } => unreachable!("no call streams"),
                };
                assert!(answered.insert(token, what).is_none(), "call {token} answered twice");
            })
            .unwrap();
        echo_round(&mut engine, &mut workers);
    }
    assert_eq!(caller.pending(), 0);
    for token in 0..200u64 {
        let got = answered.get(&token).copied();
        if cancelled.contains(&token) {
            assert_eq!(got, None, "a cancelled call is never answered");
        } else if token % 5 == 0 {
            assert_eq!(got, Some("timed out"), "call {token}");
        } else {
            assert_eq!(got, Some("done"), "call {token}");
        }
    }
}

#[test]
fn a_backlogged_call_that_cannot_be_sent_fails_alone_and_the_others_go_on() {
    use aqueduct_core::caller::{Answer, Caller};
    // A small request ring: most submissions wait in the caller's backlog.
    let Rig { mut engine, mut workers, client, .. } = Rig::new(vec![step(4, 20)], 4096);
    let mut caller: Caller<u64> = Caller::new(client);
    let far = Nanos::now().saturating_add(Duration::from_secs(3600));
    for token in 0..100u64 {
        caller.submit(token, 0, 0, far, &[token as u8; 64], Vec::new(), false).unwrap();
    }
    // Larger than the whole pool (8 MiB): accepted into the backlog, it can never be sent.
    caller.submit(100, 0, 0, far, &vec![7u8; 16 << 20], Vec::new(), false).unwrap();
    for token in 101..120u64 {
        caller.submit(token, 0, 0, far, &[token as u8; 64], Vec::new(), false).unwrap();
    }
    caller.flush();
    let mut answered: HashMap<u64, &str> = HashMap::new();
    for _ in 0..2000 {
        if caller.pending() == 0 {
            break;
        }
        caller
            .poll(Nanos::now(), &mut |a| {
                let (token, what) = match a {
                    Answer::Done { call, .. } => (call, "done"),
                    Answer::Failed { call, kind: FailureKind::ArenaExhausted, .. } => (call, "no memory"),
                    Answer::Failed { call, .. } => (call, "failed"),
                    Answer::TimedOut { call } => (call, "timed out"),
                    Answer::Lost { call } => (call, "lost"),
                    Answer::Part { .. } => unreachable!("no call streams"),
                };
                assert!(answered.insert(token, what).is_none(), "call {token} answered twice");
            })
            .expect("a call that cannot be sent fails that call, not the poll");
        echo_round(&mut engine, &mut workers);
    }
    assert_eq!(caller.pending(), 0, "every call answered");
    for token in 0..120u64 {
        let expected = if token == 100 { "no memory" } else { "done" };
        assert_eq!(answered.get(&token).copied(), Some(expected), "call {token}");
    }
}

#[test]
fn a_call_refused_by_the_caller_gives_its_token_back_with_the_reason() {
    use aqueduct_core::caller::Caller;
    // Found in review: the Rust client dropped the token of a call it could not send, and its
    // caller saw "not running" instead of "no shared memory".
    let Rig { client, .. } = Rig::new(vec![step(4, 20)], 64 << 10);
    let mut caller: Caller<&str> = Caller::new(client);
    let too_big = vec![0u8; 16 << 20]; // the rig's pool holds 8 MiB
    let refused = caller.submit("mine", 0, 0, Nanos::ZERO, &too_big, Vec::new(), false).unwrap_err();
    assert_eq!(refused.call, "mine");
    assert!(matches!(refused.error, aqueduct_core::EngineError::ArenaExhausted { .. }), "{:?}", refused.error);
    assert_eq!(caller.pending(), 0);
}

#[test]
fn a_streaming_task_sends_its_parts_to_its_port_whose_client_opens_only_its_own_window() {
    use aqueduct_core::stream::STREAM_WINDOW;
    use aqueduct_core::worker::PartSent;

    let mut rig = Rig::new(vec![step(2, 20)], 64 << 10);
    assert!(rig.client.submit(1, 0, 0, Nanos::ZERO, b"streamed", &[], true).unwrap());
    assert!(rig.client.submit(2, 0, 0, Nanos::ZERO, b"plain", &[], false).unwrap());
    rig.client.flush();
    rig.poll();
    let mut worker = rig.workers.remove(0);
    assert!(matches!(worker.recv(Some(Duration::from_secs(5))).unwrap(), Received::Batch(1)));
    assert_eq!(worker.stream_state(0), (true, false));
    for n in 0..STREAM_WINDOW {
        assert!(matches!(worker.send_part(0, format!("part {n}").as_bytes(), &[]).unwrap(), PartSent::Sent));
    }
    rig.poll();
    let parts: Vec<_> = rig.responses();
    let expected: Vec<_> =
        (0..STREAM_WINDOW).map(|n| Got::Part(1, format!("part {n}").into_bytes(), Vec::new())).collect();
    assert_eq!(parts, expected, "the parts went to the port, in order");
    assert_eq!(rig.owner_saw, 0, "none reached the engine's owner");

    // The window is full: the next part waits for the client's caller.
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let sender = std::thread::spawn(move || {
        let sent = worker.send_part(0, b"one more", &[]).unwrap();
        sent_tx.send(matches!(sent, PartSent::Sent)).unwrap();
        worker
    });
    // Parts taken of another task (one that does not stream, one that does not exist) open
    // nothing: the client names its tasks, and the engine gives back only receipts it holds.
    assert!(rig.client.part_taken(2).unwrap());
    assert!(rig.client.part_taken(99).unwrap());
    rig.client.flush();
    rig.poll();
    assert!(sent_rx.recv_timeout(Duration::from_millis(200)).is_err(), "the window opened for another task");
    assert!(rig.client.part_taken(1).unwrap());
    rig.client.flush();
    rig.poll();
    assert!(sent_rx.recv_timeout(Duration::from_secs(10)).unwrap(), "the part taken opened the window");
    let mut worker = sender.join().unwrap();
    worker.send_result(0, Status::Ok, ROUTE_DONE, b"done").unwrap();
    worker.finish_batch().unwrap();
    rig.poll();
    assert_eq!(
        rig.responses(),
        vec![Got::Part(1, b"one more".to_vec(), Vec::new()), Got::Done(1, b"done".to_vec(), Vec::new())]
    );
    // The task that does not stream: its parts are dropped in the worker.
    assert!(matches!(worker.recv(Some(Duration::from_secs(5))).unwrap(), Received::Batch(1)));
    assert_eq!(worker.stream_state(0), (false, false));
    assert!(matches!(worker.send_part(0, b"dropped", &[]).unwrap(), PartSent::NotStreamed));
    worker.send_result(0, Status::Ok, ROUTE_DONE, b"plain done").unwrap();
    worker.finish_batch().unwrap();
    rig.workers.insert(0, worker);
    rig.poll();
    assert_eq!(rig.responses(), vec![Got::Done(2, b"plain done".to_vec(), Vec::new())]);
}
