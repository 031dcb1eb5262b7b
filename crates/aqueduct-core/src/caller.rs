#![forbid(unsafe_code)]
//! The calls of a port client (a web worker submitting into a flow another process serves),
//! with the same guarantees as the driver's: each call carries a token of the front end's
//! choosing and gets exactly one [`Answer`], whatever happens (a response, its deadline, the
//! server going away); a cancelled call gets none.
//!
//! - **Deadlines** in one heap ([`Deadlines`], shared with the driver), so a call costs
//!   O(log n) to time: the owner arms one timer at [`Caller::next_deadline`] and calls
//!   [`Caller::poll`] when it fires or the port's bell rings.
//! - **Backlog**: a request that finds the request ring full waits here, in order, and is sent
//!   as responses make room. The engine's waiting room and counts apply once it is in.

use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;

use crate::clock::Nanos;
use crate::driver::{Deadlines, Refused};
use crate::error::{EngineError, Result};
use crate::hub::Payload;
use crate::port::{FailureKind, PortClient, Response};
use crate::shm::BufRef;

/// What a call of a port client ended with.
#[derive(Debug)]
pub enum Answer<'a, C> {
    /// The task is finished; the body and buffers carry this process's references.
    Done { call: C, body: Payload<'a>, bufs: Vec<BufRef> },
    /// A partial result of a streaming call ([`Caller::submit`] with `streamed`); the call
    /// goes on. Tell the engine with [`Caller::part_taken`] once its caller has taken it.
    Part { call: &'a C, body: Payload<'a>, bufs: Vec<BufRef> },
    /// The engine failed it (see [`FailureKind`]); `pid` for deaths, `detail` for handler
    /// errors and refusals.
    Failed { call: C, kind: FailureKind, step: u16, pid: u32, detail: Option<Payload<'a>> },
    /// Its deadline passed before the response came.
    TimedOut { call: C },
    /// The client was closed (the server went away, or the owner detached) before it ended.
    Lost { call: C },
}

struct Backlogged {
    id: u64,
    step: u16,
    priority: u8,
    deadline: Nanos,
    body: Vec<u8>,
    bufs: Vec<BufRef>,
    streamed: bool,
}

/// A port client and the calls made through it.
pub struct Caller<C> {
    client: PortClient,
    calls: HashMap<u64, C>,
    deadlines: Deadlines,
    backlog: VecDeque<Backlogged>,
    /// Calls whose caller took a part, not yet told to the engine (the request ring was full).
    taken_backlog: VecDeque<u64>,
    next_id: u64,
}

impl<C> Caller<C> {
    pub fn new(client: PortClient) -> Self {
        Self {
            client,
            calls: HashMap::default(),
            deadlines: Deadlines::default(),
            backlog: VecDeque::new(),
            taken_backlog: VecDeque::new(),
            next_id: 1,
        }
    }

    pub fn client(&self) -> &PortClient {
        &self.client
    }

    /// Calls not yet answered.
    pub fn pending(&self) -> usize {
        self.calls.len()
    }

    /// Sends a task for `step` (published by [`Caller::flush`]); returns the call's id. On
    /// success the call owns `bufs`' references, whether sent or waiting in the backlog; when it
    /// is refused (no shared memory for the body) they, and the token, are the caller's again.
    /// `streamed`: the caller reads the task's partial results ([`Answer::Part`]).
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        call: C,
        step: u16,
        priority: u8,
        deadline: Nanos,
        body: &[u8],
        bufs: Vec<BufRef>,
        streamed: bool,
    ) -> std::result::Result<u64, Refused<C>> {
        let id = self.next_id;
        let sent = if self.backlog.is_empty() {
            match self.client.submit(id, step, priority, deadline, body, &bufs, streamed) {
                Ok(sent) => sent,
                Err(error) => return Err(Refused { call, error }),
            }
        } else {
            false
        };
        if !sent {
            self.backlog.push_back(Backlogged { id, step, priority, deadline, body: body.to_vec(), bufs, streamed });
        }
        self.next_id += 1;
        if deadline != Nanos::ZERO {
            let calls = &self.calls;
            self.deadlines.push(deadline, id, calls.len(), |id| calls.contains_key(&id));
        }
        self.calls.insert(id, call);
        Ok(id)
    }

    /// The caller gave up on a call: no answer will come for it, and the engine is asked to
    /// drop its task. Returns whether it was pending.
    pub fn cancel(&mut self, id: u64) -> bool {
        if self.calls.remove(&id).is_none() {
            return false;
        }
        if let Some(i) = self.backlog.iter().position(|b| b.id == id) {
            let dropped = self.backlog.remove(i).expect("found");
            self.release(&dropped.bufs);
        } else {
            // A full request ring: the response will come anyway, for an id no longer pending.
            let _ = self.client.cancel(id);
        }
        true
    }

    /// The caller of streaming call `id` took one of its parts: its worker may send another
    /// (published by [`Caller::flush`]). A call no longer pending is ignored.
    pub fn part_taken(&mut self, id: u64) {
        if !self.calls.contains_key(&id) {
            return;
        }
        if !self.taken_backlog.is_empty() || !matches!(self.client.part_taken(id), Ok(true)) {
            self.taken_backlog.push_back(id);
        }
    }

    /// Publishes what was written (and wakes the engine if it sleeps).
    pub fn flush(&mut self) {
        self.client.flush();
    }

    /// The earliest deadline of a pending call (perhaps of one already answered: harmless).
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.deadlines.next()
    }

    /// Answers every call whose response arrived or whose deadline has passed, then sends what
    /// the backlog holds while the ring has room. Returns how many calls were answered.
    pub fn poll(&mut self, now: Nanos, out: &mut dyn FnMut(Answer<'_, C>)) -> Result<usize> {
        let mut n = 0;
        let (calls, arena) = (&mut self.calls, self.client.arena().clone());
        self.client.poll(&mut |r| match r {
            Response::Done { task_id, body, bufs } => match calls.remove(&task_id) {
                Some(call) => {
                    n += 1;
                    out(Answer::Done { call, body, bufs })
                }
                None => {
                    if let Payload::Extent(ext) = body {
                        let _ = arena.unhold(&ext);
                    }
                    for b in bufs {
                        let _ = arena.unhold(&b.extent());
                    }
                }
            },
            Response::Part { task_id, body, bufs } => match calls.get(&task_id) {
                Some(call) => out(Answer::Part { call, body, bufs }),
                None => {
                    if let Payload::Extent(ext) = body {
                        let _ = arena.unhold(&ext);
                    }
                    for b in bufs {
                        let _ = arena.unhold(&b.extent());
                    }
                }
            },
            Response::Failed { task_id, kind, step, pid, detail } => match calls.remove(&task_id) {
                Some(call) => {
                    n += 1;
                    out(Answer::Failed { call, kind, step, pid, detail })
                }
                None => {
                    if let Some(Payload::Extent(ext)) = detail {
                        let _ = arena.unhold(&ext);
                    }
                }
            },
        })?;
        while let Some(id) = self.deadlines.pop_due(now) {
            if let Some(call) = self.calls.remove(&id) {
                n += 1;
                if let Some(i) = self.backlog.iter().position(|b| b.id == id) {
                    let dropped = self.backlog.remove(i).expect("found");
                    self.release(&dropped.bufs);
                } else {
                    let _ = self.client.cancel(id);
                }
                out(Answer::TimedOut { call });
            }
        }
        n += self.send_backlog(out);
        self.client.flush();
        Ok(n)
    }

    /// Sends the backlog in order while the ring has room. A request that cannot be sent at all
    /// (no shared memory for its body) fails, as the driver fails a waiting call that cannot
    /// enter: left at the head, it would hold back every call behind it and fail every poll.
    fn send_backlog(&mut self, out: &mut dyn FnMut(Answer<'_, C>)) -> usize {
        while let Some(&id) = self.taken_backlog.front() {
            if !matches!(self.client.part_taken(id), Ok(true)) {
                break;
            }
            self.taken_backlog.pop_front();
        }
        let mut n = 0;
        while let Some(b) = self.backlog.front() {
            let error = match self.client.submit(b.id, b.step, b.priority, b.deadline, &b.body, &b.bufs, b.streamed) {
                Ok(true) => {
                    self.backlog.pop_front();
                    continue;
                }
                Ok(false) => break,
                Err(error) => error,
            };
            let b = self.backlog.pop_front().expect("looked at above");
            self.release(&b.bufs);
            let Some(call) = self.calls.remove(&b.id) else { continue };
            n += 1;
            match error {
                EngineError::ArenaExhausted { .. } => {
                    out(Answer::Failed { call, kind: FailureKind::ArenaExhausted, step: b.step, pid: 0, detail: None })
                }
                error => {
                    let why = error.to_string();
                    let detail = Some(Payload::Inline(why.as_bytes()));
                    out(Answer::Failed { call, kind: FailureKind::Rejected, step: b.step, pid: 0, detail })
                }
            }
        }
        n
    }

    /// Raises the flag that makes the engine ring; `false` when responses arrived meanwhile.
    pub fn prepare_sleep(&mut self) -> bool {
        self.client.prepare_sleep()
    }

    /// Answers every pending call with [`Answer::Lost`] (the client is closing).
    pub fn lose_all(&mut self, out: &mut dyn FnMut(Answer<'_, C>)) {
        for b in std::mem::take(&mut self.backlog) {
            self.release(&b.bufs);
        }
        self.taken_backlog.clear();
        self.deadlines.clear();
        for (_, call) in std::mem::take(&mut self.calls) {
            out(Answer::Lost { call });
        }
    }

    fn release(&self, bufs: &[BufRef]) {
        for b in bufs {
            let _ = self.client.arena().unhold(&b.extent());
        }
    }
}
