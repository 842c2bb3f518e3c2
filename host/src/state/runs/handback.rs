//! Evicted runs go back to the thread that created them to be dropped.
//!
//! A run's memory comes from its creating thread's heap, and its events hold references to that
//! thread's copy of its pipeline's plan ([`crate::per_thread`]). Dropped by whichever thread
//! evicts it, a run would be freed across cores and would write reference counts that the
//! creating core writes at every run. So an eviction is split in two:
//! - the evicting thread does at once all that readers and the memory count see: the run reads
//!   as forgotten, leaves the map, its bytes are released, and its events and outputs are taken
//!   out whole ([`Kept`]);
//! - the run and what it kept then wait in its creator's slot, which that thread empties the
//!   next time it ends a run ([`Handback::collect`]).
//!
//! Bounds: a slot holds at most [`MAX_WAITING`] runs, each of at most [`MAX_WAITING_BYTES`]
//! counted bytes; any other run is dropped by the evicting thread at once, as is a run its own
//! creator evicts. So what waits is at most `SLOTS x MAX_WAITING x MAX_WAITING_BYTES` (16 MiB),
//! and a slot whose threads stopped ending runs keeps at most its own [`MAX_WAITING`].

use std::sync::{Arc, Mutex, PoisonError};

use super::run::{Kept, Run};
use crate::per_thread::{SLOTS, slot};

/// Most runs waiting in one slot.
pub(super) const MAX_WAITING: usize = 64;

/// Most bytes a run that waits may have kept (a run with large outputs is dropped at once).
pub(super) const MAX_WAITING_BYTES: u64 = 16 << 10;

/// An evicted run and what it kept, waiting for its creator.
#[derive(Debug)]
struct Remains {
    _run: Arc<Run>,
    _kept: Kept,
}

/// One slot's waiting runs, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(Mutex<Vec<Remains>>);

/// The runs waiting for their creators, by the creator's slot.
#[derive(Debug, Default)]
pub(super) struct Handback {
    slots: [Slot; SLOTS],
}

impl Handback {
    /// Takes an evicted `run` (forgotten, with the `bytes` it `kept`): the calling thread drops
    /// it at once if it created it or if it is too large to wait, or else leaves it to its
    /// creator.
    pub fn give(&self, run: Arc<Run>, kept: Kept, bytes: u64) {
        let creator = run.creator();
        if creator == slot() || bytes > MAX_WAITING_BYTES {
            return;
        }
        let mut waiting = self.slots[creator].0.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.len() < MAX_WAITING {
            waiting.push(Remains { _run: run, _kept: kept });
        }
        // A full slot: `run` and `kept` are dropped here, once the slot is unlocked.
    }

    /// Drops the runs waiting for the calling thread.
    pub fn collect(&self) {
        let waiting = {
            let mut waiting = self.slots[slot()].0.lock().unwrap_or_else(PoisonError::into_inner);
            if waiting.is_empty() {
                return;
            }
            // The next list comes from this thread's heap too, sized as this one.
            let next = Vec::with_capacity(waiting.len());
            std::mem::replace(&mut *waiting, next)
        };
        drop(waiting);
    }

    /// Drops the runs waiting in every slot (their store is being dropped).
    pub fn clear(&self) {
        for slot in &self.slots {
            std::mem::take(&mut *slot.0.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// Runs waiting in every slot.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.slots.iter().map(|slot| slot.0.lock().unwrap().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Weak;

    use super::super::{RunStatus, RunStore, StepOutput, StepPlan, StepStatus};
    use super::*;

    /// A run made on this thread, ended, whose output has `text_bytes` bytes.
    fn ended_run(store: &RunStore, id: &str, text_bytes: usize) -> Arc<Run> {
        let step = StepPlan { id: "s".into(), plugin: "plugin".into(), digest: "sha256:00".into(), loaded_at_ms: 0 };
        let run = store.create(id.into(), "p".into(), "acme".into(), 1, Arc::new([step]));
        let output = StepOutput::Text { text: "x".repeat(text_bytes), prompt_tokens: 0, completion_tokens: 0 };
        run.step_ended(0, StepStatus::Completed, Some(output), None).unwrap();
        run.finish(RunStatus::Completed, 0, None);
        run
    }

    /// Does `work` on a thread of another slot than the calling thread's.
    fn elsewhere(work: impl FnOnce() + Send) {
        let here = slot();
        let work = Mutex::new(Some(work));
        std::thread::scope(|scope| {
            while work.lock().unwrap().is_some() {
                let thread = scope.spawn(|| {
                    if slot() != here {
                        let work = work.lock().unwrap().take().unwrap();
                        work();
                    }
                });
                thread.join().unwrap();
            }
        });
    }

    /// `run`, no longer held here.
    fn only_weak(run: Arc<Run>) -> Weak<Run> {
        Arc::downgrade(&run)
    }

    /// A run made on the calling thread and ended in `store`, no longer held here.
    fn let_go(store: &RunStore, id: &str, text_bytes: usize) -> Weak<Run> {
        let run = ended_run(store, id, text_bytes);
        store.ended(&run);
        only_weak(run)
    }

    fn alive(runs: &[Weak<Run>]) -> usize {
        runs.iter().filter(|run| run.upgrade().is_some()).count()
    }

    #[test]
    fn a_run_evicted_by_another_thread_is_gone_at_once_and_freed_by_the_thread_that_made_it() {
        let store = RunStore::new(1, u64::MAX);
        let first = let_go(&store, "first", 10);
        let second = ended_run(&store, "second", 10);
        elsewhere(|| store.ended(&second));
        assert!(store.get("first").is_none(), "evicted");
        assert_eq!(store.memory_used(), second.kept_bytes(), "its bytes are released");
        let waiting = first.upgrade().expect("it waits for this thread");
        assert!(waiting.is_forgotten() && waiting.output("s").is_none() && waiting.events_after(0).0.is_empty());
        drop(waiting);
        assert_eq!(store.retention.handback.waiting(), 1);

        // This thread ends a run: it evicts its own `second` at once, and frees `first`.
        let second = only_weak(second);
        store.ended(&ended_run(&store, "third", 10));
        assert_eq!(alive(&[first, second]), 0);
        assert_eq!(store.retention.handback.waiting(), 0);
    }

    #[test]
    fn a_store_dropped_frees_its_kept_and_waiting_runs() {
        let store = RunStore::new(1, u64::MAX);
        let waiting = let_go(&store, "waiting", 10);
        // The other thread's run evicts `waiting`, and is kept.
        let kept = Mutex::new(None);
        elsewhere(|| *kept.lock().unwrap() = Some(let_go(&store, "kept", 10)));
        let kept = kept.into_inner().unwrap().unwrap();
        assert_eq!(store.retention.handback.waiting(), 1);
        assert_eq!(alive(&[waiting.clone(), kept.clone()]), 2);
        drop(store);
        assert_eq!(alive(&[waiting, kept]), 0);
    }

    #[test]
    fn large_runs_and_runs_beyond_a_full_slot_are_dropped_by_the_thread_that_evicts_them() {
        let store = RunStore::new(1, u64::MAX);
        let large = let_go(&store, "large", MAX_WAITING_BYTES as usize);
        let next = ended_run(&store, "next", 0);
        elsewhere(|| store.ended(&next));
        assert_eq!(alive(&[large]), 0, "too large to wait");

        let store = RunStore::new(1, u64::MAX);
        let runs: Vec<Arc<Run>> = (0..MAX_WAITING + 2).map(|i| ended_run(&store, &format!("run-{i}"), 0)).collect();
        let weak: Vec<Weak<Run>> = runs.iter().map(Arc::downgrade).collect();
        // The other thread evicts all of them but the last; the slot takes MAX_WAITING.
        elsewhere(|| runs.iter().for_each(|run| store.ended(run)));
        drop(runs);
        assert_eq!(store.retention.handback.waiting(), MAX_WAITING);
        assert_eq!(alive(&weak), MAX_WAITING + 1, "the waiting runs and the one kept");
    }
}
