//! A counting semaphore whose free permits are kept near the threads that use them.
//!
//! Every step takes a permit of its plugin's gate and one of the instance pool, and gives them
//! back when its instance ends. With one shared counter, each take and each give moves the
//! counter's cache line between the cores. Here a permit given back goes to the giving thread's
//! own cache, and that thread's next take finds it there: its cache line stays in one core.
//!
//! Rules:
//! - permits in use plus permits free (shared or cached) always make the semaphore's size;
//! - a thread caches at most [`CACHED_PER_THREAD`] permits; beyond, they go back to the shared
//!   count;
//! - while any acquirer waits, no permit is cached or taken from a cache: the waiter first
//!   collects every cached permit into the shared count, and every permit given back goes there
//!   too, so waiters are served first come first served, as by tokio's semaphore, and no permit
//!   stays cached while someone waits for it;
//! - an acquire waits only while every permit is in use.

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use tokio::sync::Semaphore;

use crate::per_thread::Stock;

/// Most permits one thread keeps cached.
const CACHED_PER_THREAD: u64 = 16;

/// A counting semaphore with per-thread caches of free permits.
#[derive(Debug)]
pub struct Permits {
    /// The free permits that no thread caches, and the queue of those waiting for one.
    shared: CachePadded<Semaphore>,
    /// How many acquirers are collecting or waiting: read by every take and give, written
    /// only by those who have to wait.
    waiting: CachePadded<AtomicUsize>,
    /// The free permits each thread caches.
    cached: Stock,
}

/// A permit in use; given back when dropped.
#[derive(Debug)]
#[must_use = "the permit is given back when dropped"]
pub struct Permit<'a>(&'a Permits);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// Counts one more in a count of those waiting until dropped, however the wait ends.
pub(super) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    /// Counts one more in `waiting`; returns the guard and how many wait now, this one included.
    pub(super) fn new(waiting: &'a AtomicUsize) -> (Self, usize) {
        let now = waiting.fetch_add(1, Ordering::SeqCst) + 1;
        (Waiting(waiting), now)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Permits {
    /// A semaphore of `size` permits, all free.
    pub fn new(size: usize) -> Self {
        Permits {
            shared: CachePadded::new(Semaphore::new(size)),
            waiting: CachePadded::new(AtomicUsize::new(0)),
            cached: Stock::default(),
        }
    }

    /// A permit if one is free now, wherever it is cached.
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        self.take_cached().or_else(|| self.take_shared()).or_else(|| {
            let _waiting = Waiting::new(&self.waiting).0;
            self.collect_cached();
            self.take_shared()
        })
    }

    /// A permit, waiting in turn while every permit is in use.
    pub async fn acquire(&self) -> Permit<'_> {
        if let Some(permit) = self.take_cached().or_else(|| self.take_shared()) {
            return permit;
        }
        let _waiting = Waiting::new(&self.waiting).0;
        self.collect_cached();
        self.shared.acquire().await.expect("the shared semaphore is never closed").forget();
        Permit(self)
    }

    /// A permit from this thread's cache, unless someone waits.
    fn take_cached(&self) -> Option<Permit<'_>> {
        if self.waiting.load(Ordering::SeqCst) == 0 && self.cached.take(1) { Some(Permit(self)) } else { None }
    }

    fn take_shared(&self) -> Option<Permit<'_>> {
        let permit = self.shared.try_acquire().ok()?;
        permit.forget();
        Some(Permit(self))
    }

    /// Moves every cached permit to the shared count.
    fn collect_cached(&self) {
        self.add_shared(self.cached.take_all());
    }

    fn add_shared(&self, count: u64) {
        if count > 0 {
            self.shared.add_permits(count as usize);
        }
    }

    /// Gives a permit back: to this thread's cache, or to the shared count if the cache is full
    /// or someone waits.
    fn give_back(&self) {
        if !self.cached.put(1, CACHED_PER_THREAD) {
            return self.shared.add_permits(1);
        }
        // A waiter counts itself before it collects the caches, and this give counts the permit
        // before it looks for waiters: either the waiter's collection finds the permit, or this
        // give sees the waiter and moves the cache to the shared count itself.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.add_shared(self.cached.take_here());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::task::Poll;

    use super::*;

    /// The free permits, wherever they are.
    fn free(permits: &Permits) -> usize {
        permits.shared.available_permits() + permits.cached.total() as usize
    }

    #[test]
    fn a_permit_cached_by_one_thread_is_free_for_another() {
        let permits = Permits::new(1);
        std::thread::scope(|scope| scope.spawn(|| drop(permits.try_acquire().unwrap())).join().unwrap());
        assert_eq!(permits.shared.available_permits(), 0, "the other thread cached it");
        let here = permits.try_acquire().expect("collected from the other thread's cache");
        assert!(permits.try_acquire().is_none(), "one permit only");
        drop(here);
        assert_eq!(free(&permits), 1);
    }

    #[tokio::test]
    async fn waiters_get_permits_in_turn_and_one_that_gives_up_takes_none() {
        let permits = Permits::new(1);
        let held = permits.acquire().await;
        let mut first = std::pin::pin!(permits.acquire());
        let mut second = std::pin::pin!(permits.acquire());
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert!(futures::poll!(second.as_mut()).is_pending());
        let mut gives_up = Box::pin(permits.acquire());
        assert!(futures::poll!(gives_up.as_mut()).is_pending());
        drop(gives_up);
        drop(held);
        assert!(futures::poll!(second.as_mut()).is_pending(), "the first in line goes first");
        let Poll::Ready(first) = futures::poll!(first) else { panic!("the permit given back went to the first waiter") };
        drop(first);
        let Poll::Ready(second) = futures::poll!(second) else { panic!("and then to the second") };
        drop(second);
        assert_eq!(permits.waiting.load(Ordering::SeqCst), 0);
        assert_eq!(free(&permits), 1, "no permit lost or made");
    }

    /// Many tasks on several threads take and give permits, some giving up their wait: never
    /// more than the size in use, none lost, none stranded in a cache while others wait.
    #[test]
    fn under_contention_at_most_the_size_are_in_use_and_every_permit_comes_back() {
        let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
        for size in [1, 3, 40] {
            let permits = Arc::new(Permits::new(size));
            let in_use = Arc::new(AtomicUsize::new(0));
            let over = Arc::new(AtomicBool::new(false));
            tokio.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|task| {
                        let (permits, in_use, over) = (Arc::clone(&permits), Arc::clone(&in_use), Arc::clone(&over));
                        tokio::spawn(async move {
                            for round in 0..200 {
                                let acquire = permits.acquire();
                                let permit = if (task + round) % 7 == 0 {
                                    // Gives up a short wait now and then.
                                    match tokio::time::timeout(std::time::Duration::from_micros(50), acquire).await {
                                        Ok(permit) => permit,
                                        Err(_) => continue,
                                    }
                                } else if round % 5 == 0 {
                                    match permits.try_acquire() {
                                        Some(permit) => permit,
                                        None => continue,
                                    }
                                } else {
                                    acquire.await
                                };
                                if in_use.fetch_add(1, Ordering::SeqCst) >= size {
                                    over.store(true, Ordering::SeqCst);
                                }
                                tokio::task::yield_now().await;
                                in_use.fetch_sub(1, Ordering::SeqCst);
                                drop(permit);
                            }
                        })
                    })
                    .collect();
                let all = futures::future::try_join_all(tasks);
                let done = tokio::time::timeout(std::time::Duration::from_secs(60), all).await;
                done.expect("no task waits forever for a permit left in a cache").unwrap();
            });
            assert!(!over.load(Ordering::SeqCst), "more than {size} permits were in use at once");
            assert_eq!(free(&permits), size, "every permit came back");
            assert_eq!(permits.waiting.load(Ordering::SeqCst), 0);
        }
    }
}
