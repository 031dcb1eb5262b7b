#![forbid(unsafe_code)]
//! `aqueduct._core.HttpServer`: the Rust HTTP front of a flow (`aqueduct.http.HttpFront`).
//!
//! HTTP is parsed, routed, limited and answered by hyper on a tokio runtime of the front's own
//! threads. Each request becomes a task of `aqueduct.http.Request`, written in the compact wire
//! form ([`exchange::encode_request`]) and submitted to the flow's driver with a oneshot as its
//! call token ([`Call::Native`]). The front's poller task polls that same driver (the core's
//! `poll_pass` and spin window) and answers native calls itself, so no request takes the GIL;
//! the outcomes of Python callers' futures and the worker events it finds on the way go to the
//! Python thread (`Driver.take_forwarded`), which still starts replacement workers. Only
//! `/healthz` and `/metrics` call into Python, on a blocking thread, to give the same report as
//! the integrations' routes.
//!
//! Limits, each its own status: a body over `max_body` → 413 (from `Content-Length` before
//! reading, or while reading); more than `max_in_flight` requests being served → 503; a body
//! that has not arrived by the request's deadline → 408; headers slower than `client_timeout`,
//! or a response the client does not read for that long → the connection is closed; the
//! deadline passing in the flow → 504. Connections beyond
//! `max_connections` wait in the listen backlog.

mod exchange;
mod streamed;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use aqueduct_core::driver::StreamOpen;
use aqueduct_core::stream::PartReceipt;
use aqueduct_core::{EngineError, Nanos};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rustc_hash::FxHashMap;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::args;
use crate::driver::{Call, Driver, Native, Shared};
use exchange::{error, Body, RequestParts};

/// How long `/healthz` and `/metrics` wait for the Python thread's report.
const SIDE_TIMEOUT: Duration = Duration::from_secs(2);
/// The spin reads only the rings; exits, timers and the doorbell wait for a full poll, so a
/// spin under sustained load returns to one at least this often.
const FULL_POLL_EVERY: Duration = Duration::from_millis(1);

/// What every connection's requests share.
struct Front {
    driver: Arc<Shared>,
    /// Path -> the step its requests enter.
    routes: FxHashMap<String, usize>,
    timeout: Duration,
    /// The longest a streamed response waits for its next part; `None`: the deadline only.
    idle_timeout: Option<Duration>,
    max_body: usize,
    max_in_flight: usize,
    in_flight: AtomicUsize,
    /// This front's generation as the driver's poller (`NativePoller`).
    generation: u64,
    /// `side(kind)` -> `(status, content_type, body)` for `kind` in `healthz`, `metrics`.
    side: Arc<Py<PyAny>>,
    /// One side report at a time: a flood of `/healthz` waits here, not on the GIL.
    side_reports: Semaphore,
    /// Responses sent, by status code.
    responses: Box<[AtomicU64]>,
}

impl Front {
    fn count(&self, response: Response<Body>) -> Response<Body> {
        if let Some(n) = self.responses.get(usize::from(response.status().as_u16())) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        response
    }
}

/// A request counted against `max_in_flight` while it is served (a streamed response until its
/// last part is sent).
struct InFlight(Arc<Front>);

impl InFlight {
    fn enter(front: &Arc<Front>) -> Option<Self> {
        let before = front.in_flight.fetch_add(1, Ordering::AcqRel);
        let entered = InFlight(front.clone());
        (before < front.max_in_flight).then_some(entered)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A submitted call: cancelled in the driver if it is dropped before its answer (the client
/// hung up, or the server stopped past its grace), with the room of the parts it was sent but
/// never sent on given back to the worker.
struct Pending {
    front: Arc<Front>,
    call: u64,
    parts: mpsc::UnboundedReceiver<Native>,
    answered: bool,
}

impl Pending {
    /// The call's next part or its outcome (`None`: the driver was closed with the call in it).
    async fn next(&mut self) -> Option<Native> {
        let next = self.parts.recv().await;
        self.answered |= !matches!(next, Some(Native::Part(..)));
        next
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Native>> {
        let next = std::task::ready!(self.parts.poll_recv(cx));
        self.answered |= !matches!(next, Some(Native::Part(..)));
        Poll::Ready(next)
    }

    /// The client has this part: its worker may send another.
    fn taken(&self, receipt: PartReceipt) {
        if let Some(driver) = self.front.driver.lock_native().as_mut() {
            driver.part_taken(self.call, receipt);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.parts.close();
        if let Some(driver) = self.front.driver.lock_native().as_mut() {
            driver.cancel(self.call);
            while let Ok(next) = self.parts.try_recv() {
                if let Native::Part(_, receipt) = next {
                    driver.release_part(receipt);
                }
            }
        }
    }
}

async fn respond(front: Arc<Front>, request: Request<Incoming>, reset: Arc<AtomicBool>) -> Response<Body> {
    let response = serve_request(&front, request, reset).await;
    front.count(response)
}

async fn serve_request(front: &Arc<Front>, request: Request<Incoming>, reset: Arc<AtomicBool>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let version = parts.version;
    let path = parts.uri.path();
    let Some(&step) = front.routes.get(path) else {
        return match path {
            "/healthz" => side(front, "healthz").await,
            "/metrics" => side(front, "metrics").await,
            _ => error(StatusCode::NOT_FOUND, "not_found", &format!("no route for {path}"), None),
        };
    };
    let Some(counted) = InFlight::enter(front) else {
        let message = format!("{} requests are being served already (max_in_flight)", front.max_in_flight);
        return error(StatusCode::SERVICE_UNAVAILABLE, "busy", &message, None);
    };
    let too_large = || {
        let message = format!("the request body is larger than max_body ({} bytes)", front.max_body);
        error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", &message, None)
    };
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > front.max_body as u64) {
        return too_large();
    }
    let deadline = Nanos::now().0.saturating_add(front.timeout.as_nanos() as u64);
    let read_by = tokio::time::Instant::now() + front.timeout;
    let body = match tokio::time::timeout_at(read_by, Limited::new(body, front.max_body).collect()).await {
        Err(_) => {
            let message = "the request body did not arrive before the request's deadline";
            return error(StatusCode::REQUEST_TIMEOUT, "body_timeout", message, None);
        }
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return too_large(),
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                &format!("the request body could not be read: {e}"),
                None,
            )
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let task = exchange::encode_request(&RequestParts {
        method: parts.method.as_str(),
        path,
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        body: &body,
        expires_at: deadline as f64 / 1e9,
    });
    let Ok(task) = task else { return too_large() };
    drop(body);
    // Every request may stream: its handler decides, by sending a part or not.
    let (answer, parts) = mpsc::unbounded_channel();
    let open = StreamOpen { idle: front.idle_timeout, optional: true };
    let submitted = match front.driver.lock_native().as_mut() {
        Some(driver) => driver.submit_stream(Call::Native(answer), step, 0, Nanos(deadline), open, &task, Vec::new()),
        None => return error(StatusCode::SERVICE_UNAVAILABLE, "not_running", "the flow is not running", None),
    };
    drop(task);
    let call = match submitted {
        Ok(call) => call,
        Err(refused) => {
            let message = refused.error.to_string();
            return match refused.error {
                EngineError::QueueFull { .. } => error(StatusCode::SERVICE_UNAVAILABLE, "queue_full", &message, None),
                EngineError::Stopped => error(StatusCode::SERVICE_UNAVAILABLE, "not_running", &message, None),
                EngineError::ArenaExhausted { .. } => {
                    error(StatusCode::SERVICE_UNAVAILABLE, "shm_exhausted", &message, None)
                }
                _ => error(StatusCode::INTERNAL_SERVER_ERROR, "rejected", &message, None),
            };
        }
    };
    front.driver.poller.kick();
    let mut pending = Pending { front: front.clone(), call, parts, answered: false };
    // The driver answers every call exactly once, its deadline included: no timer here.
    match pending.next().await {
        Some(Native::End(outcome)) => exchange::outcome_response(outcome, &front.driver.step_names),
        Some(Native::Part(part, receipt)) => {
            pending.taken(receipt);
            // HTTP/1.0 has no chunked encoding: the close ends the body, so a body cut short
            // resets the connection (a close would read as the body's end).
            let reset = (version < hyper::Version::HTTP_11).then_some(reset);
            streamed::respond(part, pending, counted, reset)
        }
        None => error(StatusCode::SERVICE_UNAVAILABLE, "not_running", "the flow stopped", None),
    }
}

/// `/healthz` or `/metrics`: the Python thread's report, on a blocking thread.
async fn side(front: &Front, kind: &'static str) -> Response<Body> {
    let unavailable = |message: String| error(StatusCode::SERVICE_UNAVAILABLE, "no_report", &message, None);
    let report = async {
        let _one = front.side_reports.acquire().await.expect("never closed");
        // The GIL is taken on the blocking thread only: never on the runtime's.
        let callback = front.side.clone();
        tokio::task::spawn_blocking(move || {
            Python::attach(|py| -> PyResult<(u16, String, Vec<u8>)> { callback.bind(py).call1((kind,))?.extract() })
        })
        .await
    };
    match tokio::time::timeout(SIDE_TIMEOUT, report).await {
        Ok(Ok(Ok((status, content_type, body)))) => {
            let mut response = Response::new(Body::Left(http_body_util::Full::new(body.into())));
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if let Ok(value) = hyper::header::HeaderValue::from_str(&content_type) {
                response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
            }
            response
        }
        Ok(Ok(Err(e))) => unavailable(format!("the {kind} report failed: {e}")),
        Ok(Err(_)) => unavailable(format!("the {kind} report failed")),
        Err(_) => unavailable(format!("the main process did not give the {kind} report in time")),
    }
}

/// Polls the driver for as long as the front serves: answers native calls, hands the rest to
/// the Python thread, and sleeps on the engine's descriptor when the core says so.
async fn poll_driver(front: Arc<Front>, engine_fd: AsyncFd<OwnedFd>) {
    let poller = &front.driver.poller;
    let mut open_window = true;
    while poller.is_current(front.generation) {
        let mut full_at = std::time::Instant::now();
        let mut events = true;
        loop {
            let Some(again) = front.driver.native_pass(front.generation, events, open_window) else { return };
            open_window = false;
            if !again {
                break;
            }
            tokio::task::yield_now().await;
            events = full_at.elapsed() >= FULL_POLL_EVERY;
            if events {
                full_at = std::time::Instant::now();
            }
        }
        poller.sleeping.store(true, Ordering::Release);
        tokio::select! {
            ready = engine_fd.readable() => match ready {
                Ok(mut guard) => guard.clear_ready(),
                Err(_) => return,
            },
            () = poller.wake.notified() => {}
        }
        poller.sleeping.store(false, Ordering::Release);
        open_window = true;
    }
}

/// A connection's socket with a bound on how long a write may make no progress: a client that
/// stops reading its response is disconnected after `client_timeout`, and gives back its
/// connection slot and the response it held. (hyper bounds only the reading of headers.)
struct WriteTimeout {
    stream: tokio::net::TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Set by a streamed body cut short whose end the close delimits (HTTP/1.0): the connection
    /// is reset rather than closed, so that the client does not take the body for complete.
    reset: Arc<AtomicBool>,
}

impl Drop for WriteTimeout {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Acquire) {
            // A linger of zero: the close sends RST, not FIN (and never blocks).
            let _ = rustix::net::sockopt::set_socket_linger(&self.stream, Some(Duration::ZERO));
        }
    }
}

impl WriteTimeout {
    fn bound<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for WriteTimeout {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteTimeout {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.bound(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.bound(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

struct Limits {
    max_connections: usize,
    client_timeout: Duration,
}

/// Accepts connections until told to shut down, then lets the requests under way finish for
/// the grace it was given.
async fn serve(
    front: Arc<Front>,
    listener: std::net::TcpListener,
    engine_fd: OwnedFd,
    limits: Limits,
    mut shutdown: oneshot::Receiver<Duration>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(_) => return,
    };
    let Ok(engine_fd) = aqueduct::readiness::watch(engine_fd.as_fd()) else { return };
    let poller = tokio::spawn(poll_driver(front.clone(), engine_fd));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let grace = loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
            grace = &mut shutdown => break grace.unwrap_or_default(),
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors or memory: back off rather than spin on the error.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            grace = &mut shutdown => break grace.unwrap_or_default(),
        };
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        let reset = Arc::new(AtomicBool::new(false));
        let reset_by = reset.clone();
        let service = service_fn(move |request| {
            let front = front.clone();
            let reset = reset_by.clone();
            async move { Ok::<_, Infallible>(respond(front, request, reset).await) }
        });
        let connection =
            http1::Builder::new().timer(TokioTimer::new()).header_read_timeout(limits.client_timeout).serve_connection(
                TokioIo::new(WriteTimeout { stream, limit: limits.client_timeout, stalled: None, reset }),
                service,
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    };
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
    front.driver.poller.release(front.generation);
    let _ = poller.await;
}

/// The poller's claim while the server is being set up: released if setting up fails.
struct Claimed {
    shared: Arc<Shared>,
    generation: u64,
    keep: bool,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if !self.keep {
            self.shared.poller.release(self.generation);
        }
    }
}

#[pyclass(frozen, module = "aqueduct._core")]
pub struct HttpServer {
    front: Arc<Front>,
    address: (String, u16),
    shutdown: Mutex<Option<oneshot::Sender<Duration>>>,
    /// Receives once the server's thread has ended its work.
    finished: Mutex<std::sync::mpsc::Receiver<()>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[pymethods]
impl HttpServer {
    /// Listens on `host:port` (0: any free port; see `address`) and serves `routes` (a list of
    /// `(path, step)`) from `threads` threads of its own. `side(kind)` answers `/healthz` and
    /// `/metrics` with `(status, content_type, body)`.
    #[new]
    #[pyo3(signature = (
        driver, host, port, routes, side, *, timeout=5.0, idle_timeout=None, max_body=16<<20,
        max_in_flight=1024, max_connections=1024, client_timeout=10.0, threads=1
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        driver: &Driver,
        host: &str,
        port: u16,
        routes: Vec<(String, usize)>,
        side: Py<PyAny>,
        timeout: f64,
        idle_timeout: Option<f64>,
        max_body: usize,
        max_in_flight: usize,
        max_connections: usize,
        client_timeout: f64,
        threads: usize,
    ) -> PyResult<Self> {
        let value_error = |m: String| pyo3::exceptions::PyValueError::new_err(m);
        let timeout = args::duration("timeout_sec", timeout)?;
        let client_timeout = args::duration("client_timeout_sec", client_timeout)?;
        let idle_timeout = idle_timeout.map(|t| args::duration("idle_timeout_sec", t)).transpose()?;
        if timeout.is_zero() || client_timeout.is_zero() || idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err(value_error("timeouts must be positive".into()));
        }
        for (name, n) in [("max_in_flight", max_in_flight), ("max_connections", max_connections), ("threads", threads)]
        {
            if n == 0 {
                return Err(value_error(format!("{name} must be at least 1")));
            }
        }
        let shared = driver.shared().clone();
        let generation = shared
            .poller
            .claim()
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("the flow is served by an HTTP front already"))?;
        let claimed = Claimed { shared: shared.clone(), generation, keep: false };
        let (engine_fd, steps) = {
            let guard = shared.lock_native();
            let d = guard.as_ref().ok_or_else(|| value_error("the flow is not running".into()))?;
            let fd = d.engine().fd().as_fd().try_clone_to_owned()?;
            (fd, d.engine().hub.step_count())
        };
        let mut table = FxHashMap::default();
        for (path, step) in routes {
            if !path.starts_with('/') {
                return Err(value_error(format!("a route's path starts with '/', got {path:?}")));
            }
            if step >= steps {
                return Err(value_error(format!("route {path:?}: the flow has no step {step}")));
            }
            if table.insert(path.clone(), step).is_some() {
                return Err(value_error(format!("route {path:?} is given twice")));
            }
        }
        let listener = std::net::TcpListener::bind((host, port))
            .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("cannot listen on {host}:{port}: {e}")))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let front = Arc::new(Front {
            driver: shared,
            routes: table,
            timeout,
            idle_timeout,
            max_body,
            max_in_flight,
            in_flight: AtomicUsize::new(0),
            generation,
            side: Arc::new(side),
            side_reports: Semaphore::new(1),
            responses: (0..600).map(|_| AtomicU64::new(0)).collect(),
        });
        let runtime = if threads == 1 {
            tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(2).build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("aqueduct-http")
                .enable_all()
                .max_blocking_threads(2)
                .build()
        }
        .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("cannot start the HTTP runtime: {e}")))?;
        let (shutdown, shutdown_rx) = oneshot::channel();
        let (finished_tx, finished) = std::sync::mpsc::channel();
        let limits = Limits { max_connections, client_timeout };
        let serving = front.clone();
        let thread = py
            .detach(|| {
                std::thread::Builder::new().name("aqueduct-http".into()).spawn(move || {
                    runtime.block_on(serve(serving, listener, engine_fd, limits, shutdown_rx));
                    // Connections still open past the grace are dropped with the runtime: their
                    // calls are cancelled in the driver.
                    drop(runtime);
                    let _ = finished_tx.send(());
                })
            })
            .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("cannot start the HTTP thread: {e}")))?;
        let mut claimed = claimed;
        claimed.keep = true;
        Ok(Self {
            front,
            address: (local.ip().to_string(), local.port()),
            shutdown: Mutex::new(Some(shutdown)),
            finished: Mutex::new(finished),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// `(host, port)` it listens on.
    #[getter]
    fn address(&self) -> (String, u16) {
        self.address.clone()
    }

    /// Requests being served now.
    #[getter]
    fn in_flight(&self) -> usize {
        self.front.in_flight.load(Ordering::Acquire)
    }

    /// Responses sent so far, `{status: count}`.
    fn responses<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (status, n) in self.front.responses.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                out.set_item(status, n)?;
            }
        }
        Ok(out)
    }

    /// Stops accepting connections; the requests under way get `grace` seconds to finish, then
    /// their connections are closed (and their calls cancelled). Idempotent.
    fn shutdown(&self, grace: f64) -> PyResult<()> {
        let grace = args::duration("grace_sec", grace)?;
        if let Some(tx) = self.shutdown.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(grace);
        }
        Ok(())
    }

    /// Stops the front's polling of the driver (the Python thread polls from now on), without
    /// stopping the server.
    fn stop_polling(&self) {
        self.front.driver.poller.release(self.front.generation);
    }

    /// Waits (without the GIL) at most `timeout` seconds for the server to have ended after
    /// `shutdown`; returns whether it has.
    fn join(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let timeout = args::duration("timeout", timeout)?;
        let mut guard = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        let finished = &mut *guard;
        let thread = &self.thread;
        Ok(py.detach(move || match finished.recv_timeout(timeout) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // Its work is done: the thread itself is gone a moment later.
                if let Some(handle) = thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = handle.join();
                }
                true
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
        }))
    }
}
