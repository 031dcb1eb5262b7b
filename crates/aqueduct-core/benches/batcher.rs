//! Criterion benchmarks of the hub's queueing and batching, in one process.
//!
//! - `prio/push_pop`: the multi-level queue with the starvation guard.
//! - `hub/batch/<batch_size>`: submit `batch_size` tasks, let the hub form and send the batch,
//!   answer it through a worker endpoint (played in this process), and collect the outcomes:
//!   the hub's own cost per batch, without any process switch.
//!
//! Run: `cargo bench -p aqueduct-core --bench batcher`.

use std::sync::Arc;
use std::time::Duration;

use aqueduct_core::hub::{Doorbell, Hub, HubConfig, Outcome, StepSpec};
use aqueduct_core::message::{Status, ROUTE_DONE};
use aqueduct_core::prio::PriorityQueue;
use aqueduct_core::shm::event::SpinPolicy;
use aqueduct_core::shm::{Arena, ArenaLayout};
use aqueduct_core::{Nanos, Received, WorkerEndpoint};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn prio(c: &mut Criterion) {
    let mut q = PriorityQueue::new(4, 1 << 20, 10);
    let mut i = 0u64;
    c.bench_function("prio/push_pop", |b| {
        b.iter(|| {
            q.push((i % 4) as usize, i).unwrap();
            i += 1;
            if q.len() > 64 {
                q.pop();
            }
        })
    });
}

fn hub_batches(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub/batch");
    for batch_size in [1usize, 16] {
        let spec = StepSpec {
            nprocs: 1,
            batch_size,
            batch_timeout: Duration::from_secs(1),
            queue_capacity: 1024,
            handle_timeout: None,
        };
        let cfg = HubConfig { steps: vec![spec], ..HubConfig::default() };
        let pool = Arc::new(Arena::create_in_heap(ArenaLayout::new(16 << 20, 1 << 16, 4), 0).unwrap());
        let mut hub = Hub::create_in_heap(&cfg, pool.clone()).unwrap();
        let index = pool.reserve_index().unwrap();
        let mut w =
            WorkerEndpoint::attach(hub.region().clone(), Arc::new(pool.as_process(index)), 0, Doorbell::new().unwrap())
                .unwrap();
        w.set_spin(SpinPolicy::NONE);
        hub.worker_spawned(0, 1, index);
        w.ready().unwrap();
        hub.poll(Nanos::now(), &mut |_| {}).unwrap();
        let body = [7u8; 64];
        let mut buf = Vec::new();
        g.throughput(Throughput::Elements(batch_size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(batch_size), &batch_size, |b, &n| {
            b.iter(|| {
                for _ in 0..n {
                    hub.submit(0, 0, Nanos::ZERO, &body).unwrap();
                }
                let Received::Batch(k) = w.recv(Some(Duration::ZERO)).unwrap() else { panic!("no batch") };
                assert_eq!(k, n, "a full batch leaves at once");
                for i in 0..k {
                    w.read_body(i, &mut buf).unwrap();
                    w.send_result(i, Status::Ok, ROUTE_DONE, &buf).unwrap();
                }
                w.finish_batch().unwrap();
                let mut done = 0;
                hub.poll(Nanos::now(), &mut |o| done += usize::from(matches!(o, Outcome::Done { .. }))).unwrap();
                assert_eq!(done, n);
            })
        });
    }
}

criterion_group!(benches, prio, hub_batches);
criterion_main!(benches);
