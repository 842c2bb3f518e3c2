//! The SQLite ledger: durable and exact across crashes and restarts.
//!
//! One file (rusqlite's bundled SQLite) in write-ahead-log mode: an operation is acknowledged
//! only once its commit is on disk (fsync'd). Writes go through one writer thread that commits
//! concurrent operations together (group commit, see `writer`), keeping the open holds and
//! balances it wrote in memory (`known`); a syncer thread makes each batch durable while the
//! next one gathers (`syncer`). Reads use another connection, which sees every acknowledged
//! write. The
//! journal's entries are listed by account a chunk at a time (`listing`). Several
//! processes may share the file: each is an owner of the holds it reserves (see `owners`), and
//! [`Ledger::recover`] resolves only the holds of owners that died, and expired ones.

mod known;
mod listing;
mod ops;
mod owners;
mod prepared;
mod schema;
mod syncer;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;

pub use schema::OpenError;
pub use writer::Commit;

use self::owners::Owner;
use self::writer::Writer;
use super::{
    Audit, Balance, Entry, HistoryQuery, Ledger, LedgerError, LedgerTotals, Recovery, Settlement, now_ms, reasons, ttl_ms,
};
use crate::config::FailurePolicy;

/// How a [`SqliteLedger`] works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SqliteOptions {
    /// How it commits: group commit by default.
    pub commit: Commit,
}

/// A [`Ledger`] in a SQLite file.
pub struct SqliteLedger {
    path: PathBuf,
    // Dropped in this order: the writer finishes what is queued, then the owner lock goes.
    writer: Writer,
    reader: Arc<Mutex<Connection>>,
    owner: Owner,
    owners_dir: PathBuf,
}

impl std::fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLedger").field("path", &self.path).field("owner", self.owner.id()).finish_non_exhaustive()
    }
}

impl SqliteLedger {
    /// Opens the ledger in the file at `path`, creating it (and its folder) if needed, and
    /// migrating its schema. Refuses a file that is not a genpipe ledger this build can write.
    pub async fn open(path: impl Into<PathBuf>, options: SqliteOptions) -> Result<SqliteLedger, OpenError> {
        let path = path.into();
        let failed = {
            let path = path.clone();
            move |e: tokio::task::JoinError| OpenError { path, problem: format!("could not be opened: {e}") }
        };
        tokio::task::spawn_blocking(move || SqliteLedger::open_blocking(path, options)).await.map_err(failed)?
    }

    fn open_blocking(path: PathBuf, options: SqliteOptions) -> Result<SqliteLedger, OpenError> {
        let writer_conn = schema::open_writer(&path)?;
        let reader = schema::open_reader(&path)?;
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push("-owners");
        let owners_dir = path.with_file_name(name);
        let owner = Owner::register(&owners_dir).map_err(|e| OpenError {
            path: path.clone(),
            problem: format!(
                "cannot be used: the folder of its owner locks '{}' cannot be written ({e}); check its permissions",
                owners_dir.display()
            ),
        })?;
        let unreadable = |e: rusqlite::Error| OpenError { path: path.clone(), problem: schema::describe(&e) };
        let mut listing = listing::Listing::new(&writer_conn).map_err(unreadable)?;
        let writer = Writer::start(writer_conn, options.commit, move |conn| listing.after_commit(conn))
            .map_err(|problem| OpenError { path: path.clone(), problem: format!("cannot be used: {problem}") })?;
        Ok(SqliteLedger { path, writer, reader: Arc::new(Mutex::new(reader)), owner, owners_dir })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `read` on the reader connection, off the async threads.
    async fn read<T, F>(&self, read: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || read(&reader.lock().unwrap_or_else(PoisonError::into_inner)))
            .await
            .map_err(|e| LedgerError::Backend(format!("the ledger's reader failed: {e}")))?
    }

    /// Runs `read` in one read transaction: it sees a single committed state.
    async fn read_snapshot<T, F>(&self, read: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        // The transaction ends (rolls back: it wrote nothing) when dropped.
        self.read(|conn| {
            let snapshot = conn.unchecked_transaction()?;
            read(&snapshot)
        })
        .await
    }
}

/// A database error as a ledger error.
fn backend_error(error: rusqlite::Error) -> LedgerError {
    LedgerError::Backend(format!("SQLite: {error}"))
}

impl From<rusqlite::Error> for LedgerError {
    fn from(error: rusqlite::Error) -> Self {
        backend_error(error)
    }
}

#[async_trait]
impl Ledger for SqliteLedger {
    async fn grant(&self, grant_id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError> {
        let (grant_id, account) = (grant_id.to_string(), account.to_string());
        self.writer.call(move |conn, known| ops::grant(conn, known, now_ms(), &grant_id, &account, amount)).await
    }

    async fn reserve(&self, hold_id: &str, account: &str, amount: u64, ttl: Duration) -> Result<(), LedgerError> {
        let (hold_id, account, owner) = (hold_id.to_string(), account.to_string(), Arc::clone(self.owner.id()));
        let ttl = ttl_ms(ttl);
        self.writer.call(move |conn, known| ops::reserve(conn, known, now_ms(), &owner, (&hold_id, &account), amount, ttl)).await
    }

    async fn charge(&self, hold_id: &str, op_id: &str, amount: u64, reason: &str) -> Result<u64, LedgerError> {
        let (hold_id, op_id, reason) = (hold_id.to_string(), op_id.to_string(), reason.to_string());
        self.writer.call(move |conn, known| ops::charge(conn, known, now_ms(), (&hold_id, &op_id), amount, &reason)).await
    }

    async fn settle(&self, hold_id: &str) -> Result<Settlement, LedgerError> {
        let hold_id = hold_id.to_string();
        self.writer.call(move |conn, known| ops::close(conn, known, now_ms(), &hold_id, true, reasons::SETTLE)).await
    }

    async fn release(&self, hold_id: &str) -> Result<Settlement, LedgerError> {
        let hold_id = hold_id.to_string();
        self.writer.call(move |conn, known| ops::close(conn, known, now_ms(), &hold_id, false, reasons::RELEASE)).await
    }

    async fn balance(&self, account: &str) -> Result<Balance, LedgerError> {
        let account = account.to_string();
        self.read(move |conn| ops::balance(conn, &account)).await
    }

    async fn totals(&self) -> Result<LedgerTotals, LedgerError> {
        self.read_snapshot(ops::totals).await
    }

    async fn history(&self, account: &str, query: &HistoryQuery) -> Result<Vec<Entry>, LedgerError> {
        let (account, query) = (account.to_string(), query.clone());
        self.read_snapshot(move |conn| listing::history(conn, &account, &query)).await
    }

    async fn recover(&self, policy: FailurePolicy) -> Result<Recovery, LedgerError> {
        let owners = self.read(ops::open_hold_owners).await?;
        let (dir, me) = (self.owners_dir.clone(), Arc::clone(self.owner.id()));
        let dead = tokio::task::spawn_blocking(move || {
            owners::dead(&dir, &me, &owners)
                .map_err(|e| LedgerError::Backend(format!("reading the owner locks in '{}': {e}", dir.display())))
        })
        .await
        .map_err(|e| LedgerError::Backend(format!("reading the owner locks failed: {e}")))??;
        let ids: Vec<String> = dead.iter().map(|owner| owner.id.clone()).collect();
        let recovery = self.writer.call(move |conn, known| ops::recover(conn, known, now_ms(), &ids, policy)).await?;
        // Their holds are resolved for good: forget the dead owners.
        tokio::task::spawn_blocking(move || dead.into_iter().for_each(owners::Dead::remove))
            .await
            .map_err(|e| LedgerError::Backend(format!("removing the owner locks failed: {e}")))?;
        Ok(recovery)
    }

    async fn verify(&self) -> Result<Audit, LedgerError> {
        self.read_snapshot(ops::verify).await
    }
}
