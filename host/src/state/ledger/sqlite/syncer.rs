//! Durability of group commit: the syncer thread makes committed batches durable and answers
//! their operations.
//!
//! The writer commits without waiting for the disk (`synchronous = NORMAL`). A committed batch
//! is then either synced by the writer itself (nothing else to do, nothing being synced) or
//! handed to the syncer thread, which syncs the write-ahead log (`fdatasync`) once for every
//! batch handed over since its last sync, answers their operations, and tells the writer, which
//! holds its next batch open until then (see `writer`). Every answer follows a sync that began
//! after its commit. The log only grows by whole transactions, so a crash keeps a prefix of the
//! commits: every acknowledged one, and perhaps some committed after it that nobody was told
//! about. A failed sync fails the batches waiting on it and every later operation: the disk's
//! state is then unknown, and a restart recovers.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};

use super::writer::{Batch, Message};
use crate::state::ledger::LedgerError;

/// The write-ahead log, which the writer and the syncer thread sync.
pub(super) struct Log {
    path: PathBuf,
    /// Set once a sync failed: from then on every operation fails with it.
    failed: OnceLock<LedgerError>,
}

impl Log {
    pub(super) fn new(path: PathBuf) -> Log {
        Log { path, failed: OnceLock::new() }
    }

    /// Why every operation fails, once a sync failed.
    pub(super) fn failure(&self) -> Option<&LedgerError> {
        self.failed.get()
    }

    /// Makes every commit so far durable; `file` is the caller's own handle to the log.
    pub(super) fn sync(&self, file: &mut Option<File>) -> Result<(), LedgerError> {
        if let Some(failure) = self.failed.get() {
            return Err(failure.clone());
        }
        let synced = match file {
            Some(file) => file.sync_data(),
            // Opened at the first sync: by then a commit has created it.
            None => File::open(&self.path).and_then(|opened| file.insert(opened).sync_data()),
        };
        synced.map_err(|e| {
            let failure = LedgerError::Backend(format!(
                "making the write-ahead log '{}' durable failed ({e}): the operations since the last sync may or may not \
                 be on disk. Restart genpipe (recovery resolves open holds) and retry them with the same ids",
                self.path.display()
            ));
            self.failed.get_or_init(|| failure).clone()
        })
    }
}

/// The writer's side of the syncer thread.
pub(super) struct Syncer {
    pub(super) log: Arc<Log>,
    committed: mpsc::Sender<Batch>,
    /// Batches handed to the syncer thread and not answered yet.
    in_flight: Arc<AtomicUsize>,
}

impl Syncer {
    /// Starts the syncer thread for `log`; it tells the writer through `writer` each time it
    /// has answered what was handed to it, and ends once the [`Syncer`] is dropped.
    pub(super) fn start(log: Log, writer: mpsc::Sender<Message>) -> (Syncer, impl FnOnce() + Send + use<>) {
        let (log, in_flight) = (Arc::new(log), Arc::new(AtomicUsize::new(0)));
        let (committed, batches) = mpsc::channel();
        let thread = {
            let (log, in_flight) = (Arc::clone(&log), Arc::clone(&in_flight));
            move || run(&log, &batches, &in_flight, &writer)
        };
        (Syncer { log, committed, in_flight }, thread)
    }

    /// Whether the thread is syncing (or about to sync) batches handed to it.
    pub(super) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Hands a committed batch over, to be synced and answered.
    pub(super) fn hand_over(&self, batch: Batch) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        // If the thread is gone (it never stops first), the jobs are dropped, which tells their
        // callers the writer stopped.
        drop(self.committed.send(batch));
    }
}

/// The syncer thread: syncs the log once for all the batches handed over since its last sync,
/// answers their operations, then tells the writer.
fn run(log: &Log, batches: &mpsc::Receiver<Batch>, in_flight: &AtomicUsize, writer: &mpsc::Sender<Message>) {
    let mut file = None;
    while let Ok(first) = batches.recv() {
        let mut committed = vec![first];
        committed.extend(batches.try_iter());
        let synced = log.sync(&mut file);
        let handed = committed.len();
        committed.into_iter().flatten().for_each(|job| job.answer(synced.clone()));
        in_flight.fetch_sub(handed, Ordering::AcqRel);
        // The writer may have stopped already.
        let _ = writer.send(Message::Synced);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_sync_fails_every_later_operation_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::new(dir.path().join("gone.db-wal"));
        let mut file = None;
        let Err(LedgerError::Backend(first)) = log.sync(&mut file) else { panic!("syncing a missing log must fail") };
        assert!(first.contains("gone.db-wal") && first.contains("durable failed"), "{first}");
        assert!(first.contains("Restart genpipe") && first.contains("same ids"), "{first}");
        // The disk's state is unknown from then on, even once the file is there.
        std::fs::write(&log.path, b"").unwrap();
        assert_eq!(log.sync(&mut file), Err(LedgerError::Backend(first.clone())));
        assert_eq!(log.failure(), Some(&LedgerError::Backend(first)));
        let healthy = Log::new(log.path.clone());
        assert_eq!(healthy.sync(&mut None), Ok(()));
    }
}
