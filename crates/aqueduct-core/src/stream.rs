#![forbid(unsafe_code)]
//! Streams: partial results of a task, sent by its worker while the handler runs, with flow
//! control and cancellation shared between the worker and the hub.
//!
//! A task whose caller reads partial results carries [`crate::message::FLAG_STREAM`]. Its
//! worker may send any number of [`crate::message::TAG_PART`] records for it before the result;
//! the hub hands each to the driver with a [`PartReceipt`], and the front end gives the receipt
//! back ([`crate::hub::Hub::release_part`]) when its caller has taken the part. A worker that has
//! [`STREAM_WINDOW`] parts of one task not yet taken waits: that is the backpressure that keeps a
//! slow consumer from making memory grow, and the window is the bound on what is buffered per
//! stream. The wait ends when a part is taken, when the caller goes away (the hub marks the task
//! cancelled: the handler is told), or at the task's deadline (the driver fails the call and
//! cancels the task).
//!
//! Both sides meet on one `AtomicU64` per batch position of the slot (the running batch's task
//! `i` uses word `i`), encoded `seq << 32 | cancelled << 31 | taken`:
//!
//! - `seq` (32 bits): the low bits of the batch sequence number the word belongs to. The worker
//!   writes it for every position of a batch *before* it begins the batch at the gate
//!   ([`crate::gate`]), so a hub that finds the batch begun also finds its words;
//! - `cancelled`: the caller went away (set by the hub);
//! - `taken` (31 bits): parts the caller has taken (added by the hub).
//!
//! The hub's updates are compare-and-swaps that check `seq`: a receipt of a batch that has
//! ended, or of a dead worker's batch, finds another `seq` and changes nothing.

use std::sync::atomic::{AtomicU64, Ordering};

/// Parts of one task a worker may send ahead of its caller (see the module documentation).
/// Eight keeps a token stream flowing while the consumer takes parts in bursts, and bounds a
/// stream of large arrays to eight of them in the pool.
pub const STREAM_WINDOW: u32 = 8;

const CANCELLED: u64 = 1 << 31;
const TAKEN: u64 = CANCELLED - 1;

/// Where a part came from, for giving it back: the slot, the worker's epoch in it, the batch and
/// the position in the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PartReceipt {
    pub slot: u16,
    pub pos: u16,
    pub epoch: u32,
    pub seq: u64,
}

impl PartReceipt {
    /// The receipt as one integer, for front ends that carry it as an opaque number.
    pub fn to_u128(self) -> u128 {
        (self.slot as u128) << 112 | (self.pos as u128) << 96 | (self.epoch as u128) << 64 | self.seq as u128
    }

    pub fn from_u128(v: u128) -> Self {
        Self { slot: (v >> 112) as u16, pos: (v >> 96) as u16, epoch: (v >> 64) as u32, seq: v as u64 }
    }
}

/// What the worker reads of its task's stream word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamState {
    pub cancelled: bool,
    pub taken: u32,
}

/// One batch position's word (see the module documentation).
#[derive(Clone, Copy)]
pub struct StreamWord<'a>(&'a AtomicU64);

fn tag(seq: u64) -> u64 {
    (seq & 0xffff_ffff) << 32
}

impl<'a> StreamWord<'a> {
    pub fn new(word: &'a AtomicU64) -> Self {
        Self(word)
    }

    /// Worker side: batch `seq` is about to begin; nothing taken, not cancelled.
    pub fn begin(&self, seq: u64) {
        self.0.store(tag(seq), Ordering::Release);
    }

    /// Worker side: the state of batch `seq`'s task at this position, or `None` if the word
    /// belongs to another batch (which cannot happen while the worker runs `seq`).
    pub fn read(&self, seq: u64) -> Option<StreamState> {
        let w = self.0.load(Ordering::Acquire);
        (w & !(CANCELLED | TAKEN) == tag(seq))
            .then_some(StreamState { cancelled: w & CANCELLED != 0, taken: (w & TAKEN) as u32 })
    }

    fn update(&self, seq: u64, f: impl Fn(u64) -> u64) -> bool {
        let mut w = self.0.load(Ordering::Acquire);
        loop {
            if w & !(CANCELLED | TAKEN) != tag(seq) {
                return false;
            }
            match self.0.compare_exchange_weak(w, f(w), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => w = now,
            }
        }
    }

    /// Hub side: the caller took one part of batch `seq`'s task. Returns whether the word was
    /// that batch's.
    pub fn take(&self, seq: u64) -> bool {
        self.update(seq, |w| if w & TAKEN == TAKEN { w } else { w + 1 })
    }

    /// Hub side: the caller of batch `seq`'s task went away. Returns whether the word was that
    /// batch's.
    pub fn cancel(&self, seq: u64) -> bool {
        self.update(seq, |w| w | CANCELLED)
    }
}

/// Whether a worker that has sent `sent` parts may send another, given what the hub wrote.
pub fn has_room(sent: u32, state: StreamState) -> bool {
    sent.saturating_sub(state.taken) < STREAM_WINDOW
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_word_counts_what_is_taken_and_keeps_the_cancel() {
        let a = AtomicU64::new(0);
        let w = StreamWord::new(&a);
        w.begin(5);
        assert_eq!(w.read(5), Some(StreamState { cancelled: false, taken: 0 }));
        assert!(w.take(5) && w.take(5));
        assert!(w.cancel(5));
        assert_eq!(w.read(5), Some(StreamState { cancelled: true, taken: 2 }));
        assert!(w.take(5));
        assert_eq!(w.read(5), Some(StreamState { cancelled: true, taken: 3 }));
    }

    #[test]
    fn a_receipt_of_another_batch_changes_nothing() {
        let a = AtomicU64::new(0);
        let w = StreamWord::new(&a);
        w.begin(6);
        assert!(!w.take(5));
        assert!(!w.cancel(7));
        assert_eq!(w.read(6), Some(StreamState { cancelled: false, taken: 0 }));
        assert_eq!(w.read(5), None);
    }

    #[test]
    fn the_window_holds_a_worker_back() {
        let state = |taken| StreamState { cancelled: false, taken };
        assert!(has_room(0, state(0)));
        assert!(has_room(STREAM_WINDOW - 1, state(0)));
        assert!(!has_room(STREAM_WINDOW, state(0)));
        assert!(has_room(STREAM_WINDOW, state(1)));
    }

    #[test]
    fn the_hub_and_the_worker_race_on_a_word() {
        let a = std::sync::Arc::new(AtomicU64::new(0));
        StreamWord::new(&a).begin(1);
        let hub = {
            let a = a.clone();
            std::thread::spawn(move || {
                let w = StreamWord::new(&a);
                (0..1000).filter(|_| w.take(1)).count()
            })
        };
        let w = StreamWord::new(&a);
        // The worker moves on to batch 2 while the hub still gives receipts of batch 1 back.
        std::thread::yield_now();
        w.begin(2);
        let taken_in_1 = hub.join().unwrap();
        assert!(taken_in_1 <= 1000);
        let st = w.read(2).unwrap();
        assert!(st.taken == 0, "no receipt of batch 1 counted in batch 2");
    }

    proptest! {
        #[test]
        fn receipts_roundtrip(slot: u16, pos: u16, epoch: u32, seq: u64) {
            let r = PartReceipt { slot, pos, epoch, seq };
            prop_assert_eq!(PartReceipt::from_u128(r.to_u128()), r);
        }
    }
}
