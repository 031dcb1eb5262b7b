#![forbid(unsafe_code)]
//! The worker loops: receive a batch, run the step's handler over it, route each task on.
//!
//! A thread worker takes its tasks out of the [`Store`] by key; a process worker deserialises
//! them. Either way a handler error or panic fails the tasks of that batch and only those, and
//! the worker carries on with the next batch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use aqueduct_core::message::{Status, ROUTE_DONE};
use aqueduct_core::{Nanos, Received, WorkerEndpoint};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::handler::{Handler, Parts};
use crate::step::Condition;
use crate::store::Store;

/// The later steps a result may go to, in order, with their conditions.
pub(crate) type Routes<T> = Vec<(usize, Condition<T>)>;

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(s) => format!("panicked: {s}"),
        Err(panic) => match panic.downcast::<&str>() {
            Ok(s) => format!("panicked: {s}"),
            Err(_) => "panicked".to_string(),
        },
    }
}

/// Runs `f`, turning an error or a panic into a message.
fn guarded(f: impl FnOnce() -> Result<(), crate::BoxError>) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic_message(panic)),
    }
}

fn route<T>(task: &T, routes: &Routes<T>) -> u16 {
    routes.iter().find(|(_, condition)| condition(task)).map_or(ROUTE_DONE, |(step, _)| *step as u16)
}

/// Runs `on_start` and reports readiness; `false` if it failed (reported to the engine).
fn start<T: 'static>(ep: &mut WorkerEndpoint, handler: &mut dyn Handler<T>) -> bool {
    match guarded(|| handler.on_start()) {
        Ok(()) => ep.ready().is_ok(),
        Err(message) => {
            let _ = ep.start_failed(&message);
            false
        }
    }
}

/// A step's worker thread in a thread-mode flow.
pub(crate) fn thread_worker<T: Send + 'static>(
    mut ep: WorkerEndpoint,
    mut handler: Box<dyn Handler<T>>,
    routes: Routes<T>,
    store: Arc<Store<T>>,
) {
    if !start(&mut ep, &mut *handler) {
        return;
    }
    let mut body = Vec::new();
    loop {
        let n = match ep.recv(None) {
            Ok(Received::Batch(n)) => n,
            Ok(Received::Timeout) => continue,
            Ok(Received::Stop) | Err(_) => return,
        };
        let now = Nanos::now();
        let mut keys = Vec::with_capacity(n);
        let mut live = Vec::with_capacity(n); // (index in the batch, key)
        for i in 0..n {
            if ep.read_body(i, &mut body).is_err() || body.len() < 8 {
                let _ = ep.send_result(i, Status::Error, ROUTE_DONE, b"corrupt task key");
                continue;
            }
            let key = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
            if ep.tasks()[i].header.is_expired(now) {
                store.discard(key);
                let _ = ep.send_result(i, Status::Expired, ROUTE_DONE, &[]);
                continue;
            }
            keys.push(key);
            live.push((i, key));
        }
        let taken = store.take(&keys);
        let mut batch = Vec::with_capacity(taken.len());
        let mut held = Vec::with_capacity(taken.len());
        for ((i, key), task) in live.into_iter().zip(taken) {
            match task {
                Some(t) => {
                    batch.push(t);
                    held.push((i, key));
                }
                // The caller gave up: the engine drops whatever is answered.
                None => {
                    let _ = ep.send_result(i, Status::Expired, ROUTE_DONE, &[]);
                }
            }
        }
        let t0 = Instant::now();
        let indices: Vec<usize> = held.iter().map(|&(i, _)| i).collect();
        let outcome = if batch.is_empty() {
            Ok(())
        } else {
            guarded(|| handler.handle_streaming(&mut batch, &mut Parts::new(&mut ep, &indices)))
        };
        ep.record_handle_time(t0.elapsed());
        match outcome {
            Ok(()) => {
                let mut back = Vec::with_capacity(batch.len());
                for ((i, key), task) in held.into_iter().zip(batch) {
                    let next = route(&task, &routes);
                    back.push((key, task));
                    let _ = ep.send_result(i, Status::Ok, next, &key.to_le_bytes());
                }
                store.put_back(back);
            }
            Err(message) => {
                drop(batch);
                store.forget(held.iter().map(|(_, key)| *key));
                for (i, _) in held {
                    let _ = ep.send_result(i, Status::Error, ROUTE_DONE, message.as_bytes());
                }
            }
        }
        if ep.finish_batch().is_err() {
            return;
        }
    }
}

/// A step's worker in a process-mode flow (the re-executed program). Returns the exit code.
pub(crate) fn process_worker<T: Serialize + DeserializeOwned + 'static>(
    mut ep: WorkerEndpoint,
    mut handler: Box<dyn Handler<T>>,
    routes: Routes<T>,
) -> i32 {
    if !start(&mut ep, &mut *handler) {
        return 1;
    }
    let mut body = Vec::new();
    loop {
        let n = match ep.recv(None) {
            Ok(Received::Batch(n)) => n,
            Ok(Received::Timeout) => continue,
            Ok(Received::Stop) => return 0,
            Err(_) => return 1,
        };
        let now = Nanos::now();
        let mut batch = Vec::with_capacity(n);
        let mut held = Vec::with_capacity(n);
        for i in 0..n {
            if ep.tasks()[i].header.is_expired(now) {
                let _ = ep.send_result(i, Status::Expired, ROUTE_DONE, &[]);
                continue;
            }
            let decoded = ep.read_body(i, &mut body).map_err(|e| e.to_string()).and_then(|_| {
                postcard::from_bytes::<T>(&body).map_err(|e| format!("cannot deserialise the task: {e}"))
            });
            match decoded {
                Ok(task) => {
                    batch.push(task);
                    held.push(i);
                }
                Err(message) => {
                    let _ = ep.send_result(i, Status::Error, ROUTE_DONE, message.as_bytes());
                }
            }
        }
        let t0 = Instant::now();
        let outcome = if batch.is_empty() {
            Ok(())
        } else {
            guarded(|| handler.handle_streaming(&mut batch, &mut Parts::new(&mut ep, &held)))
        };
        ep.record_handle_time(t0.elapsed());
        match outcome {
            Ok(()) => {
                for (i, task) in held.into_iter().zip(batch) {
                    let next = route(&task, &routes);
                    let sent = match postcard::to_allocvec(&task) {
                        Ok(bytes) => ep.send_result(i, Status::Ok, next, &bytes),
                        Err(e) => {
                            let message = format!("cannot serialise the result: {e}");
                            ep.send_result(i, Status::Error, ROUTE_DONE, message.as_bytes())
                        }
                    };
                    if sent.is_err() {
                        return 1;
                    }
                }
            }
            Err(message) => {
                for i in held {
                    let _ = ep.send_result(i, Status::Error, ROUTE_DONE, message.as_bytes());
                }
            }
        }
        if ep.finish_batch().is_err() {
            return 1;
        }
    }
}
