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
//!
//! A shared count that every run takes from and gives back to (permits, bytes of a budget) is
//! kept the same way: each thread keeps a [`Stock`] of units at hand, taken from and given back
//! to the shared count in bulk.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_utils::CachePadded;

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

/// Units each thread keeps at hand, out of a shared count that counts them as taken: a thread
/// takes from and gives back to its own stock, on a cache line no other thread writes.
#[derive(Debug)]
pub struct Stock {
    slots: Box<[CachePadded<AtomicU64>; SLOTS]>,
}

impl Default for Stock {
    fn default() -> Self {
        Stock { slots: Box::new(std::array::from_fn(|_| CachePadded::new(AtomicU64::new(0)))) }
    }
}

impl Stock {
    /// Takes `units` from the calling thread's stock, if it has that many.
    pub fn take(&self, units: u64) -> bool {
        let stock = &self.slots[slot()];
        let mut held = stock.load(Ordering::Relaxed);
        while held >= units {
            match stock.compare_exchange_weak(held, held - units, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => held = now,
            }
        }
        false
    }

    /// Adds `units` to the calling thread's stock if it then holds at most `most`; returns
    /// false, adding nothing, if not.
    pub fn put(&self, units: u64, most: u64) -> bool {
        let stock = &self.slots[slot()];
        if stock.load(Ordering::Relaxed).saturating_add(units) > most {
            return false;
        }
        stock.fetch_add(units, Ordering::SeqCst);
        true
    }

    /// Empties the calling thread's stock; returns what it held.
    pub fn take_here(&self) -> u64 {
        self.slots[slot()].swap(0, Ordering::SeqCst)
    }

    /// Empties every thread's stock; returns what they held.
    pub fn take_all(&self) -> u64 {
        self.slots.iter().map(|stock| stock.swap(0, Ordering::SeqCst)).sum()
    }

    /// What every thread's stock holds now.
    pub fn total(&self) -> u64 {
        self.slots.iter().map(|stock| stock.load(Ordering::Relaxed)).sum()
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
    fn a_thread_takes_from_its_own_stock_and_anyone_can_take_all() {
        let stock = Stock::default();
        assert!(stock.put(5, 8));
        assert!(!stock.put(4, 8), "at most 8 at hand");
        assert!(stock.take(3));
        assert!(!stock.take(3), "2 left here");
        let here = slot();
        let (there, put) = std::thread::scope(|scope| scope.spawn(|| (slot(), stock.put(7, 9))).join().unwrap());
        assert!(put);
        // Threads beyond SLOTS share slots: only another slot keeps its stock apart.
        assert_eq!(stock.take(7), there == here);
        let left = if there == here { 2 } else { 9 };
        assert_eq!((stock.total(), stock.take_all(), stock.total()), (left, left, 0));
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
