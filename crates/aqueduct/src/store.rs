#![forbid(unsafe_code)]
//! Where the tasks of a thread-mode flow wait while the engine moves their keys.
//!
//! In thread mode a task never leaves the process, so it is never serialised: the caller puts
//! it here and only its 8-byte key travels through the engine's rings. A worker takes the tasks
//! of its batch out (one lock per batch), handles them in place, and puts them back; the
//! caller takes its task out when the engine reports it done. Zero copies of the task itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

enum Entry<T> {
    Here(T),
    /// A worker has it.
    Taken,
    /// The caller gave up while a worker had it: dropped when the worker gives it back.
    Abandoned,
}

pub(crate) struct Store<T> {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry<T>>>,
}

impl<T> Store<T> {
    pub(crate) fn new() -> Self {
        Self { next: AtomicU64::new(1), map: Mutex::new(HashMap::new()) }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry<T>>> {
        // A panic while holding the lock cannot leave the map inconsistent (single operations).
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, task: T) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(key, Entry::Here(task));
        key
    }

    /// Takes the tasks of a batch out; `None` for a task the caller gave up on meanwhile.
    pub(crate) fn take(&self, keys: &[u64]) -> Vec<Option<T>> {
        let mut map = self.map();
        keys.iter()
            .map(|k| match map.get_mut(k) {
                Some(entry @ Entry::Here(_)) => match std::mem::replace(entry, Entry::Taken) {
                    Entry::Here(t) => Some(t),
                    _ => unreachable!(),
                },
                _ => None,
            })
            .collect()
    }

    /// Gives handled tasks back (dropping those whose caller gave up).
    pub(crate) fn put_back(&self, tasks: impl IntoIterator<Item = (u64, T)>) {
        let mut map = self.map();
        for (key, task) in tasks {
            match map.get_mut(&key) {
                Some(entry @ Entry::Taken) => *entry = Entry::Here(task),
                _ => {
                    map.remove(&key);
                }
            }
        }
    }

    /// Forgets tasks a worker had and lost (their handler failed).
    pub(crate) fn forget(&self, keys: impl IntoIterator<Item = u64>) {
        let mut map = self.map();
        for key in keys {
            map.remove(&key);
        }
    }

    /// The task of a finished key, for its caller.
    pub(crate) fn finish(&self, key: u64) -> Option<T> {
        match self.map().remove(&key) {
            Some(Entry::Here(t)) => Some(t),
            _ => None,
        }
    }

    /// The caller will not take this task: drop it now, or when its worker gives it back.
    pub(crate) fn discard(&self, key: u64) {
        let mut map = self.map();
        match map.get_mut(&key) {
            Some(entry @ Entry::Taken) => *entry = Entry::Abandoned,
            Some(_) => {
                map.remove(&key);
            }
            None => {}
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_go_out_and_back_and_abandoned_ones_are_dropped() {
        let store = Store::new();
        let a = store.insert(String::from("a"));
        let b = store.insert(String::from("b"));
        let taken = store.take(&[a, b]);
        assert_eq!(taken, vec![Some("a".to_string()), Some("b".to_string())]);
        assert_eq!(store.take(&[a]), vec![None], "a task is out once");
        store.discard(b); // the caller of b gave up while a worker had it
        store.put_back([(a, "A".to_string()), (b, "B".to_string())]);
        assert_eq!(store.finish(a).as_deref(), Some("A"));
        assert_eq!(store.finish(b), None);
        assert_eq!(store.len(), 0);
        let c = store.insert(String::from("c"));
        store.discard(c);
        assert_eq!(store.len(), 0, "a waiting task is dropped at once");
    }
}
