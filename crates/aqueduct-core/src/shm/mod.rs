//! Shared memory: the only module tree of the engine that contains `unsafe` code.
//!
//! - [`region`] owns one OS mapping (a memfd, or a heap buffer for tests under Miri) and hands
//!   out bounds- and alignment-checked atomics and raw byte copies; no `&[u8]` to memory that
//!   another process writes is ever formed.
//! - [`ring`] is a single-producer single-consumer ring of variable-size records laid out in a
//!   region.
//! - [`arena`] is the process-wide pool for payloads too large for a ring: extents move
//!   between processes as descriptors, never as bytes, and are reference counted per process.
//! - [`event`] is the futex-based wake-up word that waiters park on.
//!
//! Every structure placed in shared memory is `#[repr(C)]`, starts with a magic number and a
//! version, and has its size checked at compile time.

pub mod arena;
pub mod event;
pub mod fd;
pub mod region;
pub mod ring;

pub use arena::{Arena, ArenaLayout, BufRef, Extent};
pub use event::FutexEvent;
pub use region::SharedRegion;
pub use ring::{Consumer, Producer, RecordView, RingLayout};
