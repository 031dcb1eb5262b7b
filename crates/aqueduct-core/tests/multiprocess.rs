//! The engine across real processes: the test binary re-executes itself as the workers.
//!
//! Runs without the libtest harness so that it controls its process (workers are spawned from a
//! single-threaded parent, and a watchdog kills everything if a case hangs). Each case has a
//! deadline; a case that misses it fails instead of hanging.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqueduct_core::hub::{Doorbell, Failure, HubConfig, Outcome, Payload, StepSpec};
use aqueduct_core::message::{Status, ROUTE_DONE};
use aqueduct_core::shm::fd::{adopt_inherited, set_inheritable};
use aqueduct_core::shm::{Arena, ArenaLayout, SharedRegion};
use aqueduct_core::{Engine, Nanos, Received, WorkerEndpoint};

const ROLE: &str = "AQ_TEST_ROLE";

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        worker_main(&role);
        return;
    }
    // A hard stop for the whole binary: if a case deadlocks outside our deadline checks, fail
    // loudly instead of hanging CI. Workers die with us (PR_SET_PDEATHSIG).
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        eprintln!("multiprocess tests: watchdog expired");
        std::process::exit(2);
    });
    let cases: &[(&str, fn())] = &[
        ("round_trips_through_worker_processes", round_trips_through_worker_processes),
        ("large_payloads_cross_processes_through_the_arena", large_payloads_cross_processes_through_the_arena),
        ("sigkill_mid_batch_fails_only_held_tasks", sigkill_mid_batch_fails_only_held_tasks),
        ("two_steps_with_a_handler_error", two_steps_with_a_handler_error),
    ];
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mut failed = 0;
    for (name, case) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let t = Instant::now();
        let ok = std::panic::catch_unwind(case).is_ok();
        println!("test {name} ... {} ({:.2?})", if ok { "ok" } else { "FAILED" }, t.elapsed());
        failed += usize::from(!ok);
    }
    if failed > 0 {
        println!("{failed} multiprocess case(s) failed");
        std::process::exit(1);
    }
}

/// What a worker process does with each task.
fn worker_main(role: &str) {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).unwrap();
    let env = |k: &str| std::env::var(k).unwrap().parse::<i32>().unwrap();
    let region = Arc::new(SharedRegion::attach(adopt_inherited(env("AQ_REGION_FD")).unwrap()).unwrap());
    let doorbell = Doorbell::from_fd(adopt_inherited(env("AQ_DOORBELL_FD")).unwrap());
    let pool = Arc::new(SharedRegion::attach(adopt_inherited(env("AQ_POOL_FD")).unwrap()).unwrap());
    let arena = Arc::new(Arena::attach(pool, env("AQ_POOL_INDEX") as u32).unwrap());
    let mut w = WorkerEndpoint::attach(region, arena, env("AQ_SLOT") as usize, doorbell).unwrap();
    w.ready().unwrap();
    let mut body = Vec::new();
    loop {
        match w.recv(None).unwrap() {
            Received::Stop => return,
            Received::Timeout => continue,
            Received::Batch(n) => {
                for i in 0..n {
                    w.read_body(i, &mut body).unwrap();
                    let route = w.tasks()[i].header.route;
                    match role {
                        "echo" => w.send_result(i, Status::Ok, ROUTE_DONE, &body).unwrap(),
                        // Step 0 appends its mark and forwards; step 1 fails on "bad".
                        "two_step" if route == 0 => {
                            w.send_result(i, Status::Ok, 1, &[&body[..], b"+s0"].concat()).unwrap()
                        }
                        "two_step" if body.starts_with(b"bad") => {
                            w.send_result(i, Status::Error, ROUTE_DONE, b"ValueError: bad input").unwrap()
                        }
                        "two_step" => w.send_result(i, Status::Ok, ROUTE_DONE, &[&body[..], b"+s1"].concat()).unwrap(),
                        // Answers a "stall" task visibly, then stalls: the test kills it mid-batch.
                        "stall" => {
                            w.send_result(i, Status::Ok, ROUTE_DONE, &body).unwrap();
                            if body.starts_with(b"stall") {
                                w.flush();
                                std::thread::sleep(Duration::from_secs(60));
                            }
                        }
                        other => panic!("unknown role {other}"),
                    }
                }
                w.finish_batch().unwrap();
            }
        }
    }
}

struct Flow {
    engine: Engine,
    pool: Arc<Arena>,
    children: HashMap<usize, Child>,
}

impl Flow {
    fn new(steps: Vec<StepSpec>) -> Self {
        let cfg = HubConfig { steps, ring_capacity: 256 << 10, ..HubConfig::default() };
        let pool = Arc::new(Arena::create(ArenaLayout::new(64 << 20, 1 << 16, 16), 16 << 20).unwrap());
        Self { engine: Engine::new(&cfg, pool.clone()).unwrap(), pool, children: HashMap::new() }
    }

    fn spawn(&mut self, slot: usize, role: &str) {
        let region_fd = self.engine.region_fd();
        let doorbell_fd = self.engine.doorbell_fd();
        let pool_fd = self.pool.region().fd().unwrap();
        let index = self.pool.reserve_index().unwrap();
        for fd in [region_fd, doorbell_fd, pool_fd] {
            set_inheritable(fd, true).unwrap();
        }
        let child = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, role)
            .env("AQ_REGION_FD", region_fd.as_raw_fd().to_string())
            .env("AQ_DOORBELL_FD", doorbell_fd.as_raw_fd().to_string())
            .env("AQ_POOL_FD", pool_fd.as_raw_fd().to_string())
            .env("AQ_POOL_INDEX", index.to_string())
            .env("AQ_SLOT", slot.to_string())
            .spawn()
            .unwrap();
        for fd in [self.engine.region_fd(), self.engine.doorbell_fd(), self.pool.region().fd().unwrap()] {
            set_inheritable(fd, false).unwrap();
        }
        self.engine.worker_spawned(slot, child.id(), index).unwrap();
        self.children.insert(slot, child);
    }

    /// Drives the engine until `done` or the deadline; returns every outcome seen.
    fn run_until(&mut self, deadline: Duration, done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
        let mut events = Vec::new();
        self.run_more(&mut events, deadline, done);
        events
    }

    /// Like `run_until`, appending to (and judging) everything already in `events`.
    fn run_more(&mut self, events: &mut Vec<Event>, deadline: Duration, mut done: impl FnMut(&[Event]) -> bool) {
        let end = Instant::now() + deadline;
        while !done(events) {
            assert!(Instant::now() < end, "deadline passed; events so far: {}", events.len());
            let arena = self.pool.clone();
            self.engine.wait(Some(Duration::from_millis(100)), &mut |o| events.push(Event::from(o, &arena))).unwrap();
        }
    }

    fn submit(&mut self, body: &[u8]) -> u64 {
        self.engine.hub.submit(0, 0, Nanos::ZERO, body).unwrap()
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        for c in self.children.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Done(u64, Vec<u8>),
    Handler(u64, String),
    Died(u64, usize, u32),
    Ready(usize),
    Exited(usize),
    Other,
}

impl Event {
    fn from(o: Outcome<'_>, arena: &Arena) -> Self {
        match o {
            Outcome::Done { task_id, body: Payload::Inline(b), .. } => Event::Done(task_id, b.to_vec()),
            Outcome::Done { task_id, body: Payload::Extent(e), .. } => {
                let mut v = vec![0; e.len as usize];
                arena.read(&e, 0, &mut v).unwrap();
                arena.unhold(&e).unwrap();
                Event::Done(task_id, v)
            }
            Outcome::Failed { task_id, failure: Failure::Handler { body: Payload::Inline(b), .. } } => {
                Event::Handler(task_id, String::from_utf8_lossy(b).into())
            }
            Outcome::Failed { task_id, failure: Failure::WorkerDied { step, pid } } => Event::Died(task_id, step, pid),
            Outcome::WorkerReady { slot, .. } => Event::Ready(slot),
            Outcome::WorkerExited { slot, .. } => Event::Exited(slot),
            _ => Event::Other,
        }
    }
}

fn count_done(events: &[Event]) -> usize {
    events.iter().filter(|e| matches!(e, Event::Done(..))).count()
}

fn round_trips_through_worker_processes() {
    let mut flow = Flow::new(vec![StepSpec {
        nprocs: 2,
        batch_size: 8,
        batch_timeout: Duration::ZERO,
        queue_capacity: 256,
        handle_timeout: None,
    }]);
    flow.spawn(0, "echo");
    flow.spawn(1, "echo");
    flow.run_until(Duration::from_secs(20), |ev| ev.iter().filter(|e| matches!(e, Event::Ready(_))).count() == 2);
    let total = 20_000u32;
    let mut sent = 0u32;
    let mut expected = HashMap::new();
    let mut received = 0usize;
    let end = Instant::now() + Duration::from_secs(60);
    while received < total as usize {
        assert!(Instant::now() < end, "timed out with {received} of {total}");
        while sent < total && flow.engine.hub.has_room(0) {
            let body = sent.to_le_bytes();
            expected.insert(flow.submit(&body), body.to_vec());
            sent += 1;
        }
        let events = flow.run_until(Duration::from_secs(10), |ev| !ev.is_empty());
        for e in events {
            if let Event::Done(id, body) = e {
                assert_eq!(expected.remove(&id), Some(body), "wrong, lost or duplicated result");
                received += 1;
            }
        }
    }
    assert!(expected.is_empty());
    assert_eq!(flow.engine.hub.in_flight(), 0);
}

fn large_payloads_cross_processes_through_the_arena() {
    let mut flow = Flow::new(vec![StepSpec {
        nprocs: 1,
        batch_size: 1,
        batch_timeout: Duration::ZERO,
        queue_capacity: 8,
        handle_timeout: None,
    }]);
    flow.spawn(0, "echo");
    let mut ids = HashMap::new();
    for i in 0..8u8 {
        let body: Vec<u8> = (0..(1usize << 20)).map(|j| (j as u8).wrapping_mul(i)).collect();
        ids.insert(flow.submit(&body), body);
    }
    let events = flow.run_until(Duration::from_secs(20), |ev| count_done(ev) == 8);
    for e in events {
        if let Event::Done(id, body) = e {
            assert!(ids.remove(&id).unwrap() == body, "payload corrupted");
        }
    }
    assert_eq!(flow.engine.hub.arena().used_pages(), 0, "arena drained");
}

fn sigkill_mid_batch_fails_only_held_tasks() {
    let spec = StepSpec {
        nprocs: 2,
        batch_size: 3,
        batch_timeout: Duration::from_millis(50),
        queue_capacity: 64,
        handle_timeout: None,
    };
    let mut flow = Flow::new(vec![spec]);
    flow.spawn(0, "stall");
    flow.spawn(1, "stall");
    flow.run_until(Duration::from_secs(20), |ev| ev.iter().filter(|e| matches!(e, Event::Ready(_))).count() == 2);
    // Three "stall" tasks make one full batch for one worker: the victim.
    let batch: Vec<u64> = (0..3u8).map(|i| flow.submit(&[b's', b't', b'a', b'l', b'l', i])).collect();
    let victim = if flow.engine.hub.held_by(0) == batch { 0 } else { 1 };
    assert_eq!(flow.engine.hub.held_by(victim), batch, "one worker holds the whole batch");
    // Everything else goes to the other worker.
    let others: Vec<u64> = (0..27u8).map(|i| flow.submit(&[i])).collect();
    // Wait until the victim has visibly answered the first task of its batch: it is mid-batch.
    let mut events = flow.run_until(Duration::from_secs(20), |ev| {
        ev.contains(&Event::Done(batch[0], vec![b's', b't', b'a', b'l', b'l', 0]))
    });
    let pid = flow.children[&victim].id();
    let killed_at = Instant::now();
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    flow.run_more(&mut events, Duration::from_secs(20), |ev| ev.contains(&Event::Exited(victim)));
    let noticed = killed_at.elapsed();
    assert!(noticed < Duration::from_secs(2), "death noticed through the pidfd, took {noticed:?}");
    flow.run_more(&mut events, Duration::from_secs(20), |ev| {
        others.iter().all(|id| ev.iter().any(|e| matches!(e, Event::Done(i, _) if i == id)))
    });
    let died: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Died(id, 0, p) if *p == pid => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(died, batch[1..].to_vec(), "exactly the unanswered tasks of the killed batch failed");
    let done = |id: &u64| events.iter().filter(|e| matches!(e, Event::Done(i, _) if i == id)).count();
    assert_eq!(done(&batch[0]), 1);
    assert!(others.iter().all(|id| done(id) == 1), "every other task completed exactly once");
    assert_eq!(flow.engine.hub.in_flight(), 0);
    let _ = flow.children.remove(&victim).map(|mut c| c.wait());
    // A replacement worker serves new tasks from the same slot.
    flow.spawn(victim, "echo");
    flow.run_until(Duration::from_secs(20), |ev| ev.contains(&Event::Ready(victim)));
    let more: Vec<u64> = (0..10u8).map(|i| flow.submit(&[i])).collect();
    flow.run_until(Duration::from_secs(20), |ev| count_done(ev) == more.len());
    assert_eq!(flow.engine.hub.in_flight(), 0);
    assert_eq!(flow.engine.hub.arena().used_pages(), 0);
}

fn two_steps_with_a_handler_error() {
    let spec = StepSpec {
        nprocs: 1,
        batch_size: 4,
        batch_timeout: Duration::from_millis(2),
        queue_capacity: 64,
        handle_timeout: None,
    };
    let mut flow = Flow::new(vec![spec.clone(), spec]);
    flow.spawn(0, "two_step");
    flow.spawn(1, "two_step");
    let good = flow.submit(b"good");
    let bad = flow.submit(b"bad");
    let events = flow.run_until(Duration::from_secs(20), |ev| {
        ev.iter().filter(|e| matches!(e, Event::Done(..) | Event::Handler(..))).count() == 2
    });
    assert!(events.contains(&Event::Done(good, b"good+s0+s1".to_vec())));
    assert!(events.contains(&Event::Handler(bad, "ValueError: bad input".into())));
}
