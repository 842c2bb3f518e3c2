//! Group commit: one thread owns the write connection and applies every write operation.
//!
//! Callers queue an operation and wait for its answer. An operation is acknowledged only once
//! its transaction is committed *and durable*; if the commit fails, every operation of the
//! batch fails and nothing of it stays.
//!
//! Batches, [`Commit::Grouped`]: the writer runs each operation as it arrives, in the open
//! transaction of the batch it is gathering, and commits the batch
//! - once nothing more is queued, if the syncer thread (see `syncer`) is idle;
//! - when the syncer has answered what it was syncing, if it was busy: this batch's sync could
//!   not begin before, so it keeps gathering what arrives meanwhile. A commit costs about as
//!   much as twenty operations (the pages every batch touches, written to the log), so fewer,
//!   larger batches are much of group commit's gain;
//! - at `max_batch` operations.
//!
//! It then hands the batch to the syncer, or syncs it itself when the syncer is idle and nothing
//! is queued: there is nothing to gather meanwhile, and no thread to wake (which costs about a
//! quarter of a sync here). [`Commit::EachOperation`] is the naive baseline:
//! one transaction per operation, which SQLite syncs in its COMMIT (`synchronous = FULL`),
//! answered by the writer.
//!
//! Once it answered several operations together ([`MANY_CALLERS`]), the writer waits for the
//! next one awake, yielding the processor between looks, for up to [`AWAKE_FOR`]: those callers
//! send their next operations within some tens of microseconds, while waking a sleeping thread
//! when they keep every core busy took about 40 µs here, a tenth of a round at 64 callers (with
//! 2 to 64 callers, 5% to 32% more operations a second). After a batch of one it sleeps at
//! once, leaving the processor to its one caller (waiting awake cost 5% there).
//!
//! An operation checks everything before it writes, so one that is refused wrote nothing. Only
//! a database error in the middle of an operation (a full disk, say) leaves something to undo:
//! then the batch is rolled back and its operations run again with a savepoint around each, so
//! that the failed one changes nothing while the others stand, and the batch commits at once.
//! Savepoints cost a copy of every page an operation touches, which is why the first attempt
//! goes without.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::backend_error;
use super::known::Known;
use super::ops;
use super::prepared::Prepared;
use super::syncer::{Log, Syncer};
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
pub(super) trait Job: Send {
    /// Runs the operation (again, if the batch is retried); whether the database failed in it,
    /// which leaves its writes to undo.
    fn run(&mut self, conn: &Prepared<'_>, known: &mut Known) -> bool;
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
    F: Fn(&Prepared<'_>, &mut Known) -> Result<T, LedgerError> + Send,
{
    fn run(&mut self, conn: &Prepared<'_>, known: &mut Known) -> bool {
        let outcome = (self.operation)(conn, known);
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

/// The operations of one transaction.
pub(super) type Batch = Vec<Box<dyn Job>>;

/// What the writer's queue carries.
pub(super) enum Message {
    /// An operation to run.
    Job(Box<dyn Job>),
    /// The syncer answered what was handed to it.
    Synced,
    /// The ledger is closing: commit what is open, then stop.
    Stop,
}

/// The handle to the writer thread (and its syncer); dropping it lets them finish what is
/// queued and stop.
pub(super) struct Writer {
    queue: mpsc::Sender<Message>,
    /// The writer thread, then the syncer thread, which ends after it.
    threads: Vec<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread that owns `conn`, committing as `commit` says, and calling `upkeep`
    /// between batches (once the batch is answered or handed to the syncer).
    pub(super) fn start(
        conn: Connection,
        commit: Commit,
        upkeep: impl FnMut(&Connection) + Send + 'static,
    ) -> Result<Writer, String> {
        let (queue, messages) = mpsc::channel();
        let mut threads = Vec::new();
        let (max_batch, syncer) = match commit {
            Commit::EachOperation => (1, None),
            Commit::Grouped { max_batch } => {
                conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| format!("setting its sync mode failed: {e}"))?;
                // SQLite names the log after the database's full path, symbolic links resolved.
                let database = conn.path().filter(|p| !p.is_empty()).ok_or("it is not a file")?;
                let (syncer, thread) = Syncer::start(Log::new(format!("{database}-wal").into()), queue.clone());
                threads.push(spawn("ledger-syncer", thread)?);
                (max_batch.max(1), Some(syncer))
            }
        };
        let writer = move || run(&conn, &messages, max_batch, syncer.as_ref(), upkeep);
        threads.insert(0, spawn("ledger-writer", writer)?);
        Ok(Writer { queue, threads })
    }

    /// Runs `operation` in the writer's next transaction and returns its outcome once that
    /// transaction is committed and durable.
    pub(super) async fn call<T, F>(&self, operation: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Fn(&Prepared<'_>, &mut Known) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Call { operation, outcome: None, reply });
        let stopped = || LedgerError::Backend("the ledger's writer thread has stopped".into());
        self.queue.send(Message::Job(job)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Queued behind every operation sent: the writer commits them, then stops, which closes
        // the syncer's queue in turn. Neither panics: every error is an answer.
        let _ = self.queue.send(Message::Stop);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new().name(name.into()).spawn(body).map_err(|e| format!("starting its thread {name} failed: {e}"))
}

fn run(
    conn: &Connection,
    messages: &mpsc::Receiver<Message>,
    max_batch: usize,
    syncer: Option<&Syncer>,
    mut upkeep: impl FnMut(&Connection),
) {
    let prepared = Prepared::new(conn);
    let mut open =
        Open { conn: &prepared, known: Known::default(), jobs: Vec::with_capacity(max_batch), savepoints: false, doomed: None };
    let mut log_file = None;
    let mut stopping = false;
    // A message taken from the queue to see whether anything waits.
    let mut next = None;
    // How many operations the last batch answered or handed over.
    let mut last_batch = 0;
    loop {
        // Gather (see the module's rules for when a batch commits).
        while !stopping && open.jobs.len() < max_batch && !open.must_commit() {
            let waiting = open.jobs.is_empty() || syncer.is_some_and(Syncer::busy);
            let message = match next.take() {
                Some(message) => Some(message),
                None if waiting => receive(messages, open.jobs.is_empty() && last_batch >= MANY_CALLERS),
                None => messages.try_recv().ok(),
            };
            match message {
                Some(Message::Job(job)) => open.add(job, syncer.and_then(|s| s.log.failure())),
                Some(Message::Synced) => {}
                Some(Message::Stop) => stopping = true,
                // Every sender is gone: nothing more can come.
                None if waiting => stopping = true,
                None => break,
            }
        }
        if open.jobs.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        let committed = open.commit();
        let jobs = std::mem::replace(&mut open.jobs, Vec::with_capacity(max_batch));
        last_batch = jobs.len();
        next = messages.try_recv().ok();
        let outcome = match (committed, syncer) {
            (Ok(()), Some(syncer)) if syncer.busy() || next.is_some() => {
                syncer.hand_over(jobs);
                upkeep(conn);
                continue;
            }
            (Ok(()), Some(syncer)) => syncer.log.sync(&mut log_file),
            (outcome, _) => outcome,
        };
        jobs.into_iter().for_each(|job| job.answer(outcome.clone()));
        upkeep(conn);
    }
}

/// After answering at least this many operations at once, the writer waits awake for the next.
const MANY_CALLERS: usize = 2;

/// The longest the writer waits awake.
const AWAKE_FOR: Duration = Duration::from_micros(100);

/// The next message, or `None` once every sender is gone; if `soon`, looked for awake (see the
/// module's rules) before sleeping.
fn receive(messages: &mpsc::Receiver<Message>, soon: bool) -> Option<Message> {
    let awake = Instant::now();
    while soon && awake.elapsed() < AWAKE_FOR {
        match messages.try_recv() {
            Ok(message) => return Some(message),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    messages.recv().ok()
}

/// The batch the writer is gathering: its operations ran, in order, in one open transaction.
struct Open<'p, 'c> {
    conn: &'p Prepared<'c>,
    known: Known,
    jobs: Batch,
    /// The batch was run again with a savepoint around each operation.
    savepoints: bool,
    /// The batch cannot commit: each of its operations fails with this.
    doomed: Option<LedgerError>,
}

impl Open<'_, '_> {
    /// Whether the batch must commit (or fail) before it takes another operation.
    fn must_commit(&self) -> bool {
        self.savepoints || self.doomed.is_some()
    }

    /// Runs `job` in the batch's transaction (beginning it for the first), unless the batch is
    /// doomed or `failure` says every operation fails.
    fn add(&mut self, mut job: Box<dyn Job>, failure: Option<&LedgerError>) {
        if let Some(failure) = failure.filter(|_| self.doomed.is_none()) {
            self.doom(failure.clone());
        }
        if self.doomed.is_none() {
            let ran = self.begin().and_then(|()| run_job(self.conn, &mut self.known, job.as_mut(), false));
            match ran {
                Ok(()) => {}
                Err(Failure::InOperation) => {
                    self.undo();
                    self.jobs.push(job);
                    self.savepoints = true;
                    if let Err(failure) = self.run_again() {
                        self.doom(failure.into());
                    }
                    return;
                }
                Err(Failure::Database(e)) => self.doom(backend_error(e)),
            }
        }
        self.jobs.push(job);
    }

    fn begin(&mut self) -> Result<(), Failure> {
        if !self.conn.is_autocommit() {
            return Ok(());
        }
        statement(self.conn, "BEGIN IMMEDIATE")?;
        // Read under the write lock: no other connection commits until this batch does.
        let data_version = self.conn.get("PRAGMA data_version").and_then(|mut s| s.query_row([], |r| r.get(0)));
        self.known.batch_starts(data_version.map_err(Failure::Database)?);
        Ok(())
    }

    /// Runs every operation of the batch again, each in a savepoint.
    fn run_again(&mut self) -> Result<(), Failure> {
        self.begin()?;
        for job in &mut self.jobs {
            run_job(self.conn, &mut self.known, job.as_mut(), true)?;
        }
        Ok(())
    }

    /// Rolls the batch back, and forgets what its operations told `known`.
    fn undo(&mut self) {
        if !self.conn.is_autocommit() {
            // If even that fails, the connection is unusable and the next BEGIN reports it.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.known.forget();
    }

    fn doom(&mut self, failure: LedgerError) {
        self.undo();
        self.doomed = Some(failure);
    }

    /// Commits the batch, or says why it failed; it is then empty of changes, ready for the next.
    fn commit(&mut self) -> Result<(), LedgerError> {
        self.savepoints = false;
        if let Some(failure) = self.doomed.take() {
            return Err(failure);
        }
        let pending = ops::write_pending(self.conn, &mut self.known).map_err(Failure::Database);
        pending.and_then(|()| statement(self.conn, "COMMIT")).map_err(|failure| {
            self.undo();
            failure.into()
        })
    }
}

enum Failure {
    /// An operation hit a database error without a savepoint to undo it.
    InOperation,
    /// The transaction itself failed.
    Database(rusqlite::Error),
}

impl From<Failure> for LedgerError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Database(e) => backend_error(e),
            Failure::InOperation => LedgerError::Backend("a database error in an operation".into()),
        }
    }
}

fn statement(conn: &Prepared<'_>, sql: &'static str) -> Result<(), Failure> {
    conn.get(sql).and_then(|mut s| s.execute([])).map(drop).map_err(Failure::Database)
}

/// Runs `job`, in a savepoint of its own if asked.
fn run_job(conn: &Prepared<'_>, known: &mut Known, job: &mut dyn Job, savepoint: bool) -> Result<(), Failure> {
    if !savepoint {
        return if job.run(conn, known) { Err(Failure::InOperation) } else { Ok(()) };
    }
    statement(conn, "SAVEPOINT operation")?;
    if job.run(conn, known) {
        statement(conn, "ROLLBACK TO operation")?;
    }
    statement(conn, "RELEASE operation")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_awake_or_asleep_takes_what_is_queued_and_ends_when_every_sender_is_gone() {
        for soon in [true, false] {
            let (queue, messages) = mpsc::channel();
            queue.send(Message::Synced).unwrap();
            queue.send(Message::Stop).unwrap();
            assert!(matches!(receive(&messages, soon), Some(Message::Synced)));
            assert!(matches!(receive(&messages, soon), Some(Message::Stop)));
            drop(queue);
            assert!(receive(&messages, soon).is_none(), "soon: {soon}");
        }
    }
}
