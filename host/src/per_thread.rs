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

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

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

/// Per-thread shares of one `Arc`: a run keeps its thread's share, whose reference count only
/// that thread writes, where a clone of the `Arc` itself would write the count every run on
/// every core writes. Every share keeps the value alive.
pub struct Shares<T> {
    value: Arc<T>,
    shares: PerThread<Share<T>>,
}

impl<T> Shares<T> {
    /// Shares of `value`.
    pub fn new(value: Arc<T>) -> Self {
        let original = Share(Arc::new(Arc::clone(&value)));
        Shares { value, shares: PerThread::new(original, |share| Share(Arc::new(Arc::clone(&share.0)))) }
    }

    /// The value's `Arc`.
    pub fn arc(&self) -> &Arc<T> {
        &self.value
    }

    /// The calling thread's share.
    pub fn share(&self) -> Share<T> {
        self.shares.get().clone()
    }
}

impl<T> Deref for Shares<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

/// One thread's share of an `Arc` (see [`Shares`]).
#[expect(clippy::redundant_allocation, reason = "the outer `Arc` is the thread's own count, the point of a share")]
pub struct Share<T>(Arc<Arc<T>>);

impl<T> Clone for Share<T> {
    fn clone(&self) -> Self {
        Share(Arc::clone(&self.0))
    }
}

impl<T> Deref for Share<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Shares<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Share<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Weak;

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

    #[test]
    fn a_thread_clones_its_own_share_and_every_share_keeps_the_value() {
        let value = Arc::new(String::from("pipeline"));
        let weak: Weak<String> = Arc::downgrade(&value);
        let shares = Shares::new(value);
        let (here, again) = (shares.share(), shares.share());
        assert!(Arc::ptr_eq(&here.0, &again.0), "one share per thread");
        let there = std::thread::scope(|scope| scope.spawn(|| shares.share()).join().unwrap());
        assert!([&*here, &*there, &*shares].iter().all(|value| *value == "pipeline"));
        assert!(!Arc::ptr_eq(&here.0, &there.0), "another thread, another share");
        drop(shares);
        assert_eq!(weak.upgrade().as_deref().map(String::as_str), Some("pipeline"), "the shares keep it");
        drop((here, again, there));
        assert!(weak.upgrade().is_none());
    }
}
