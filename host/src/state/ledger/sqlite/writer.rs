//! Group commit: one thread owns the write connection and applies every write operation.
//!
//! Callers queue an operation and wait for its answer. The thread takes whatever is queued (up
//! to `max_batch` operations) and runs it in one transaction, then commits, with one fsync for
//! the whole batch, and only then answers: an operation is acknowledged once its transaction
//! committed, and if the commit fails, every operation of the batch fails and nothing of it
//! stays. While a batch commits, the next one queues up, so the busier the ledger, the more
//! operations share an fsync.
//!
//! An operation checks everything before it writes, so one that is refused wrote nothing. Only
//! a database error in the middle of an operation (a full disk, say) leaves something to undo:
//! then the batch is rolled back and run again with a savepoint around each operation, so that
//! the failed one changes nothing while the others stand. Savepoints cost a copy of every page
//! an operation touches, which is why the first attempt goes without.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::backend_error;
use crate::state::ledger::LedgerError;

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

/// The handle to the writer thread; dropping it lets the thread finish what is queued and stop.
pub(super) struct Writer {
    queue: Option<mpsc::Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread that owns `conn`; it commits up to `max_batch` operations at once.
    pub(super) fn start(conn: Connection, max_batch: usize) -> std::io::Result<Writer> {
        let (queue, jobs) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("genpipe-ledger-writer".into())
            .spawn(move || run(&conn, &jobs, max_batch.max(1)))?;
        Ok(Writer { queue: Some(queue), thread: Some(thread) })
    }

    /// Runs `operation` in the writer's next transaction and returns its outcome once that
    /// transaction committed.
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
        if let Some(thread) = self.thread.take() {
            // The thread ends once the queue is empty; it does not panic (every error is an answer).
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, jobs: &mpsc::Receiver<Box<dyn Job>>, max_batch: usize) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    while let Ok(first) = jobs.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let committed = commit(conn, &mut batch);
        for job in batch.drain(..) {
            job.answer(committed.clone());
        }
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
