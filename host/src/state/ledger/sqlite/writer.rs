//! Group commit: one thread owns the write connection and applies every write operation.
//!
//! Callers queue an operation and wait for its answer. The writer thread takes whatever is
//! queued (up to `max_batch` operations) and runs it in one transaction, then commits. An
//! operation is acknowledged only once its transaction is committed *and durable*; if the commit
//! fails, every operation of the batch fails and nothing of it stays.
//!
//! Durability, [`Commit::Grouped`]: the writer commits without waiting for the disk
//! (`synchronous = NORMAL`), then syncs the write-ahead log itself (`fdatasync`) before it
//! answers. When operations are already queued behind the batch, or the syncer thread is still
//! syncing earlier batches, it hands the batch to that thread instead (which syncs once for every
//! batch handed over since its last sync, then answers) and goes on at once, so the disk's
//! latency and the CPU the sync costs overlap with the next batch's SQL. Either way an answer follows a sync that began after
//! its commit. The log only grows by whole transactions, so a crash keeps a prefix of the
//! commits: every acknowledged one, and perhaps some committed after it that nobody was told
//! about. A failed sync fails the batches waiting on it and every later
//! operation (the disk's state is then unknown; a restart recovers). [`Commit::EachOperation`]
//! is the naive baseline: one transaction per operation, which SQLite syncs in its COMMIT
//! (`synchronous = FULL`), answered by the writer.
//!
//! An operation checks everything before it writes, so one that is refused wrote nothing. Only
//! a database error in the middle of an operation (a full disk, say) leaves something to undo:
//! then the batch is rolled back and run again with a savepoint around each operation, so that
//! the failed one changes nothing while the others stand. Savepoints cost a copy of every page
//! an operation touches, which is why the first attempt goes without.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::backend_error;
use crate::state::ledger::LedgerError;

/// How the ledger commits its writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Group commit (the default): up to `max_batch` operations per transaction, synced by a
    /// thread of their own while the next batch runs.
    Grouped {
        /// Most operations in one transaction.
        max_batch: usize,
    },
    /// One transaction, and one fsync in SQLite's COMMIT, per operation: the naive baseline of
    /// the benchmarks.
    EachOperation,
}

impl Default for Commit {
    fn default() -> Self {
        Commit::Grouped { max_batch: 1024 }
    }
}

/// One queued operation.
trait Job: Send {
    /// Runs the operation (again, if the batch is retried); whether the database failed in it,
    /// which leaves its writes to undo.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the batch's fate is known.
    fn answer(self: Box<Self>, committed: Result<(), LedgerError>);
}

struct Call<T, F> {
    operation: F,
    outcome: Option<Result<T, LedgerError>>,
    reply: oneshot::Sender<Result<T, LedgerError>>,
}

impl<T, F> Job for Call<T, F>
where
    T: Send,
    F: Fn(&Connection) -> Result<T, LedgerError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let outcome = (self.operation)(conn);
        let failed = matches!(outcome, Err(LedgerError::Backend(_)));
        self.outcome = Some(outcome);
        failed
    }

    fn answer(self: Box<Self>, committed: Result<(), LedgerError>) {
        let answer = match (committed, self.outcome) {
            (Ok(()), Some(outcome)) => outcome,
            (Ok(()), None) => Err(LedgerError::Backend("the operation was never run".into())),
            (Err(e), _) => Err(e),
        };
        // The caller may have stopped waiting; the operation stands all the same.
        let _ = self.reply.send(answer);
    }
}

type Batch = Vec<Box<dyn Job>>;

/// The write-ahead log, which the writer and the syncer thread sync.
struct Log {
    path: PathBuf,
    /// Set once a sync failed: from then on every operation fails with it.
    failed: OnceLock<LedgerError>,
}

impl Log {
    /// Makes every commit so far durable; `file` is the caller's own handle to the log.
    fn sync(&self, file: &mut Option<File>) -> Result<(), LedgerError> {
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

/// The writer's side of durability: the log and the syncer thread's queue.
struct Syncer {
    log: Arc<Log>,
    committed: mpsc::Sender<Batch>,
    /// Batches handed to the syncer thread and not answered yet.
    in_flight: Arc<AtomicUsize>,
}

/// The handle to the writer thread (and its syncer); dropping it lets them finish what is
/// queued and stop.
pub(super) struct Writer {
    queue: Option<mpsc::Sender<Box<dyn Job>>>,
    /// The writer thread, then the syncer thread.
    threads: Vec<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread that owns `conn`, committing as `commit` says.
    pub(super) fn start(conn: Connection, commit: Commit) -> Result<Writer, String> {
        let (queue, jobs) = mpsc::channel();
        let mut threads = Vec::new();
        let (max_batch, syncer) = match commit {
            Commit::EachOperation => (1, None),
            Commit::Grouped { max_batch } => {
                conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| format!("setting its sync mode failed: {e}"))?;
                // SQLite names the log after the database's full path, symbolic links resolved.
                let database = conn.path().filter(|p| !p.is_empty()).ok_or("it is not a file")?;
                let log = Arc::new(Log { path: PathBuf::from(format!("{database}-wal")), failed: OnceLock::new() });
                let (committed, batches) = mpsc::channel();
                let in_flight = Arc::new(AtomicUsize::new(0));
                let sync = {
                    let (log, in_flight) = (Arc::clone(&log), Arc::clone(&in_flight));
                    move || sync(&log, &batches, &in_flight)
                };
                threads.push(spawn("genpipe-ledger-sync", sync)?);
                (max_batch.max(1), Some(Syncer { log, committed, in_flight }))
            }
        };
        threads.insert(0, spawn("genpipe-ledger-writer", move || run(&conn, &jobs, max_batch, syncer.as_ref()))?);
        Ok(Writer { queue: Some(queue), threads })
    }

    /// Runs `operation` in the writer's next transaction and returns its outcome once that
    /// transaction is committed and durable.
    pub(super) async fn call<T, F>(&self, operation: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Call { operation, outcome: None, reply });
        let stopped = || LedgerError::Backend("the ledger's writer thread has stopped".into());
        self.queue.as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        // The writer ends once its queue is empty, which closes the syncer's queue in turn.
        // Neither panics: every error is an answer.
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new().name(name.into()).spawn(body).map_err(|e| format!("starting its thread {name} failed: {e}"))
}

fn run(conn: &Connection, jobs: &mpsc::Receiver<Box<dyn Job>>, max_batch: usize, syncer: Option<&Syncer>) {
    let mut batch: Batch = Vec::with_capacity(max_batch);
    // The first operation of the next batch, when one was queued as a batch committed.
    let mut next = None;
    let mut log_file = None;
    while let Some(first) = next.take().or_else(|| jobs.recv().ok()) {
        batch.push(first);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let committed = match syncer.and_then(|s| s.log.failed.get()) {
            Some(failure) => Err(failure.clone()),
            None => commit(conn, &mut batch),
        };
        let outcome = match (committed, syncer) {
            (Ok(()), Some(syncer)) => {
                next = jobs.try_recv().ok();
                if next.is_some() || syncer.in_flight.load(Ordering::Acquire) > 0 {
                    syncer.in_flight.fetch_add(1, Ordering::AcqRel);
                    // If the syncer is gone (it never stops first), the jobs are dropped, which
                    // tells their callers the writer stopped.
                    drop(syncer.committed.send(std::mem::take(&mut batch)));
                    continue;
                }
                syncer.log.sync(&mut log_file)
            }
            (outcome, _) => outcome,
        };
        batch.drain(..).for_each(|job| job.answer(outcome.clone()));
    }
}

/// The syncer thread: syncs the log once for all the batches handed over since its last sync,
/// then answers their operations.
fn sync(log: &Log, batches: &mpsc::Receiver<Batch>, in_flight: &AtomicUsize) {
    let mut file = None;
    while let Ok(first) = batches.recv() {
        let mut committed = vec![first];
        committed.extend(batches.try_iter());
        let synced = log.sync(&mut file);
        let handed = committed.len();
        committed.into_iter().flatten().for_each(|job| job.answer(synced.clone()));
        in_flight.fetch_sub(handed, Ordering::AcqRel);
    }
}

/// Runs `batch` in one transaction and commits it.
fn commit(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), LedgerError> {
    let mut attempt = |savepoints| {
        run_batch(conn, batch, savepoints).inspect_err(|_| {
            if !conn.is_autocommit() {
                // Undo what the batch did; if even that fails, the connection is unusable and
                // the next batch's BEGIN reports it.
                let _ = conn.execute_batch("ROLLBACK");
            }
        })
    };
    match attempt(false) {
        Err(Failure::InOperation) => attempt(true),
        other => other,
    }
    .map_err(|failure| match failure {
        Failure::Database(e) => backend_error(e),
        Failure::InOperation => LedgerError::Backend("a database error in an operation".into()),
    })
}

enum Failure {
    /// An operation hit a database error without a savepoint to undo it.
    InOperation,
    /// The transaction itself failed.
    Database(rusqlite::Error),
}

fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>], savepoints: bool) -> Result<(), Failure> {
    let statement = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([])).map(drop).map_err(Failure::Database);
    statement("BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        if !savepoints {
            if job.run(conn) {
                return Err(Failure::InOperation);
            }
            continue;
        }
        statement("SAVEPOINT operation")?;
        if job.run(conn) {
            statement("ROLLBACK TO operation")?;
        }
        statement("RELEASE operation")?;
    }
    statement("COMMIT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_sync_fails_every_later_operation_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log { path: dir.path().join("gone.db-wal"), failed: OnceLock::new() };
        let mut file = None;
        let Err(LedgerError::Backend(first)) = log.sync(&mut file) else { panic!("syncing a missing log must fail") };
        assert!(first.contains("gone.db-wal") && first.contains("durable failed"), "{first}");
        assert!(first.contains("Restart genpipe") && first.contains("same ids"), "{first}");
        // The disk's state is unknown from then on, even once the file is there.
        std::fs::write(&log.path, b"").unwrap();
        assert_eq!(log.sync(&mut file), Err(LedgerError::Backend(first)));
        let healthy = Log { path: log.path.clone(), failed: OnceLock::new() };
        assert_eq!(healthy.sync(&mut None), Ok(()));
    }
}
