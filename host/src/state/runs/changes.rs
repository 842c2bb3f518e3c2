//! Which runs changed since their follower last looked: what a mirror of the store reads.
//!
//! A run marks itself at every change (an event, a charge); a follower takes the marked ids and
//! copies those runs' new state. Marks of one run between two takes collapse into one, so the
//! feed holds at most one id per run, and the follower copies each run's latest state.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

/// The ids of the runs changed since the last [`ChangeFeed::take`].
#[derive(Debug, Default)]
pub struct ChangeFeed {
    changed: Mutex<HashSet<String>>,
    wake: Notify,
}

impl ChangeFeed {
    /// Marks run `id` changed.
    pub fn mark(&self, id: &str) {
        let mut changed = self.changed.lock().unwrap_or_else(PoisonError::into_inner);
        if !changed.contains(id) {
            changed.insert(id.to_string());
            self.wake.notify_one();
        }
    }

    /// Takes the marked ids, waiting for one if there are none.
    pub async fn take(&self) -> Vec<String> {
        loop {
            let ids: Vec<String> = self.changed.lock().unwrap_or_else(PoisonError::into_inner).drain().collect();
            if !ids.is_empty() {
                return ids;
            }
            self.wake.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn marks_collapse_per_run_and_a_take_waits_for_one() {
        let feed = std::sync::Arc::new(ChangeFeed::default());
        feed.mark("a");
        feed.mark("b");
        feed.mark("a");
        let mut ids = feed.take().await;
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        let waiting = tokio::spawn({
            let feed = std::sync::Arc::clone(&feed);
            async move { feed.take().await }
        });
        feed.mark("c");
        assert_eq!(waiting.await.unwrap(), ["c"]);
    }
}
