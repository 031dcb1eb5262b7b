#![forbid(unsafe_code)]
//! A bounded multi-level FIFO with a starvation guard: the queue in front of every step.
//!
//! # Policy
//! Level `n - 1` is the highest priority. A pop normally takes the head of the highest
//! non-empty level. To keep lower levels from starving, every `fair_every`-th pop made while
//! some level below the top waits ("contended pops") goes to the task that has waited longest
//! among all levels below the top. Under saturation the lower levels therefore get at least
//! `1 / fair_every` of the dispatches between them, in arrival order, and no task waits forever.
//! `fair_every = 0` disables the guard (strict priority, starvation possible).
//!
//! Within a level, tasks leave in arrival order. The bound counts tasks at every level together.

use std::collections::VecDeque;

struct Entry<T> {
    /// Arrival order; `push_front` uses negative numbers so re-queued items come first.
    seq: i64,
    item: T,
}

pub struct PriorityQueue<T> {
    levels: Vec<VecDeque<Entry<T>>>,
    len: usize,
    capacity: usize,
    next_seq: i64,
    front_seq: i64,
    fair_every: u32,
    contended_streak: u32,
}

impl<T> PriorityQueue<T> {
    pub fn new(levels: usize, capacity: usize, fair_every: u32) -> Self {
        assert!(levels >= 1);
        assert!(fair_every != 1, "fair_every = 1 would invert priorities");
        Self {
            levels: (0..levels).map(|_| VecDeque::new()).collect(),
            len: 0,
            capacity,
            next_seq: 0,
            front_seq: -1,
            fair_every,
            contended_streak: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn is_full(&self) -> bool {
        self.len >= self.capacity
    }
    pub fn levels(&self) -> usize {
        self.levels.len()
    }
    pub fn level_len(&self, level: usize) -> usize {
        self.levels[level].len()
    }

    /// Appends to `level` (clamped to the highest level). Fails with the item when full.
    pub fn push(&mut self, level: usize, item: T) -> Result<(), T> {
        if self.is_full() {
            return Err(item);
        }
        self.push_unbounded(level, item);
        Ok(())
    }

    /// Appends even past the bound (tasks forwarded from a batch that already ran; the caller
    /// stops feeding the producer instead of refusing its output).
    pub fn push_unbounded(&mut self, level: usize, item: T) {
        let level = level.min(self.levels.len() - 1);
        self.levels[level].push_back(Entry { seq: self.next_seq, item });
        self.next_seq += 1;
        self.len += 1;
    }

    /// Puts an item back at the head of its level, ahead of everything that arrived (a task
    /// handed back by a worker that died before starting it).
    pub fn push_front(&mut self, level: usize, item: T) {
        let level = level.min(self.levels.len() - 1);
        self.levels[level].push_front(Entry { seq: self.front_seq, item });
        self.front_seq -= 1;
        self.len += 1;
    }

    fn top(&self) -> Option<usize> {
        (0..self.levels.len()).rev().find(|&l| !self.levels[l].is_empty())
    }

    /// The level the next `pop` takes from.
    fn next_level(&self) -> Option<usize> {
        let top = self.top()?;
        if self.fair_every == 0 {
            return Some(top);
        }
        let oldest_below =
            (0..top).filter(|&l| !self.levels[l].is_empty()).min_by_key(|&l| self.levels[l].front().unwrap().seq);
        match oldest_below {
            Some(l) if self.contended_streak + 1 >= self.fair_every => Some(l),
            _ => Some(top),
        }
    }

    pub fn pop(&mut self) -> Option<(usize, T)> {
        let level = self.next_level()?;
        let top = self.top()?;
        let contended = (0..top).any(|l| !self.levels[l].is_empty());
        if level != top || !contended {
            self.contended_streak = 0;
        } else {
            self.contended_streak += 1;
        }
        let e = self.levels[level].pop_front()?;
        self.len -= 1;
        Some((level, e.item))
    }

    /// The item the next `pop` would return.
    pub fn peek(&self) -> Option<&T> {
        self.next_level().and_then(|l| self.levels[l].front()).map(|e| &e.item)
    }

    /// The oldest item at any level (arrival order).
    pub fn oldest(&self) -> Option<&T> {
        self.levels.iter().filter_map(|q| q.front()).min_by_key(|e| e.seq).map(|e| &e.item)
    }

    /// Removes every item for which `drop` returns true, returning them.
    pub fn remove_where(&mut self, mut drop: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for q in &mut self.levels {
            let mut kept = VecDeque::with_capacity(q.len());
            for e in q.drain(..) {
                if drop(&e.item) {
                    out.push(e.item);
                } else {
                    kept.push_back(e);
                }
            }
            *q = kept;
        }
        self.len -= out.len();
        out
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.levels.iter().flat_map(|q| q.iter().map(|e| &e.item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strict_order_without_contention() {
        let mut q = PriorityQueue::new(3, 10, 4);
        q.push(0, "low").unwrap();
        q.push(2, "high").unwrap();
        q.push(1, "mid").unwrap();
        assert_eq!(q.pop().unwrap().1, "high");
        assert_eq!(q.pop().unwrap().1, "mid");
        assert_eq!(q.pop().unwrap().1, "low");
        assert!(q.pop().is_none());
    }

    #[test]
    fn bound_is_enforced() {
        let mut q = PriorityQueue::new(2, 2, 0);
        q.push(0, 1).unwrap();
        q.push(1, 2).unwrap();
        assert_eq!(q.push(1, 3), Err(3));
        q.push_unbounded(1, 4);
        assert_eq!(q.len(), 3);
    }

    proptest! {
        /// Nothing is lost or duplicated, the bound holds, and FIFO holds within a level.
        #[test]
        fn no_loss_no_duplication_fifo_per_level(
            ops in proptest::collection::vec((0usize..4, any::<bool>()), 1..400),
            cap in 1usize..50, fair in prop_oneof![Just(0u32), 2u32..10],
        ) {
            let mut q = PriorityQueue::new(4, cap, fair);
            let mut next = 0u64;
            let mut accepted = std::collections::HashSet::new();
            let mut popped = Vec::new();
            for (level, is_push) in ops {
                if is_push {
                    if q.push(level, (level, next)).is_ok() { accepted.insert(next); }
                    next += 1;
                } else if let Some((l, item)) = q.pop() {
                    prop_assert_eq!(l, item.0);
                    popped.push(item);
                }
                prop_assert!(q.len() <= cap);
            }
            while let Some((_, item)) = q.pop() { popped.push(item); }
            let ids: std::collections::HashSet<u64> = popped.iter().map(|p| p.1).collect();
            prop_assert_eq!(ids.len(), popped.len(), "duplicate");
            prop_assert_eq!(ids, accepted, "lost or invented");
            for level in 0..4 {
                let seq: Vec<u64> = popped.iter().filter(|p| p.0 == level).map(|p| p.1).collect();
                prop_assert!(seq.windows(2).all(|w| w[0] < w[1]), "FIFO broken at level {}", level);
            }
        }

        /// Under permanent contention a lower level gets at least one pop in every `fair_every`.
        #[test]
        fn lower_levels_never_starve(fair in 2u32..12, rounds in 50usize..300) {
            let mut q = PriorityQueue::new(3, usize::MAX, fair);
            let mut low_served = 0usize;
            let mut since_low = 0u32;
            for i in 0..rounds {
                // Keep every level backlogged.
                for level in 0..3 { while q.level_len(level) < 2 { q.push(level, i).unwrap(); } }
                let (level, _) = q.pop().unwrap();
                if level < 2 { low_served += 1; since_low = 0; } else { since_low += 1; }
                prop_assert!(since_low < fair, "top level served {} times in a row", since_low);
            }
            prop_assert!(low_served * fair as usize >= rounds - fair as usize);
        }

        /// Without the guard, priority is strict.
        #[test]
        fn strict_priority_when_guard_disabled(items in proptest::collection::vec(0usize..3, 1..100)) {
            let mut q = PriorityQueue::new(3, usize::MAX, 0);
            for (i, &l) in items.iter().enumerate() { q.push(l, i).unwrap(); }
            let mut last = usize::MAX;
            while let Some((l, _)) = q.pop() { prop_assert!(l <= last); last = l; }
        }
    }
}
