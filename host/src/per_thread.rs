//! Per-thread copies of what every run writes, so that those writes stay in one core's cache.
//!
//! A value that runs on every core write (an `Arc`'s reference count taken for each run, a
//! counter) moves its cache line between the cores at each write. Given one copy per thread,
//! each core writes its own.
//!
//! Rules:
//! - a thread takes a slot the first time it asks, in turn; beyond [`SLOTS`] threads share slots
//!   (they stay correct, only slower);
//! - a slot's copy is made by the first thread that uses it, so it comes from that thread's
//!   heap and shares no cache line with another thread's copy.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many copies at most: more than the runtime's worker threads on most hosts.
pub const SLOTS: usize = 16;

/// The calling thread's slot, in `0..SLOTS`.
pub fn slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS;
    }
    SLOT.with(|slot| *slot)
}

/// A value with a copy for each thread that reads it, each made from the original.
pub struct PerThread<T> {
    original: T,
    copy: fn(&T) -> T,
    copies: [OnceLock<T>; SLOTS],
}

impl<T> PerThread<T> {
    /// `original`, copied with `copy` for each thread that asks.
    pub fn new(original: T, copy: fn(&T) -> T) -> Self {
        PerThread { original, copy, copies: std::array::from_fn(|_| OnceLock::new()) }
    }

    /// The calling thread's copy.
    pub fn get(&self) -> &T {
        self.copies[slot()].get_or_init(|| (self.copy)(&self.original))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn each_thread_gets_its_own_copy_of_the_same_value() {
        let original = Arc::<str>::from("step");
        let shared = PerThread::new(Arc::clone(&original), |name| Arc::from(&**name));
        let here = Arc::clone(shared.get());
        assert!(Arc::ptr_eq(&here, shared.get()), "a thread keeps its copy");
        assert!(!Arc::ptr_eq(&here, &original), "a copy, not the original");
        let (there, there_slot) = std::thread::scope(|scope| scope.spawn(|| (Arc::clone(shared.get()), slot())).join().unwrap());
        assert_eq!(there, here, "the same value");
        // Threads beyond SLOTS share slots: another slot, another copy; the same slot, the same.
        assert_eq!(Arc::ptr_eq(&there, &here), there_slot == slot());
    }
}
