#![forbid(unsafe_code)]
//! [`RemoteFlow`]: submit into a flow that another process serves (a Python flow server started
//! by `aqueduct.sockets.SocketFlow.preload` or `python -m aqueduct.sockets`), through the same
//! port a Python `SocketFlow` client uses.
//!
//! The connection speaks the flow server's handshake (binary header, JSON, descriptors passed
//! with `SCM_RIGHTS`; `docs/security.md` has the layout): nothing of it is unpickled here, and the
//! server must be this user's (its peer credentials are checked before a byte is read). After
//! it, calls go through shared memory, with the guarantees of [`aqueduct_core::caller`]: one
//! answer per call, deadlines on one heap, a backlog when the request ring is full.
//!
//! A flow served by Python decodes every task with its codec: for a plain `BaseTask` subclass,
//! `(module, qualname, state)`, pickled, or in the compact form of
//! [`aqueduct_core::task_state`] when the state holds only plain values. [`RemoteFlow::process`]
//! writes the pickle for any serde type (its fields are the task's attributes) with
//! `serde-pickle`, which builds values and never runs code, and reads the answer in either
//! form; [`RemoteFlow::process_bytes`] takes and returns the bytes as they are. Out-of-band buffers (fields of 64 KiB and more) are not
//! supported by this client: such a result fails with [`FlowError::Serialization`].

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqueduct_core::caller::{Answer, Caller};
use aqueduct_core::hub::{Doorbell, Payload};
use aqueduct_core::port::{FailureKind, PortClient};
use aqueduct_core::shm::{Arena, SharedRegion};
use aqueduct_core::task_state;
use aqueduct_core::Nanos;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use crate::error::FlowError;

const MAGIC: &[u8; 4] = b"AQFS";
/// The flow server's handshake, and the task bodies after it (3: states of plain values in the
/// compact form; 2 pickled every body).
const PROTOCOL_VERSION: u16 = 3;
const HEADER_LEN: usize = 28;
const ACCEPTED: u8 = 0;
const REFUSED: u8 = 1;
const HANDSHAKE_FDS: usize = 4;
const MAX_JSON: usize = 1 << 20;
const MAX_PICKLE: usize = 16 << 20;
/// The whole handshake must arrive within this (one deadline for every read).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the flow server said about its flow.
#[derive(Clone, Debug)]
pub struct RemoteInfo {
    pub server_pid: u32,
    pub step_names: Vec<String>,
    pub priorities: u32,
}

type Reply = oneshot::Sender<Result<Vec<u8>, FlowError>>;

enum Command {
    Submit { step: u16, priority: u8, deadline: Nanos, body: Vec<u8>, reply: Reply },
}

/// A connection to a flow served by another process. Cheap to clone; the connection closes when
/// the last clone is dropped (calls still pending fail with [`FlowError::NotRunning`]).
#[derive(Clone)]
pub struct RemoteFlow {
    info: Arc<RemoteInfo>,
    commands: mpsc::UnboundedSender<Command>,
}

impl RemoteFlow {
    /// Connects to the flow server listening on `path` (a tokio runtime with IO enabled must be
    /// running).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, FlowError> {
        let path = path.as_ref().to_path_buf();
        let Accepted { sock, info, pool_index, fds } =
            tokio::task::spawn_blocking(move || handshake(&path))
                .await
                .map_err(|e| FlowError::Start(format!("the handshake thread failed: {e}")))??;
        let [pool_fd, region_fd, bell_fd, doorbell_fd]: [OwnedFd; HANDSHAKE_FDS] =
            fds.try_into().map_err(|_| FlowError::Start("the flow server sent the wrong descriptors".into()))?;
        let pool = Arc::new(Arena::attach(Arc::new(SharedRegion::attach(pool_fd)?), pool_index)?);
        let region = Arc::new(SharedRegion::attach(region_fd)?);
        let client = PortClient::attach(region, pool, Doorbell::from_fd(doorbell_fd), Doorbell::from_fd(bell_fd))?;
        let watch_error =
            |e: std::io::Error| FlowError::Start(format!("cannot watch the port (tokio with IO is needed): {e}"));
        let bell = crate::readiness::watch(client.bell().fd()).map_err(watch_error)?;
        // The server's socket: readable at end of file when the server goes away.
        let server = crate::readiness::watch(sock.as_fd()).map_err(watch_error)?;
        rustix::fs::fcntl_setfl(&server, rustix::fs::OFlags::NONBLOCK).map_err(|e| FlowError::Engine(e.to_string()))?;
        drop(sock);
        let (commands, receiver) = mpsc::unbounded_channel();
        let info = Arc::new(info);
        tokio::spawn(run(Caller::new(client), bell, server, receiver, info.clone()));
        Ok(Self { info, commands })
    }

    pub fn info(&self) -> &RemoteInfo {
        &self.info
    }

    /// Sends a task body (the serving flow's wire form) into `step` and returns the finished
    /// task's body. `timeout`: the call fails with [`FlowError::Timeout`] past it.
    pub async fn process_bytes(
        &self,
        step: u16,
        priority: u8,
        timeout: Option<Duration>,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, FlowError> {
        if usize::from(step) >= self.info.step_names.len() {
            return Err(FlowError::Invalid(format!("no step {step} (the flow has {})", self.info.step_names.len())));
        }
        if u32::from(priority) >= self.info.priorities {
            let levels = self.info.priorities;
            return Err(FlowError::Invalid(format!(
                "priority must be below queue_priorities ({levels}), got {priority}"
            )));
        }
        let deadline = timeout.map_or(Nanos::ZERO, |t| Nanos::now().saturating_add(t));
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Submit { step, priority, deadline, body, reply })
            .map_err(|_| FlowError::NotRunning)?;
        answer.await.unwrap_or(Err(FlowError::NotRunning))
    }

    /// Sends `task` as an instance of the Python class `module.qualname` (a plain `BaseTask`
    /// subclass importable by the flow's workers; `task`'s fields become its attributes) into
    /// `step`, and returns the finished task's fields. Fields the workers add that `T` does not
    /// have are ignored.
    pub async fn process<T: Serialize + DeserializeOwned>(
        &self,
        class: (&str, &str),
        step: u16,
        task: &T,
        timeout: Option<Duration>,
    ) -> Result<T, FlowError> {
        let ser = serde_pickle::SerOptions::new();
        let body = serde_pickle::to_vec(&(class.0, class.1, task), ser)
            .map_err(|e| FlowError::Serialization(e.to_string()))?;
        let done = self.process_bytes(step, 0, timeout, body).await?;
        let wrong = |e: &dyn std::fmt::Display| FlowError::Serialization(e.to_string());
        if done.first() == Some(&task_state::FORMAT) {
            // The compact form the flow's workers use for a state of plain values.
            let state = task_state::decode(&done).map_err(|e| wrong(&e))?;
            let fields = state
                .fields
                .into_iter()
                .map(|(name, value)| (serde_pickle::HashableValue::String(name), pickle_value(value)));
            return serde_pickle::from_value(serde_pickle::Value::Dict(fields.collect())).map_err(|e| wrong(&e));
        }
        let de = serde_pickle::DeOptions::new();
        let (_, _, state): (String, String, T) = serde_pickle::from_slice(&done, de).map_err(|e| wrong(&e))?;
        Ok(state)
    }
}

/// A value of the compact form as the pickle value it stands for, for serde to read.
fn pickle_value(value: task_state::Value) -> serde_pickle::Value {
    use serde_pickle::Value as P;
    use task_state::Value as V;
    match value {
        V::None => P::None,
        V::Bool(b) => P::Bool(b),
        V::Int(n) => P::I64(n),
        V::Float(f) => P::F64(f),
        V::Str(s) => P::String(s),
        V::Bytes(b) => P::Bytes(b),
        V::Tuple(items) => P::Tuple(items.into_iter().map(pickle_value).collect()),
        V::List(items) => P::List(items.into_iter().map(pickle_value).collect()),
        V::Dict(pairs) => P::Dict(
            pairs
                .into_iter()
                // The reader refused unhashable keys, so every key converts.
                .filter_map(|(key, item)| pickle_value(key).into_hashable().ok().map(|key| (key, pickle_value(item))))
                .collect(),
        ),
    }
}

/// Connects, checks the server is this user's, and reads the handshake (blocking).
/// A handshake the server accepted: the connection (kept open: closing it closes the port), the
/// flow's description, this client's index in the pool, and the pool, port region, port bell and
/// engine doorbell descriptors.
struct Accepted {
    sock: UnixStream,
    info: RemoteInfo,
    pool_index: u32,
    fds: Vec<OwnedFd>,
}

fn handshake(path: &Path) -> Result<Accepted, FlowError> {
    let what = format!("the flow server at {}", path.display());
    let sock = UnixStream::connect(path).map_err(|e| FlowError::Start(format!("cannot connect to {what}: {e}")))?;
    let cred = rustix::net::sockopt::socket_peercred(&sock).map_err(|e| FlowError::Start(format!("{what}: {e}")))?;
    if cred.uid != rustix::process::geteuid() {
        return Err(FlowError::Start(format!("{what} runs as uid {}, not as this user", cred.uid.as_raw())));
    }
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let timed = |sock: &UnixStream| -> Result<(), FlowError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FlowError::Start(format!("{what} sent no complete handshake within {HANDSHAKE_TIMEOUT:?}")));
        }
        sock.set_read_timeout(Some(left)).map_err(|e| FlowError::Engine(e.to_string()))
    };
    // The descriptors come with the header's first bytes.
    let mut header = [0u8; HEADER_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(HANDSHAKE_FDS))];
    let mut ancillary = rustix::net::RecvAncillaryBuffer::new(&mut space);
    timed(&sock)?;
    let got = rustix::net::recvmsg(
        &sock,
        &mut [IoSliceMut::new(&mut header)],
        &mut ancillary,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| FlowError::Start(format!("{what}: reading the handshake: {e}")))?;
    let mut fds = Vec::new();
    for message in ancillary.drain() {
        if let rustix::net::RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    read_exact(&sock, &mut header[got.bytes..], &timed, &what)?;
    if &header[..4] != MAGIC {
        return Err(FlowError::Start(format!("{what} is not an aqueduct flow server")));
    }
    let be16 = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    if be16(4) != PROTOCOL_VERSION {
        return Err(FlowError::Start(format!("{what} speaks handshake version {}, not {PROTOCOL_VERSION}", be16(4))));
    }
    let (status, nfds) = (header[6], usize::from(header[7]));
    let (server_pid, pool_index, priorities) = (be32(8), be32(12), be32(16));
    let (json_len, pickle_len) = (be32(20) as usize, be32(24) as usize);
    if !matches!(status, ACCEPTED | REFUSED) || json_len > MAX_JSON || pickle_len > MAX_PICKLE {
        return Err(FlowError::Start(format!("{what} sent a malformed handshake")));
    }
    if nfds != if status == ACCEPTED { HANDSHAKE_FDS } else { 0 } || fds.len() != nfds {
        return Err(FlowError::Start(format!("{what} sent {} descriptors, announced {nfds}", fds.len())));
    }
    let mut json = vec![0u8; json_len];
    read_exact(&sock, &mut json, &timed, &what)?;
    // The pickled conditions are for Python clients that were not forked from the server's
    // parent; this client never unpickles them: they are read and dropped.
    let mut rest = vec![0u8; pickle_len];
    read_exact(&sock, &mut rest, &timed, &what)?;
    let info: serde_json::Value =
        serde_json::from_slice(&json).map_err(|e| FlowError::Start(format!("{what}: handshake JSON: {e}")))?;
    if status == REFUSED {
        let why = info.get("error").and_then(|e| e.as_str()).unwrap_or("no reason given");
        return Err(FlowError::Start(format!("{what} refused the connection: {why}")));
    }
    let step_names: Vec<String> = info
        .get("step_names")
        .and_then(|n| serde_json::from_value(n.clone()).ok())
        .filter(|n: &Vec<String>| !n.is_empty())
        .ok_or_else(|| FlowError::Start(format!("{what} sent a handshake without step names")))?;
    if priorities == 0 || priorities > 255 {
        return Err(FlowError::Start(format!("{what} announced {priorities} priority levels")));
    }
    sock.set_read_timeout(None).map_err(|e| FlowError::Engine(e.to_string()))?;
    Ok(Accepted { sock, info: RemoteInfo { server_pid, step_names, priorities }, pool_index, fds })
}

fn read_exact(
    sock: &UnixStream,
    mut buf: &mut [u8],
    timed: &dyn Fn(&UnixStream) -> Result<(), FlowError>,
    what: &str,
) -> Result<(), FlowError> {
    use std::io::Read;
    while !buf.is_empty() {
        timed(sock)?;
        let n = (&*sock).read(buf).map_err(|e| FlowError::Start(format!("{what}: reading the handshake: {e}")))?;
        if n == 0 {
            return Err(FlowError::Start(format!("{what} closed the connection during the handshake")));
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

/// `module.qualname: message` of a Python worker's error report (a pickled tuple: the pickled
/// exception, its constructor arguments, module, qualname, message, traceback, ...). Only plain
/// values are read; the exception's own pickle stays opaque bytes. The Python bindings' HTTP
/// front reads reports with it too.
pub fn remote_error(detail: &[u8]) -> String {
    use serde_pickle::Value;
    match serde_pickle::value_from_slice(detail, serde_pickle::DeOptions::new().replace_unresolved_globals()) {
        Ok(Value::Tuple(fields)) => match (fields.get(2), fields.get(3), fields.get(4)) {
            (Some(Value::String(module)), Some(Value::String(qualname)), Some(Value::String(text))) => {
                format!("{module}.{qualname}: {text}")
            }
            _ => "a handler error the worker could not describe".into(),
        },
        _ => "a handler error the worker could not describe".into(),
    }
}

/// The connection's task: submissions in, answers out; the port's bell, the next deadline and
/// the server's socket (closed: the server has gone) wake it.
async fn run(
    mut caller: Caller<Reply>,
    bell: AsyncFd<OwnedFd>,
    server: AsyncFd<OwnedFd>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    info: Arc<RemoteInfo>,
) {
    let arena = caller.client().arena().clone();
    let name = |step: u16| info.step_names.get(usize::from(step)).cloned().unwrap_or_default();
    let mut answer = |a: Answer<'_, Reply>| match a {
        Answer::Done { call, body, bufs } => {
            let result = if bufs.is_empty() {
                Ok(body.into_vec(&arena))
            } else {
                if let Payload::Extent(ext) = body {
                    let _ = arena.unhold(&ext);
                }
                for b in bufs {
                    let _ = arena.unhold(&b.extent());
                }
                Err(FlowError::Serialization(
                    "the result has out-of-band buffers, which this client cannot read".into(),
                ))
            };
            let _ = call.send(result);
        }
        Answer::Failed { call, kind, step, pid, detail } => {
            let detail = detail.map(|d| d.into_vec(&arena)).unwrap_or_default();
            let error = match kind {
                FailureKind::Handler => FlowError::Handler { step: name(step), message: remote_error(&detail) },
                FailureKind::Expired => FlowError::Expired { step: name(step) },
                FailureKind::WorkerDied => FlowError::WorkerDied { step: name(step), pid },
                FailureKind::HandlerTimeout => FlowError::HandlerTimeout { step: name(step), pid },
                FailureKind::Stopped => FlowError::NotRunning,
                FailureKind::Rejected => FlowError::Invalid(String::from_utf8_lossy(&detail).into_owned()),
                other => FlowError::Engine(format!("the flow failed the task: {}", other.name())),
            };
            let _ = call.send(Err(error));
        }
        Answer::Part { body, bufs, .. } => {
            // Only streaming calls are sent parts, and this client submits none.
            if let Payload::Extent(ext) = body {
                let _ = arena.unhold(&ext);
            }
            for b in bufs {
                let _ = arena.unhold(&b.extent());
            }
        }
        Answer::TimedOut { call } => {
            let _ = call.send(Err(FlowError::Timeout));
        }
        Answer::Lost { call } => {
            let _ = call.send(Err(FlowError::NotRunning));
        }
    };
    loop {
        let next = caller.next_deadline().map(|at| {
            let left = at.saturating_sub(Nanos::now());
            tokio::time::Instant::now() + left
        });
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = commands.recv() => match command {
                Some(first) => {
                    // This command and every other already queued, then one flush.
                    let mut next = Some(first);
                    while let Some(Command::Submit { step, priority, deadline, body, reply }) = next {
                        if let Err(refused) = caller.submit(reply, step, priority, deadline, &body, Vec::new(), false) {
                            // No shared memory for the body: this call fails, with why.
                            let _ = refused.call.send(Err(refused.error.into()));
                        }
                        next = commands.try_recv().ok();
                    }
                    caller.flush();
                }
                None => break, // every handle was dropped
            },
            ready = bell.readable() => match ready {
                Ok(mut guard) => guard.clear_ready(),
                Err(_) => break,
            },
            ready = server.readable() => match ready {
                Ok(mut guard) => {
                    let mut byte = [0u8; 1];
                    match rustix::io::read(server.get_ref().as_fd(), &mut byte) {
                        Err(rustix::io::Errno::AGAIN) | Ok(1..) => guard.clear_ready(),
                        Ok(0) | Err(_) => break, // the server has gone (or closed this port)
                    }
                }
                Err(_) => break,
            },
            () = sleep => {}
        }
        loop {
            if let Err(e) = caller.poll(Nanos::now(), &mut answer) {
                eprintln!("aqueduct: the remote flow's port failed: {e}");
                caller.lose_all(&mut answer);
                return;
            }
            if caller.prepare_sleep() {
                break;
            }
        }
    }
    caller.lose_all(&mut answer);
}
