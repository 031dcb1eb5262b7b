#![forbid(unsafe_code)]
//! The wire format of the records that cross a ring: record tags and the fixed task header.
//!
//! A task travels as one record: a 48-byte [`TaskHeader`], then `nbufs` 24-byte descriptors of
//! its out-of-band buffers in the pool ([`crate::shm::BufRef`]: the large arrays of a pickled
//! task), then its body, either inline or as a pool [`Extent`] named in the header (the body
//! stays in shared memory and only the descriptor moves). The header is encoded field by field
//! in little endian, so no transmute of shared bytes is ever needed.
//!
//! | offset | field |
//! |---|---|
//! | 0 | `task_id: u64` |
//! | 8 | `deadline: u64`, CLOCK_MONOTONIC ns, 0 = none |
//! | 16 | `sent_at: u64`, CLOCK_MONOTONIC ns when the record was written (transfer time) |
//! | 24 | `priority: u8`, `body: u8` (0 inline, 1 extent), `status: u8`, `flags: u8` ([`FLAG_STREAM`]) |
//! | 28 | `route: u16` (the step the task goes to next, [`ROUTE_DONE`] = back to the caller), `nbufs: u16` |
//! | 32 | `ext_head: u32`, `ext_pages: u32` |
//! | 40 | `ext_len: u64` |

use crate::clock::Nanos;
use crate::error::{EngineError, Result};
use crate::shm::Extent;

/// Hub to worker: a batch follows; payload `count: u32`, reserved `u32`, `seq: u64` (see
/// [`crate::gate`]), then `count` task records.
pub const TAG_BATCH: u32 = 1;
/// Hub to worker: one task of the current batch.
pub const TAG_TASK: u32 = 2;
/// Worker to hub: the outcome of one task.
pub const TAG_RESULT: u32 = 3;
/// Worker to hub: the batch `seq: u64` (the payload) is finished.
pub const TAG_BATCH_DONE: u32 = 4;
/// Worker to hub: start-up (`on_start`) finished; the worker takes batches.
pub const TAG_READY: u32 = 5;
/// Worker to hub: start-up failed; the payload is a UTF-8 description of the cause.
pub const TAG_START_FAILED: u32 = 6;
/// Hub to worker: exit once the current batch is done.
pub const TAG_STOP: u32 = 7;
/// Worker to hub: a partial result of one task of the current batch (a task header, its buffer
/// table and body, as a result; the task stays the worker's). See [`crate::stream`].
pub const TAG_PART: u32 = 8;

/// Task flag: the caller reads this task's partial results, so the worker sends them.
pub const FLAG_STREAM: u8 = 1;

pub const HEADER_LEN: usize = 48;
pub const ROUTE_DONE: u16 = u16::MAX;

/// What happened to a task in a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Handled; the body is the task's new state.
    Ok = 0,
    /// The handler raised; the body describes the exception.
    Error = 1,
    /// The deadline passed before the handler saw it; dropped, body empty.
    Expired = 2,
}

impl TryFrom<u8> for Status {
    type Error = EngineError;
    fn try_from(v: u8) -> Result<Self> {
        match v {
            0 => Ok(Status::Ok),
            1 => Ok(Status::Error),
            2 => Ok(Status::Expired),
            _ => Err(EngineError::Protocol("unknown task status")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskHeader {
    pub task_id: u64,
    pub deadline: Nanos,
    pub sent_at: Nanos,
    pub priority: u8,
    pub status: Status,
    pub route: u16,
    /// Out-of-band buffer descriptors following the header.
    pub nbufs: u16,
    /// [`FLAG_STREAM`], or 0.
    pub flags: u8,
    /// `Some` when the body is in the pool.
    pub extent: Option<Extent>,
}

impl TaskHeader {
    pub fn new(task_id: u64, priority: u8, deadline: Nanos) -> Self {
        Self {
            task_id,
            deadline,
            sent_at: Nanos::ZERO,
            priority,
            status: Status::Ok,
            route: 0,
            nbufs: 0,
            flags: 0,
            extent: None,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.task_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.deadline.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.sent_at.0.to_le_bytes());
        b[24] = self.priority;
        b[25] = u8::from(self.extent.is_some());
        b[26] = self.status as u8;
        b[27] = self.flags;
        b[28..30].copy_from_slice(&self.route.to_le_bytes());
        b[30..32].copy_from_slice(&self.nbufs.to_le_bytes());
        if let Some(e) = self.extent {
            b[32..36].copy_from_slice(&e.head.to_le_bytes());
            b[36..40].copy_from_slice(&e.pages.to_le_bytes());
            b[40..48].copy_from_slice(&e.len.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER_LEN {
            return Err(EngineError::Protocol("task record shorter than its header"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let extent = match b[25] {
            0 => None,
            1 => Some(Extent { head: u32_at(32), pages: u32_at(36), len: u64_at(40) }),
            _ => return Err(EngineError::Protocol("unknown body kind")),
        };
        Ok(Self {
            task_id: u64_at(0),
            deadline: Nanos(u64_at(8)),
            sent_at: Nanos(u64_at(16)),
            priority: b[24],
            status: Status::try_from(b[26])?,
            route: u16::from_le_bytes([b[28], b[29]]),
            nbufs: u16::from_le_bytes([b[30], b[31]]),
            flags: b[27],
            extent,
        })
    }

    pub fn is_expired(&self, now: Nanos) -> bool {
        self.deadline != Nanos::ZERO && now >= self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_roundtrips(id: u64, dl: u64, sent: u64, prio: u8, route: u16, nbufs: u16, st in 0u8..3,
                             flags: u8, ext in proptest::option::of((any::<u32>(), any::<u32>(), any::<u64>()))) {
            let h = TaskHeader {
                task_id: id, deadline: Nanos(dl), sent_at: Nanos(sent), priority: prio,
                status: Status::try_from(st).unwrap(), route, nbufs, flags,
                extent: ext.map(|(head, pages, len)| Extent { head, pages, len }),
            };
            prop_assert_eq!(TaskHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn short_or_bad_headers_are_rejected() {
        assert!(TaskHeader::decode(&[0; 10]).is_err());
        let mut b = TaskHeader::new(1, 0, Nanos::ZERO).encode();
        b[26] = 9;
        assert!(TaskHeader::decode(&b).is_err());
    }
}
