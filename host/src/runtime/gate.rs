//! A plugin's admission gate: at most `max_concurrency` of its instances alive at once.
//!
//! - A step enters at once while fewer than `max_concurrency` are inside.
//! - Otherwise it waits in the queue, first come first served, while fewer than `max_queued`
//!   steps wait; beyond that it is refused at once, with [`StepFailure::AtCapacity`].
//! - A waiting step that gives up (its run is cancelled) leaves the queue; a step inside leaves
//!   when its permit is dropped.

use std::sync::atomic::AtomicUsize;

use super::failure::StepFailure;
use super::permits::{Permit, Permits, Waiting};

/// The gate of one plugin.
#[derive(Debug)]
pub struct Gate {
    inside: Permits,
    waiting: AtomicUsize,
    max_concurrency: u32,
    max_queued: u32,
}

impl Gate {
    /// A gate for `max_concurrency` steps inside and `max_queued` waiting.
    pub fn new(max_concurrency: u32, max_queued: u32) -> Gate {
        Gate { inside: Permits::new(max_concurrency as usize), waiting: AtomicUsize::new(0), max_concurrency, max_queued }
    }

    /// Enters the gate, waiting in the queue if it is full; `plugin` names it in a refusal.
    pub async fn enter(&self, plugin: &str) -> Result<Permit<'_>, StepFailure> {
        if let Some(permit) = self.inside.try_acquire() {
            return Ok(permit);
        }
        let (_waiting, queued) = Waiting::new(&self.waiting);
        if queued > self.max_queued as usize {
            return Err(StepFailure::AtCapacity(format!(
                "plugin '{plugin}' is running its max_concurrency of {} instances and {} more steps are \
                 already waiting (max_queued); retry later, or raise max_concurrency or max_queued",
                self.max_concurrency, self.max_queued
            )));
        }
        Ok(self.inside.acquire().await)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[tokio::test]
    async fn beyond_the_queue_steps_are_refused_and_waiting_ones_get_in_in_turn() {
        let gate = Gate::new(1, 1);
        let first = gate.enter("p").await.unwrap();
        let second = gate.enter("p");
        let mut second = std::pin::pin!(second);
        assert!(futures::poll!(second.as_mut()).is_pending(), "the second waits in the queue");
        let refused = gate.enter("p").await.unwrap_err();
        assert!(refused.to_string().contains("plugin 'p' is running its max_concurrency of 1"), "{refused}");
        drop(first);
        let second = second.await.unwrap();
        drop(second);
        assert_eq!(gate.waiting.load(Ordering::Acquire), 0);
        // A waiter that gives up leaves the queue.
        let inside = gate.enter("p").await.unwrap();
        drop(tokio::time::timeout(std::time::Duration::from_millis(1), gate.enter("p")).await);
        assert_eq!(gate.waiting.load(Ordering::Acquire), 0);
        drop(inside);
    }
}
