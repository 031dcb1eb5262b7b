//! Criterion benchmarks of the transport.
//!
//! - `ring/write_read/<size>`: one thread writes a record, publishes, reads it back: the
//!   per-message cost of the ring itself, without any wake-up.
//! - `engine/round_trip_64B`: a 64-byte task through the whole engine to a worker process and
//!   back (hub dispatch, worker endpoint, hub poll), as the Python layer uses it. The worker is
//!   this binary re-executed.
//!
//! Run: `cargo bench -p aqueduct-core --bench transport`.

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqueduct_core::hub::{Doorbell, HubConfig, Outcome, StepSpec};
use aqueduct_core::message::{Status, ROUTE_DONE};
use aqueduct_core::shm::event::SpinPolicy;
use aqueduct_core::shm::fd::{adopt_inherited, set_inheritable};
use aqueduct_core::shm::{Arena, ArenaLayout, Consumer, Producer, RingLayout, SharedRegion};
use aqueduct_core::{Engine, Nanos, Received, WorkerEndpoint};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};

fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring/write_read");
    for size in [64usize, 4096, 64 << 10] {
        let layout = RingLayout::new(0, 1 << 20);
        let region = Arc::new(SharedRegion::create("aqueduct-bench", layout.total_bytes()).unwrap());
        layout.init(&region);
        let mut p = Producer::attach(region.clone(), layout).unwrap();
        let mut cons = Consumer::attach(region, layout).unwrap();
        let payload = vec![1u8; size];
        let mut out = Vec::with_capacity(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| {
                assert!(p.try_write(1, &[&payload]).unwrap());
                p.publish();
                let rec = cons.peek().unwrap().unwrap();
                cons.read_payload(&rec, &mut out).unwrap();
                cons.consume(&rec);
                cons.release();
            })
        });
    }
}

fn worker_child() {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).unwrap();
    let fd = |k: &str| adopt_inherited(std::env::var(k).unwrap().parse().unwrap()).unwrap();
    let region = Arc::new(SharedRegion::attach(fd("AQ_REGION_FD")).unwrap());
    let pool = Arc::new(Arena::attach(Arc::new(SharedRegion::attach(fd("AQ_POOL_FD")).unwrap()), 1).unwrap());
    let mut w = WorkerEndpoint::attach(region, pool, 0, Doorbell::from_fd(fd("AQ_DOORBELL_FD"))).unwrap();
    w.ready().unwrap();
    let mut body = Vec::new();
    loop {
        match w.recv(None).unwrap() {
            Received::Stop => return,
            Received::Timeout => {}
            Received::Batch(n) => {
                for i in 0..n {
                    w.read_body(i, &mut body).unwrap();
                    w.send_result(i, Status::Ok, ROUTE_DONE, &body).unwrap();
                }
                w.finish_batch().unwrap();
            }
        }
    }
}

fn spawn_worker(engine: &mut Engine, pool: &Arena) -> Child {
    use std::os::fd::AsRawFd;
    let fds = [engine.region_fd(), engine.doorbell_fd(), pool.region().fd().unwrap()];
    for fd in fds {
        set_inheritable(fd, true).unwrap();
    }
    let child = Command::new(std::env::current_exe().unwrap())
        .env("AQ_BENCH_WORKER", "1")
        .env("AQ_REGION_FD", fds[0].as_raw_fd().to_string())
        .env("AQ_DOORBELL_FD", fds[1].as_raw_fd().to_string())
        .env("AQ_POOL_FD", fds[2].as_raw_fd().to_string())
        .spawn()
        .unwrap();
    for fd in [engine.region_fd(), engine.doorbell_fd(), pool.region().fd().unwrap()] {
        set_inheritable(fd, false).unwrap();
    }
    engine.worker_spawned(0, child.id(), pool.reserve_index().unwrap()).unwrap();
    child
}

fn engine_round_trip(c: &mut Criterion) {
    let spec =
        StepSpec { nprocs: 1, batch_size: 1, batch_timeout: Duration::ZERO, queue_capacity: 64, handle_timeout: None };
    let cfg = HubConfig { steps: vec![spec], ..HubConfig::default() };
    let pool = Arc::new(Arena::create(ArenaLayout::new(16 << 20, 1 << 16, 4), 16 << 20).unwrap());
    let mut engine = Engine::new(&cfg, pool.clone()).unwrap();
    let mut child = spawn_worker(&mut engine, &pool);
    let mut ready = false;
    while !ready {
        engine
            .wait(Some(Duration::from_millis(100)), &mut |o| ready |= matches!(o, Outcome::WorkerReady { .. }))
            .unwrap();
    }
    let spin = SpinPolicy::default().spin;
    let body = [0u8; 64];
    c.bench_function("engine/round_trip_64B", |b| {
        b.iter(|| {
            let id = engine.hub.submit(0, 0, Nanos::ZERO, &body).unwrap();
            let mut done = false;
            let start = Instant::now();
            while !done {
                let mut sink = |o: Outcome<'_>| done |= matches!(o, Outcome::Done { task_id, .. } if task_id == id);
                if start.elapsed() < spin {
                    engine.poll(&mut sink).unwrap();
                } else {
                    engine.wait(Some(Duration::from_millis(10)), &mut sink).unwrap();
                }
            }
        })
    });
    engine.hub.send_stop(0).unwrap();
    child.wait().unwrap();
}

criterion_group!(benches, ring, engine_round_trip);

fn main() {
    if std::env::var("AQ_BENCH_WORKER").is_ok() {
        worker_child();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
