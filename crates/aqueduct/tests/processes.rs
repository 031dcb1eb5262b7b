//! Process-mode flows: this test binary re-executes itself as the workers.
//!
//! It runs without the libtest harness (a worker process re-runs `main`, which must reach the
//! flow it serves first). A watchdog fails the binary if a case hangs.

use std::time::{Duration, Instant};

use aqueduct::{BoxError, Flow, FlowError, FlowStep, Handler, RestartPolicy};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Task {
    x: u64,
    data: Vec<u8>,
    sum: Option<u64>,
    pid: Option<u32>,
    scaled: Option<u64>,
}

/// Sums `data`, records its pid; panics on 13, aborts the process on 99; on 77 writes its pid
/// to the file named by `data` and waits to be killed.
#[derive(Clone)]
struct Sum;

impl Handler<Task> for Sum {
    fn handle(&mut self, batch: &mut [Task]) -> Result<(), BoxError> {
        for t in batch.iter_mut() {
            match t.x {
                13 => panic!("thirteen is unlucky"),
                99 => std::process::abort(),
                77 => {
                    let marker = std::path::PathBuf::from(String::from_utf8(t.data.clone())?);
                    let partial = marker.with_extension("partial");
                    std::fs::write(&partial, std::process::id().to_string())?;
                    std::fs::rename(&partial, &marker)?; // the test never reads half a pid
                    std::thread::sleep(Duration::from_secs(120));
                }
                _ => {
                    t.sum = Some(t.data.iter().map(|&b| u64::from(b)).sum());
                    t.pid = Some(std::process::id());
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
struct Scale;

impl Handler<Task> for Scale {
    fn handle(&mut self, batch: &mut [Task]) -> Result<(), BoxError> {
        for t in batch.iter_mut() {
            t.scaled = t.sum.map(|s| s * 10);
        }
        Ok(())
    }
}

/// Streams `x` parts per task, each its index as 8 bytes and its pid; a pid from a part is how
/// the test kills a worker mid-stream.
#[derive(Clone)]
struct Parts;

impl Handler<Task> for Parts {
    fn handle(&mut self, batch: &mut [Task]) -> Result<(), BoxError> {
        self.handle_streaming(batch, &mut aqueduct::Parts::discarding())
    }

    fn handle_streaming(&mut self, batch: &mut [Task], parts: &mut aqueduct::Parts<'_>) -> Result<(), BoxError> {
        for (i, t) in batch.iter_mut().enumerate() {
            for n in 0..t.x {
                let mut part = n.to_le_bytes().to_vec();
                part.extend(std::process::id().to_le_bytes());
                if !parts.send(i, &part)? {
                    return Ok(());
                }
                if !t.data.is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            t.sum = Some(t.x);
        }
        Ok(())
    }
}

fn a_stream_crosses_processes_and_a_worker_killed_mid_stream_fails_it() {
    runtime().block_on(async {
        let flow = Flow::builder("a_stream_crosses_processes_and_a_worker_killed_mid_stream_fails_it")
            .step(FlowStep::new(Parts))
            .start_timeout(Duration::from_secs(30))
            .start_processes()
            .await
            .unwrap();
        let options = aqueduct::ProcessOptions { timeout: Some(Duration::from_secs(30)), priority: 0 };
        let mut stream = flow.stream(Task { x: 50, ..Task::default() }, options).unwrap();
        for n in 0..50u64 {
            let part = stream.next_part().await.expect("a part");
            assert_eq!(u64::from_le_bytes(part[..8].try_into().unwrap()), n);
        }
        assert_eq!(stream.finish().await.unwrap().sum, Some(50));
        let mut endless = flow.stream(Task { x: u64::MAX, data: vec![1], ..Task::default() }, options).unwrap();
        let part = endless.next_part().await.expect("a part");
        let pid = u32::from_le_bytes(part[8..12].try_into().unwrap());
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        while endless.next_part().await.is_some() {}
        assert!(matches!(endless.finish().await, Err(FlowError::WorkerDied { .. })));
        let again = flow.stream(Task { x: 2, ..Task::default() }, options).unwrap();
        assert_eq!(again.finish().await.unwrap().sum, Some(2), "a replacement serves the next stream");
        flow.stop().await;
    });
}

fn builder(name: &str) -> aqueduct::FlowBuilder<Task> {
    Flow::builder(name)
        .step(FlowStep::new(Sum).nprocs(2).batch_size(4))
        .step(FlowStep::new(Scale).handle_condition(|t: &Task| t.x % 2 == 0))
        .start_timeout(Duration::from_secs(30))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Whether `pid` runs (not a zombie). A process reaped between looking and reading is gone: an
/// unreadable stat file counted as alive once, and failed a test whose worker was just reaped.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

fn round_trips_with_large_payloads() {
    runtime().block_on(async {
        let flow = builder("round_trips_with_large_payloads").start_processes().await.unwrap();
        let calls: Vec<_> = (100..140u64)
            .map(|x| {
                let flow = flow.clone();
                let data = vec![(x % 7) as u8; if x % 5 == 0 { 3 << 20 } else { 100 }];
                tokio::spawn(async move { flow.process(Task { x, data, ..Task::default() }).await })
            })
            .collect();
        let mut pids = std::collections::HashSet::new();
        for (x, call) in (100..140u64).zip(calls) {
            let done = call.await.unwrap().unwrap();
            let len = if x % 5 == 0 { 3u64 << 20 } else { 100 };
            assert_eq!(done.sum, Some(len * (x % 7)));
            assert_eq!(done.scaled, (x % 2 == 0).then(|| len * (x % 7) * 10));
            assert_ne!(done.pid, Some(std::process::id()), "handled in a worker process");
            pids.extend(done.pid);
        }
        flow.stop().await;
        for pid in pids {
            assert!(!alive(pid), "worker {pid} is gone after stop");
        }
    });
}

fn a_panic_fails_only_its_batch() {
    runtime().block_on(async {
        let flow = builder("a_panic_fails_only_its_batch").start_processes().await.unwrap();
        let before = flow.process(Task { x: 1, ..Task::default() }).await.unwrap().pid;
        match flow.process(Task { x: 13, ..Task::default() }).await {
            Err(FlowError::Handler { step, message }) => {
                assert_eq!(step, "step1_Sum");
                assert!(message.contains("thirteen is unlucky"), "{message}");
            }
            other => panic!("expected a handler error, got {other:?}"),
        }
        let mut pids = std::collections::HashSet::new();
        for x in 0..8 {
            pids.extend(flow.process(Task { x, ..Task::default() }).await.unwrap().pid);
        }
        assert!(pids.contains(&before.unwrap()) || pids.len() == 2, "the workers survived the panic");
        flow.stop().await;
    });
}

fn a_killed_worker_fails_only_its_tasks_and_is_replaced() {
    runtime().block_on(async {
        let flow = builder("a_killed_worker_fails_only_its_tasks_and_is_replaced").start_processes().await.unwrap();
        match flow.process(Task { x: 99, ..Task::default() }).await {
            Err(FlowError::WorkerDied { step, pid }) => {
                assert_eq!(step, "step1_Sum");
                assert!(!alive(pid));
            }
            other => panic!("expected a dead worker, got {other:?}"),
        }
        for x in 0..6 {
            assert!(flow.process(Task { x, ..Task::default() }).await.unwrap().sum.is_some());
        }
        flow.stop().await;
    });
}

fn a_worker_sigkilled_from_outside_fails_the_task_it_held() {
    runtime().block_on(async {
        let flow = builder("a_worker_sigkilled_from_outside_fails_the_task_it_held").start_processes().await.unwrap();
        let marker = std::env::temp_dir().join(format!("aqueduct-held-by-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let data = marker.to_str().unwrap().as_bytes().to_vec();
        let held = tokio::spawn({
            let flow = flow.clone();
            async move { flow.process(Task { x: 77, data, ..Task::default() }).await }
        });
        // The worker announces that it holds the task (another process: a file is the signal).
        let holder = loop {
            if let Ok(pid) = std::fs::read_to_string(&marker) {
                break pid.parse::<i32>().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        std::fs::remove_file(&marker).unwrap();
        let pid = rustix::process::Pid::from_raw(holder).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        match held.await.unwrap() {
            Err(FlowError::WorkerDied { step, pid }) => {
                assert_eq!(step, "step1_Sum");
                assert_eq!(pid, holder as u32);
            }
            other => panic!("expected the killed worker's error, got {other:?}"),
        }
        for x in 0..6 {
            let done = flow.process(Task { x, ..Task::default() }).await.unwrap();
            assert!(done.sum.is_some() && done.pid != Some(holder as u32));
        }
        flow.stop().await;
    });
}

fn past_the_restart_policy_the_flow_stops() {
    runtime().block_on(async {
        let flow = builder("past_the_restart_policy_the_flow_stops")
            .restart_policy(RestartPolicy {
                max_restarts: 1,
                window: Duration::from_secs(60),
                ..RestartPolicy::default()
            })
            .start_processes()
            .await
            .unwrap();
        for _ in 0..2 {
            assert!(matches!(flow.process(Task { x: 99, ..Task::default() }).await, Err(FlowError::WorkerDied { .. })));
        }
        tokio::time::timeout(Duration::from_secs(10), flow.stopped()).await.expect("the flow stops");
        assert!(!flow.is_running(), "the second death within the window stopped the flow");
        assert_eq!(flow.process(Task { x: 1, ..Task::default() }).await.unwrap_err(), FlowError::NotRunning);
        flow.stop().await;
    });
}

fn a_batch_past_handle_timeout_kills_its_worker_and_fails_as_such() {
    runtime().block_on(async {
        let flow = Flow::builder("a_batch_past_handle_timeout_kills_its_worker_and_fails_as_such")
            .step(FlowStep::new(Sum).handle_timeout(Duration::from_millis(300)))
            .start_timeout(Duration::from_secs(30))
            .start_processes()
            .await
            .unwrap();
        let marker = std::env::temp_dir().join(format!("aqueduct-hung-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let data = marker.to_str().unwrap().as_bytes().to_vec();
        // Task 77 hangs in its handler (it sleeps for two minutes).
        match flow.process(Task { x: 77, data, ..Task::default() }).await {
            Err(FlowError::HandlerTimeout { step, pid }) => {
                assert_eq!(step, "step1_Sum");
                let holder: u32 = std::fs::read_to_string(&marker).unwrap().parse().unwrap();
                assert_eq!(pid, holder);
                let until = Instant::now() + Duration::from_secs(10);
                while alive(pid) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(!alive(pid), "the hung worker was killed");
            }
            other => panic!("expected a handle_timeout failure, got {other:?}"),
        }
        let _ = std::fs::remove_file(&marker);
        let done = flow.process(Task { x: 3, data: vec![1, 2], ..Task::default() }).await.unwrap();
        assert_eq!(done.sum, Some(3), "a replacement serves");
        flow.stop().await;
    });
}

const CASES: &[(&str, fn())] = &[
    (
        "a_batch_past_handle_timeout_kills_its_worker_and_fails_as_such",
        a_batch_past_handle_timeout_kills_its_worker_and_fails_as_such,
    ),
    ("round_trips_with_large_payloads", round_trips_with_large_payloads),
    ("a_panic_fails_only_its_batch", a_panic_fails_only_its_batch),
    ("a_killed_worker_fails_only_its_tasks_and_is_replaced", a_killed_worker_fails_only_its_tasks_and_is_replaced),
    ("a_worker_sigkilled_from_outside_fails_the_task_it_held", a_worker_sigkilled_from_outside_fails_the_task_it_held),
    ("past_the_restart_policy_the_flow_stops", past_the_restart_policy_the_flow_stops),
    (
        "a_stream_crosses_processes_and_a_worker_killed_mid_stream_fails_it",
        a_stream_crosses_processes_and_a_worker_killed_mid_stream_fails_it,
    ),
];

fn main() {
    // A worker process re-runs main: go straight to the case whose flow it serves.
    if let Some(flow) = aqueduct::process::worker_flow() {
        if let Some((_, case)) = CASES.iter().find(|(name, _)| *name == flow) {
            case();
        }
        std::process::exit(1);
    }
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        eprintln!("process-mode tests: watchdog expired");
        std::process::exit(2);
    });
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mut failed = 0;
    for (name, case) in CASES {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let t = Instant::now();
        let ok = std::panic::catch_unwind(case).is_ok();
        println!("test {name} ... {} ({:.2?})", if ok { "ok" } else { "FAILED" }, t.elapsed());
        failed += usize::from(!ok);
    }
    if failed > 0 {
        println!("{failed} process-mode case(s) failed");
        std::process::exit(1);
    }
}
