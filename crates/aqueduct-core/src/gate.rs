#![forbid(unsafe_code)]
//! The batch gate: who decides whether a batch sent ahead of time runs, the worker or the hub.
//!
//! The hub may send a worker its next batch while the worker still handles the current one
//! (pipelining). Until the worker begins that batch, the hub may take it back: to drop a
//! cancelled task before a handler sees it, or to give it to a worker that fell idle. Both sides
//! race on one `AtomicU64` in the worker's slot header, encoded as `begun << 16 | recalled`:
//!
//! - `begun` (48 bits): how many batches the worker has begun (or skipped); batch sequence
//!   numbers start at 0, so the next batch to begin is batch `begun`;
//! - `recalled` (16 bits): a bitmap relative to `begun`: bit `i` set means the hub took back
//!   batch `begun + i`.
//!
//! The worker begins batch `s` with a CAS that advances `begun` to `s + 1` and shifts the bitmap
//! by one (bit 0, batch `s` itself, falls off: set, the worker skips the batch); the hub recalls
//! batch `s >= begun` with a CAS that sets bit `s - begun`. A CAS on the same word either sees
//! the other side's change or is refused, so a batch is either handled or recalled, never both.
//! Several batches may be recalled at once (a hung worker's whole pipeline can be taken back):
//! at most 16 ahead of `begun`, more than the deepest pipeline. After a worker's death, batches
//! with a sequence number `>= begun` never ran.

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
            let next = ((seq + 1) << SHIFT) | (recalled >> 1);
            if self.0.compare_exchange(g, next, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Ok(recalled & 1 == 0);
            }
        }
    }

    /// Hub side: takes batch `seq` back unless the worker has begun it (or it is too far ahead,
    /// or already taken back). Returns whether it did. The word may change under the hub only
    /// by the worker beginning batches, so a refused CAS is retried against the new `begun`.
    pub fn recall(&self, seq: u64) -> bool {
        let mut g = self.0.load(Ordering::Acquire);
        loop {
            let begun = g >> SHIFT;
            // The bitmap has `SHIFT` bits: that many batches ahead of `begun` at most.
            if seq < begun || seq - begun >= u64::from(SHIFT) {
                return false;
            }
            let bit = 1u64 << (seq - begun);
            if g & bit != 0 {
                return false;
            }
            match self.0.compare_exchange(g, g | bit, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => g = now,
            }
        }
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
        assert!(!g.recall(1), "once");
        assert!(g.recall(3), "several at once");
        assert!(g.begin(0).unwrap());
        assert!(!g.begin(1).unwrap(), "batch 1 was recalled");
        assert_eq!(g.begun(), 2);
        assert!(g.begin(2).unwrap());
        assert!(!g.recall(2), "batch 2 already begun");
        assert!(!g.begin(3).unwrap(), "batch 3 was recalled before 0, 1 and 2 began");
        assert!(g.recall(4 + 15), "15 ahead of begun is the furthest");
        assert!(!g.recall(4 + 16));
        assert!(g.begin(4).unwrap());
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
