//! Task identifiers: random (version 4) UUID strings, made without a system call per id and
//! never repeated by a process forked from this one.
//!
//! The random bytes come from the kernel (`getrandom`) a page at a time, into a buffer per
//! thread. A forked child starts with a copy of its parent's buffer, so a fork handler bumps a
//! generation number and every buffer filled before it is thrown away: parent and child never
//! hand out the same bytes. An id needs uniqueness, not secrecy, but the kernel's generator
//! gives both for less than formatting the string costs.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Random bytes fetched per `getrandom` call: 256 ids.
const REFILL: usize = 4096;

/// Bumped in every forked child (and only there).
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static WATCH_FORKS: Once = Once::new();

extern "C" fn forked_child() {
    // Only an atomic store: what a fork handler may do.
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

struct RandomBytes {
    bytes: Box<[u8; REFILL]>,
    used: usize,
    generation: u64,
}

thread_local! {
    static RANDOM: RefCell<RandomBytes> = RefCell::new(RandomBytes {
        bytes: Box::new([0; REFILL]),
        used: REFILL,
        generation: u64::MAX,
    });
}

fn fill(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        match rustix::rand::getrandom(&mut buf[done..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            // getrandom(2) cannot fail on a Linux that runs this engine (3.17+, pidfds need 5.3);
            // without it no id could be trusted to be unique.
            Err(e) => panic!("getrandom failed: {e}"),
        }
    }
}

/// 16 random bytes, fresh in this process.
fn random_16() -> [u8; 16] {
    WATCH_FORKS.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic, which is async-signal-safe,
        // as code run in a forked child before it execs must be. No other handlers are passed.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
        assert_eq!(rc, 0, "pthread_atfork failed");
    });
    let generation = FORK_GENERATION.load(Ordering::Relaxed);
    RANDOM.with(|cell| {
        let mut random = cell.borrow_mut();
        if random.used + 16 > REFILL || random.generation != generation {
            fill(&mut random.bytes[..]);
            random.used = 0;
            random.generation = generation;
        }
        let at = random.used;
        random.used += 16;
        let mut out = [0; 16];
        out.copy_from_slice(&random.bytes[at..at + 16]);
        out
    })
}

/// A random UUID of version 4 (RFC 9562), as 36 lowercase ASCII characters: what Python's
/// `str(uuid.uuid4())` gives.
pub fn uuid4() -> [u8; 36] {
    let mut bytes = random_16();
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // the RFC variant
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1; // the dash already there
        }
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0x0f)];
        at += 2;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_have_the_uuid4_shape() {
        let id = uuid4();
        let text = std::str::from_utf8(&id).unwrap();
        let groups: Vec<&str> = text.split('-').collect();
        assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{text}");
        assert!(text.bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(&text[14..15], "4", "version nibble in {text}");
        assert!("89ab".contains(&text[19..20]), "variant nibble in {text}");
    }

    #[test]
    fn ids_do_not_repeat_across_refills() {
        // More than one buffer's worth, so a refill is crossed.
        let n = REFILL / 16 * 3 + 7;
        let ids: HashSet<[u8; 36]> = (0..n).map(|_| uuid4()).collect();
        assert_eq!(ids.len(), n);
    }

    #[test]
    fn a_fork_generation_change_discards_the_buffer() {
        let before = uuid4();
        // What the fork handler does in a child: the rest of this thread's buffer, which the
        // parent would also hand out, must not be used.
        let next_in_buffer = RANDOM.with(|cell| {
            let random = cell.borrow();
            let mut b = [0u8; 16];
            b.copy_from_slice(&random.bytes[random.used..random.used + 16]);
            b
        });
        forked_child();
        let after = random_16();
        assert_ne!(after, next_in_buffer);
        assert_ne!(uuid4(), before);
    }
}
