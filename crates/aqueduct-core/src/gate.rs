#![forbid(unsafe_code)]
//! The batch gate: who decides whether a batch sent ahead of time runs, the worker or the hub.
//!
//! The hub may send a worker its next batch while the worker still handles the current one
//! (pipelining). Until the worker begins that batch, the hub may take it back: to drop a
//! cancelled task before a handler sees it. Both sides race on one `AtomicU64` in the worker's
//! slot header, encoded as `begun << 16 | recalled`:
//!
//! - `begun` (48 bits): how many batches the worker has begun (or skipped); batch sequence
//!   numbers start at 0, so the next batch to begin is batch `begun`;
//! - `recalled` (16 bits): 0, or `s - begun + 1` when the hub took back batch `s`.
//!
//! The worker begins batch `s` with a CAS that advances `begun` to `s + 1` (shifting a pending
//! recall of a later batch along); the hub recalls batch `s >= begun` with a CAS that sets
//! `recalled`. A CAS on the same word either sees the other side's change or is refused, so a
//! batch is either handled or recalled, never both. A worker that meets its batch recalled skips
//! it. After a worker's death, batches with a sequence number `>= begun` never ran.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{EngineError, Result};

const SHIFT: u32 = 16;
const MASK: u64 = (1 << SHIFT) - 1;

#[derive(Clone, Copy)]
pub struct BatchGate<'a>(&'a AtomicU64);

impl<'a> BatchGate<'a> {
    pub fn new(word: &'a AtomicU64) -> Self {
        Self(word)
    }

    /// Batches the worker has begun (or skipped as recalled).
    pub fn begun(&self) -> u64 {
        self.0.load(Ordering::Acquire) >> SHIFT
    }

    /// Worker side: begins batch `seq`. `Ok(true)`: handle it; `Ok(false)`: the hub recalled it,
    /// skip it.
    pub fn begin(&self, seq: u64) -> Result<bool> {
        loop {
            let g = self.0.load(Ordering::Acquire);
            if g >> SHIFT != seq {
                return Err(EngineError::Protocol("batch sequence out of step with the gate"));
            }
            let recalled = g & MASK;
            let (next, run) = match recalled {
                0 => ((seq + 1) << SHIFT, true),
                1 => ((seq + 1) << SHIFT, false),
                r => (((seq + 1) << SHIFT) | (r - 1), true),
            };
            if self.0.compare_exchange(g, next, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Ok(run);
            }
        }
    }

    /// Hub side: takes batch `seq` back unless the worker has begun it (or another recall is
    /// pending). Returns whether it did.
    pub fn recall(&self, seq: u64) -> bool {
        let g = self.0.load(Ordering::Acquire);
        let begun = g >> SHIFT;
        if g & MASK != 0 || seq < begun || seq - begun + 1 > MASK {
            return false;
        }
        let next = (begun << SHIFT) | (seq - begun + 1);
        self.0.compare_exchange(g, next, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// For a fresh worker in the slot.
    pub fn reset(&self) {
        self.0.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn begin_and_recall_exclude_each_other() {
        let w = AtomicU64::new(0);
        let g = BatchGate::new(&w);
        assert!(g.recall(1), "a batch beyond the next one can be recalled");
        assert!(!g.recall(0), "one recall at a time");
        assert!(g.begin(0).unwrap());
        assert!(!g.begin(1).unwrap(), "batch 1 was recalled");
        assert_eq!(g.begun(), 2);
        assert!(g.begin(2).unwrap());
        assert!(!g.recall(2), "batch 2 already begun");
        assert!(g.recall(3));
        assert!(!g.begin(3).unwrap());
        assert!(g.begin(7).is_err(), "sequence must follow the gate");
    }

    #[test]
    fn racing_threads_agree_on_every_batch() {
        let rounds = if cfg!(miri) { 50 } else { 20_000 };
        let w = Arc::new(AtomicU64::new(0));
        let recalled = {
            let w = w.clone();
            std::thread::spawn(move || {
                let g = BatchGate::new(&w);
                (0..rounds).filter(|&s| g.recall(s)).collect::<Vec<u64>>()
            })
        };
        let g = BatchGate::new(&w);
        let mut begun = Vec::new();
        for s in 0..rounds {
            if g.begin(s).unwrap() {
                begun.push(s);
            }
        }
        let recalled: std::collections::HashSet<u64> = recalled.join().unwrap().into_iter().collect();
        let begun: std::collections::HashSet<u64> = begun.into_iter().collect();
        for s in 0..rounds {
            assert!(begun.contains(&s) ^ recalled.contains(&s), "batch {s} must be begun or recalled, not both");
        }
    }
}
