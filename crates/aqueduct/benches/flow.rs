//! The cost of sending work through a flow, against `tokio::task::spawn_blocking` (a plain
//! thread pool, no queues, batching or supervision).
//!
//! `cargo bench -p aqueduct --bench flow`. Groups:
//! - `round_trip`: one trivial task at a time (the latency of a call);
//! - `64_in_flight`: 64 concurrent calls (the time per 64 tasks, i.e. throughput).

use std::time::Duration;

use aqueduct::{from_fn, Flow, FlowBuilder, FlowStep};
use criterion::{BenchmarkId, Criterion, Throughput};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Task {
    x: u64,
    y: u64,
}

fn add_one(batch: &mut [Task]) {
    for t in batch {
        t.y = t.x + 1;
    }
}

fn builder(name: &str) -> FlowBuilder<Task> {
    Flow::builder(name).step(FlowStep::new(from_fn(|batch: &mut [Task]| {
        add_one(batch);
        Ok(())
    })))
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let threads = rt.block_on(builder("bench-threads").start()).unwrap();
    let processes = rt.block_on(builder("bench-processes").start_processes()).unwrap();

    let mut group = c.benchmark_group("round_trip");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("flow_threads", |b| {
        b.to_async(&rt).iter(|| async { threads.process(Task { x: 1, y: 0 }).await.unwrap() })
    });
    group.bench_function("flow_processes", |b| {
        b.to_async(&rt).iter(|| async { processes.process(Task { x: 1, y: 0 }).await.unwrap() })
    });
    group.bench_function("spawn_blocking", |b| {
        b.to_async(&rt).iter(|| async {
            tokio::task::spawn_blocking(|| {
                let mut t = [Task { x: 1, y: 0 }];
                add_one(&mut t);
                t[0]
            })
            .await
            .unwrap()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("64_in_flight");
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(64));
    for (name, flow) in [("flow_threads", &threads), ("flow_processes", &processes)] {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.to_async(&rt).iter(|| async {
                let mut set = JoinSet::new();
                for x in 0..64 {
                    let flow = flow.clone();
                    set.spawn(async move { flow.process(Task { x, y: 0 }).await.unwrap() });
                }
                while set.join_next().await.is_some() {}
            })
        });
    }
    group.bench_function(BenchmarkId::from_parameter("spawn_blocking"), |b| {
        b.to_async(&rt).iter(|| async {
            let mut set = JoinSet::new();
            for x in 0..64 {
                set.spawn_blocking(move || {
                    let mut t = [Task { x, y: 0 }];
                    add_one(&mut t);
                    t[0]
                });
            }
            while set.join_next().await.is_some() {}
        })
    });
    group.finish();

    rt.block_on(async {
        threads.stop().await;
        processes.stop().await;
    });
}

fn main() {
    // This benchmark re-executed as a worker of the process-mode flow: serve it, nothing else.
    if aqueduct::process::worker_flow().as_deref() == Some("bench-processes") {
        let _ = runtime().block_on(builder("bench-processes").start_processes());
        std::process::exit(1);
    }
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
