//! The transport micro-benchmark that chose the engine's shape (see ARCHITECTURE.md).
//!
//! Between two processes, for 64 B, 4 KiB and 1 MiB messages, it measures:
//! - one-way latency: ping-pong, the sender stamps CLOCK_MONOTONIC into the message and the
//!   receiver subtracts (p50 and p99);
//! - round-trip throughput: a window of 64 messages in flight, echoed back (messages/s).
//!
//! Transports: the engine's shared-memory ring (payload copied through the ring), the ring with
//! the payload left in the arena (only a descriptor moves), a Unix stream socket, and the whole
//! engine (hub dispatch, worker endpoint, hub poll) for 1 and 2 steps. Python's
//! `multiprocessing.Queue` is measured by `bench/transport_mpqueue.py` with the same method.
//! Receivers read the first and last byte of each message (they do not copy it).
//!
//! Run: `cargo bench -p aqueduct-core --bench transport_compare` (add `-- --quick` for a short run).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqueduct_core::hub::{Doorbell, HubConfig, Outcome, StepSpec};
use aqueduct_core::layout::FlowLayout;
use aqueduct_core::message::{Status, ROUTE_DONE};
use aqueduct_core::shm::event::SpinPolicy;
use aqueduct_core::shm::fd::{adopt_inherited, set_inheritable};
use aqueduct_core::shm::{Arena, ArenaLayout, Consumer, Extent, Producer, SharedRegion};
use aqueduct_core::{Engine, Nanos, Received, WorkerEndpoint};

const SIZES: [usize; 3] = [64, 4096, 1 << 20];
const WINDOW: usize = 64;

fn main() {
    if let Ok(role) = std::env::var("AQ_BENCH_ROLE") {
        child(&role);
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo bench` passes `--bench`; any other bare word filters rows.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let pings = if quick { 2_000 } else { 20_000 };
    println!("| transport | size | one-way p50 | one-way p99 | round trips/s (window {WINDOW}) |");
    println!("|---|---|---|---|---|");
    for size in SIZES {
        let n = if size >= 1 << 20 { pings / 20 } else { pings };
        for transport in ["ring", "ring+arena", "unix socket"] {
            let name = format!("{transport} {size}");
            if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
                continue;
            }
            let (lat, tput) = match transport {
                "ring" => ring_bench(size, n, false),
                "ring+arena" => ring_bench(size, n, true),
                _ => socket_bench(size, n),
            };
            print_row(transport, size, &lat, tput);
        }
    }
    for steps in [1usize, 2] {
        let name = format!("engine {steps}-step");
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let (rt, tput) = engine_bench(steps, pings);
        println!(
            "| engine, {steps} step(s) | 64 B | round trip p50 {} | round trip p99 {} | {:.0} |",
            fmt_us(percentile(&rt, 50)),
            fmt_us(percentile(&rt, 99)),
            tput
        );
    }
}

fn print_row(transport: &str, size: usize, lat: &[u64], tput: f64) {
    let size = match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1024 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    };
    println!(
        "| {transport} | {size} | {} | {} | {tput:.0} |",
        fmt_us(percentile(lat, 50)),
        fmt_us(percentile(lat, 99))
    );
}

fn fmt_us(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1000.0)
}

fn percentile(v: &[u64], p: usize) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn spawn_child(role: &str, fds: &[&OwnedFd], extra: &[(&str, String)]) -> Child {
    for fd in fds {
        set_inheritable(fd.as_fd_ref(), true).unwrap();
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("AQ_BENCH_ROLE", role)
        .env("AQ_FDS", fds.iter().map(|f| f.as_raw_fd().to_string()).collect::<Vec<_>>().join(","));
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    for fd in fds {
        set_inheritable(fd.as_fd_ref(), false).unwrap();
    }
    child
}

trait AsFdRef {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_>;
}
impl AsFdRef for OwnedFd {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.as_fd()
    }
}

fn inherited_fds() -> Vec<OwnedFd> {
    std::env::var("AQ_FDS").unwrap().split(',').map(|s| adopt_inherited(s.parse().unwrap()).unwrap()).collect()
}

fn child(role: &str) {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).unwrap();
    match role {
        "ring" => ring_child(),
        "socket" => socket_child(),
        "engine" => engine_child(),
        _ => panic!("unknown role"),
    }
}

// ---------------------------------------------------------------- raw rings

const RING_CAP: usize = 4 << 20;

fn ring_region() -> (Arc<SharedRegion>, FlowLayout, Arena) {
    let layout = FlowLayout::new(1, RING_CAP, 1);
    let region = Arc::new(SharedRegion::create("aqueduct-bench", layout.total_bytes()).unwrap());
    layout.init(&region).unwrap();
    let pool = Arena::create(ArenaLayout::new(256 << 20, 1 << 16, 4), 256 << 20).unwrap();
    (region, layout, pool)
}

fn wait_record(c: &mut Consumer) -> aqueduct_core::shm::RecordView {
    loop {
        if let Some(r) = c.peek().unwrap() {
            return r;
        }
        c.wait_for_data(SpinPolicy::default(), None);
    }
}

fn write_record(p: &mut Producer, parts: &[&[u8]]) {
    let len = parts.iter().map(|p| p.len()).sum();
    while !p.try_write(1, parts).unwrap() {
        p.publish();
        p.wait_for_space(len, SpinPolicy::default());
    }
}

/// Reads the stamp and touches the last byte of a payload, as a receiver that uses it would.
fn touch(region: &SharedRegion, offset: usize, len: usize) -> u64 {
    let stamp = region.read_u64(offset).unwrap();
    let mut last = [0u8];
    region.read(offset + len - 1, &mut last).unwrap();
    std::hint::black_box(last);
    stamp
}

fn ring_child() {
    let mut fds = inherited_fds();
    let pool = Arc::new(SharedRegion::attach(fds.remove(1)).unwrap());
    let region = Arc::new(SharedRegion::attach(fds.remove(0)).unwrap());
    let layout = FlowLayout::read(&region).unwrap();
    let arena = Arena::attach(pool, 1).unwrap();
    let mut rx = Consumer::attach(region.clone(), layout.inbound(0)).unwrap();
    let mut tx = Producer::attach(region.clone(), layout.outbound(0)).unwrap();
    let mut lat = Vec::new();
    loop {
        let rec = wait_record(&mut rx);
        let mut head = [0u8; 24];
        region.read(rec.offset, &mut head).unwrap();
        let kind = u64::from_le_bytes(head[..8].try_into().unwrap());
        let (stamp, len) = if kind == 0 {
            (touch(&region, rec.offset + 8, rec.len - 8), rec.len - 8)
        } else {
            let ext = Extent {
                head: u32::from_le_bytes(head[8..12].try_into().unwrap()),
                pages: u32::from_le_bytes(head[12..16].try_into().unwrap()),
                len: u64::from_le_bytes(head[16..24].try_into().unwrap()),
            };
            (touch(arena.region(), arena.offset_of(&ext).unwrap(), ext.len as usize), ext.len as usize)
        };
        if kind == 2 {
            break;
        }
        lat.push(Nanos::now().0 - stamp);
        // Echo: the same record back (the payload again, or the same descriptor).
        let mut echo = vec![0u8; rec.len];
        region.read(rec.offset, &mut echo).unwrap();
        rx.consume(&rec);
        rx.release();
        let _ = len;
        write_record(&mut tx, &[&echo]);
        tx.publish();
    }
    let bytes: Vec<u8> = lat.iter().flat_map(|v| v.to_le_bytes()).collect();
    let max = tx.max_payload();
    write_record(&mut tx, &[&bytes[..bytes.len().min(max)]]);
    tx.publish();
}

fn ring_bench(size: usize, n: usize, via_arena: bool) -> (Vec<u64>, f64) {
    let (region, layout, mut arena) = ring_region();
    let fd = region.fd().unwrap().try_clone_to_owned().unwrap();
    let pool_fd = arena.region().fd().unwrap().try_clone_to_owned().unwrap();
    let mut child = spawn_child("ring", &[&fd, &pool_fd], &[]);
    let mut tx = Producer::attach(region.clone(), layout.inbound(0)).unwrap();
    let mut rx = Consumer::attach(region.clone(), layout.outbound(0)).unwrap();
    let payload = vec![7u8; size];
    // A message: kind u64 (0 inline, 1 extent, 2 stop), then the payload or the descriptor.
    // Returns false when the ring is full (the caller then drains echoes instead of blocking:
    // both rings full with both sides waiting for space would deadlock).
    let send = |tx: &mut Producer, arena: &mut Arena, stop: bool| -> bool {
        let stamp = Nanos::now().0.to_le_bytes();
        if via_arena || stop {
            let ext = arena.alloc(size).unwrap();
            arena.write(&ext, 0, &stamp).unwrap();
            arena.write(&ext, 8, &payload[8..]).unwrap();
            let kind: u64 = if stop { 2 } else { 1 };
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&kind.to_le_bytes());
            d.extend_from_slice(&ext.head.to_le_bytes());
            d.extend_from_slice(&ext.pages.to_le_bytes());
            d.extend_from_slice(&ext.len.to_le_bytes());
            if !tx.try_write(1, &[&d]).unwrap() {
                arena.unhold(&ext).unwrap();
                return false;
            }
        } else if !tx.try_write(1, &[&0u64.to_le_bytes(), &stamp, &payload[8..]]).unwrap() {
            return false;
        }
        tx.publish();
        true
    };
    let recv = |rx: &mut Consumer, arena: &Arena| {
        let rec = wait_record(rx);
        if via_arena {
            let mut d = [0u8; 24];
            rx.region().read(rec.offset, &mut d).unwrap();
            // The child echoes the descriptor; its reference went with the message it read.
            let ext = Extent {
                head: u32::from_le_bytes(d[8..12].try_into().unwrap()),
                pages: u32::from_le_bytes(d[12..16].try_into().unwrap()),
                len: u64::from_le_bytes(d[16..24].try_into().unwrap()),
            };
            arena.unhold(&ext).unwrap();
        }
        rx.consume(&rec);
        rx.release();
    };
    // Latency: ping-pong.
    for _ in 0..n {
        assert!(send(&mut tx, &mut arena, false));
        recv(&mut rx, &arena);
    }
    // Throughput: a window of messages in flight.
    let t = Instant::now();
    let total = n;
    let mut outstanding = 0;
    let mut done = 0;
    let mut sent = 0;
    while done < total {
        while outstanding < WINDOW && sent < total && send(&mut tx, &mut arena, false) {
            sent += 1;
            outstanding += 1;
        }
        recv(&mut rx, &arena);
        done += 1;
        outstanding -= 1;
    }
    let tput = total as f64 / t.elapsed().as_secs_f64();
    assert!(send(&mut tx, &mut arena, true));
    let rec = wait_record(&mut rx);
    let mut bytes = Vec::new();
    rx.read_payload(&rec, &mut bytes).unwrap();
    let lat: Vec<u64> = bytes.chunks(8).take(n).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    child.wait().unwrap();
    (lat, tput)
}

// ---------------------------------------------------------------- unix socket

fn socket_child() {
    let fd = inherited_fds().remove(0);
    let mut s = UnixStream::from(fd);
    let mut lat = Vec::new();
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 8];
        s.read_exact(&mut len).unwrap();
        let len = u64::from_le_bytes(len) as usize;
        if len == 0 {
            break;
        }
        buf.resize(len, 0);
        s.read_exact(&mut buf).unwrap();
        lat.push(Nanos::now().0 - u64::from_le_bytes(buf[..8].try_into().unwrap()));
        s.write_all(&(len as u64).to_le_bytes()).unwrap();
        s.write_all(&buf).unwrap();
    }
    let bytes: Vec<u8> = lat.iter().flat_map(|v| v.to_le_bytes()).collect();
    s.write_all(&(bytes.len() as u64).to_le_bytes()).unwrap();
    s.write_all(&bytes).unwrap();
}

fn socket_bench(size: usize, n: usize) -> (Vec<u64>, f64) {
    let (mine, theirs) = UnixStream::pair().unwrap();
    let theirs = OwnedFd::from(theirs);
    let mut child = spawn_child("socket", &[&theirs], &[]);
    drop(theirs);
    let mut s = mine;
    let mut payload = vec![7u8; size];
    let mut back = vec![0u8; size];
    let send = |s: &mut UnixStream, payload: &mut Vec<u8>| {
        payload[..8].copy_from_slice(&Nanos::now().0.to_le_bytes());
        s.write_all(&(size as u64).to_le_bytes()).unwrap();
        s.write_all(payload).unwrap();
    };
    let mut recv = |s: &mut UnixStream| {
        let mut len = [0u8; 8];
        s.read_exact(&mut len).unwrap();
        s.read_exact(&mut back).unwrap();
    };
    for _ in 0..n {
        send(&mut s, &mut payload);
        recv(&mut s);
    }
    // Pipelined: a writer thread keeps the window full while this thread reads the echoes (a
    // single thread could deadlock once both socket buffers are full).
    let mut writer = s.try_clone().unwrap();
    let window = Arc::new((std::sync::Mutex::new(0usize), std::sync::Condvar::new()));
    let w2 = window.clone();
    let t = Instant::now();
    let th = std::thread::spawn(move || {
        let mut p = vec![7u8; size];
        for _ in 0..n {
            let (lock, cv) = &*w2;
            let mut g = cv.wait_while(lock.lock().unwrap(), |o| *o >= WINDOW).unwrap();
            *g += 1;
            drop(g);
            p[..8].copy_from_slice(&Nanos::now().0.to_le_bytes());
            writer.write_all(&(size as u64).to_le_bytes()).unwrap();
            writer.write_all(&p).unwrap();
        }
    });
    for _ in 0..n {
        recv(&mut s);
        let (lock, cv) = &*window;
        *lock.lock().unwrap() -= 1;
        cv.notify_one();
    }
    let tput = n as f64 / t.elapsed().as_secs_f64();
    th.join().unwrap();
    s.write_all(&0u64.to_le_bytes()).unwrap();
    let mut len = [0u8; 8];
    s.read_exact(&mut len).unwrap();
    let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize];
    s.read_exact(&mut bytes).unwrap();
    child.wait().unwrap();
    let lat = bytes.chunks(8).take(n).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    (lat, tput)
}

// ---------------------------------------------------------------- the engine

fn engine_child() {
    let mut fds = inherited_fds();
    let pool = Arc::new(SharedRegion::attach(fds.remove(2)).unwrap());
    let doorbell = Doorbell::from_fd(fds.remove(1));
    let region = Arc::new(SharedRegion::attach(fds.remove(0)).unwrap());
    let slot: usize = std::env::var("AQ_SLOT").unwrap().parse().unwrap();
    let last: bool = std::env::var("AQ_LAST").unwrap() == "1";
    let index: u32 = std::env::var("AQ_POOL_INDEX").unwrap().parse().unwrap();
    let arena = Arc::new(Arena::attach(pool, index).unwrap());
    let mut w = WorkerEndpoint::attach(region, arena, slot, doorbell).unwrap();
    w.ready().unwrap();
    let mut body = Vec::new();
    loop {
        match w.recv(None).unwrap() {
            Received::Stop => return,
            Received::Timeout => {}
            Received::Batch(n) => {
                for i in 0..n {
                    w.read_body(i, &mut body).unwrap();
                    let route = if last { ROUTE_DONE } else { w.tasks()[i].header.route + 1 };
                    w.send_result(i, Status::Ok, route, &body).unwrap();
                }
                w.finish_batch().unwrap();
            }
        }
    }
}

/// The driver loop a latency-sensitive owner runs: poll while work is in flight (spinning for
/// the same budget as the workers), sleep on the engine's fd otherwise.
fn drive(engine: &mut Engine, mut until: impl FnMut(&mut Engine, &mut Vec<u64>) -> bool) {
    let mut done = Vec::new();
    let mut idle_since = Instant::now();
    loop {
        if until(engine, &mut done) {
            return;
        }
        let n = engine
            .poll(&mut |o| {
                if let Outcome::Done { task_id, .. } = o {
                    done.push(task_id)
                }
            })
            .unwrap();
        if n > 0 {
            idle_since = Instant::now();
        } else if idle_since.elapsed() > SpinPolicy::default().spin {
            engine
                .wait(Some(Duration::from_millis(10)), &mut |o| {
                    if let Outcome::Done { task_id, .. } = o {
                        done.push(task_id)
                    }
                })
                .unwrap();
        }
    }
}

fn engine_bench(steps: usize, n: usize) -> (Vec<u64>, f64) {
    let spec = StepSpec {
        nprocs: 1,
        batch_size: 1,
        batch_timeout: Duration::ZERO,
        queue_capacity: 1024,
        handle_timeout: None,
    };
    let cfg = HubConfig { steps: vec![spec; steps], ..HubConfig::default() };
    let pool = Arc::new(Arena::create(ArenaLayout::new(16 << 20, 1 << 16, 8), 16 << 20).unwrap());
    let mut engine = Engine::new(&cfg, pool.clone()).unwrap();
    let region_fd = engine.region_fd().try_clone_to_owned().unwrap();
    let doorbell_fd = engine.doorbell_fd().try_clone_to_owned().unwrap();
    let pool_fd = pool.region().fd().unwrap().try_clone_to_owned().unwrap();
    let mut children = Vec::new();
    for slot in 0..steps {
        let last = if slot == steps - 1 { "1" } else { "0" };
        let index = pool.reserve_index().unwrap();
        let env = [("AQ_SLOT", slot.to_string()), ("AQ_LAST", last.into()), ("AQ_POOL_INDEX", index.to_string())];
        let c = spawn_child("engine", &[&region_fd, &doorbell_fd, &pool_fd], &env);
        engine.worker_spawned(slot, c.id(), index).unwrap();
        children.push(c);
    }
    let mut ready = 0;
    while ready < steps {
        engine
            .wait(Some(Duration::from_millis(100)), &mut |o| {
                ready += usize::from(matches!(o, Outcome::WorkerReady { .. }))
            })
            .unwrap();
    }
    let body = [0u8; 64];
    let mut rt = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Nanos::now();
        let id = engine.hub.submit(0, 0, Nanos::ZERO, &body).unwrap();
        drive(&mut engine, |_, done| done.contains(&id));
        rt.push(Nanos::now().0 - t.0);
    }
    let t = Instant::now();
    let mut sent = 0;
    let mut completed = 0;
    drive(&mut engine, |engine, done| {
        completed += done.len();
        done.clear();
        while sent < n && sent - completed < WINDOW {
            engine.hub.submit(0, 0, Nanos::ZERO, &body).unwrap();
            sent += 1;
        }
        completed >= n
    });
    let tput = n as f64 / t.elapsed().as_secs_f64();
    for slot in 0..steps {
        engine.hub.send_stop(slot).unwrap();
    }
    for mut c in children {
        c.wait().unwrap();
    }
    (rt, tput)
}
