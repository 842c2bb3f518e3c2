//! The PostgreSQL ledger: one database shared by several genpipe processes (replicas), exact
//! however many of them write at once, and across the death of any of them.
//!
//! Client: tokio-postgres, pooled by deadpool-postgres. tokio-postgres pipelines the statements
//! of a connection that are in flight together, which is how a batch costs three round trips
//! whatever its size (see `writer`); sqlx would add a query macro layer and a second runtime
//! abstraction for nothing this backend uses.
//!
//! The tables live in the schema `ledger` of the database `[ledger] url` names, created and
//! migrated at startup (see `schema`). The semantics are the memory ledger's, by the same rules:
//! the operations apply in `book`, the journal's checks are `journal`'s, and [`Ledger::verify`]
//! re-folds the journal with the shared [`Fold`](super::journal::Fold).
//!
//! What makes each operation exact with many processes at once (details in `writer`): every
//! write runs in a batch transaction that locks the holds it names (`SELECT ... FOR NO KEY
//! UPDATE`) before it reads and checks them, and the accounts it changes before it writes them,
//! always in one global order. So:
//! - `grant`: the grants advisory lock (sum of grants under [`MAX_CREDITS`](super::MAX_CREDITS))
//!   and the account's row lock, taken before reading; the primary key of `grants` makes a grant
//!   id count once;
//! - `reserve`: the account's row lock, under which the guarded update of `UPDATE_ACCOUNTS`
//!   writes the reserve only if the account still has the credits the batch found (else the
//!   batch runs again with the account locked before reading); the primary key of `holds` makes
//!   a hold id count once;
//! - `charge`: the hold's row lock (open, not expired, `charged + amount <= amount` checked under
//!   it); the unique index on the journal's (run, op) of charges makes an op id count once;
//! - `settle`, `release`, `recover`: the hold's row lock (still open), then its account's, whose
//!   change (less held, less balance by what is posted) is added to the row as it is then;
//! - the database's CHECK constraints refuse a negative balance, more held than owned, and a
//!   hold charged beyond its amount, whatever the code above does.
//!
//! Replica liveness (see `lease`): each process holds a lease row it renews; its holds record the
//! lease id; [`Ledger::recover`] resolves the open holds whose owner's lease lapsed, and those
//! past their time to live, as the failure policy says, then forgets lapsed leases.

mod book;
mod connect;
mod lease;
mod reads;
mod schema;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::watch;

use self::book::{Op, Outcome};
pub(crate) use self::connect::redact;
use self::lease::Lease;
use self::writer::Writer;
use super::{
    Audit, Balance, Entry, HistoryQuery, Ledger, LedgerError, LedgerTotals, OpenError, Recovery, Settlement, now_ms, reasons,
    ttl_ms,
};
use crate::config::{FailurePolicy, LedgerConfig};

/// How a [`PostgresLedger`] works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The password, when the server asks for one (from the environment, never from a file).
    pub password: Option<String>,
    /// How long the process's lease lives without a renewal; it is renewed every third of it.
    pub lease_ttl: Duration,
    /// Most operations in one transaction: 1 is one transaction per operation (the naive
    /// baseline of the benchmarks).
    pub max_batch: usize,
    /// Batches in flight at once (writer tasks), each on its own connection.
    pub lanes: usize,
    /// Most connections to the server: the lanes', and those of the reads and the lease.
    pub max_connections: usize,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions { password: None, lease_ttl: Duration::from_secs(30), max_batch: 1024, lanes: 1, max_connections: 16 }
    }
}

impl PostgresOptions {
    /// The options `[ledger]` gives: the password from the variable `password_env` names (or
    /// `PGPASSWORD`), and a lease renewed every third of the hold time to live, at most every
    /// 10 s.
    pub fn from_config(config: &LedgerConfig) -> Result<PostgresOptions, String> {
        let password = match &config.password_env {
            Some(name) => Some(std::env::var(name).map_err(|_| {
                format!("[ledger] password_env names the environment variable {name}, which is not set; set it to the password")
            })?),
            None => std::env::var("PGPASSWORD").ok(),
        };
        let renew = lease_renewal(config);
        Ok(PostgresOptions { password, lease_ttl: renew * 3, ..PostgresOptions::default() })
    }
}

/// What the state replicas share besides the ledger (see `state::shared`) needs of it: its
/// database and this process's lease.
#[derive(Clone)]
pub struct Replica {
    /// The ledger's connection pool.
    pub pool: Pool,
    /// How to open a connection of one's own (for LISTEN).
    pub config: tokio_postgres::Config,
    /// This process's lease id.
    pub lease: Arc<str>,
    /// `true` while the lease is held.
    pub held: watch::Receiver<bool>,
}

/// How often a process renews its lease: every third of the hold time to live, at most every
/// 10 s; the lease lives three times that.
pub fn lease_renewal(config: &LedgerConfig) -> Duration {
    (config.hold_ttl() / 3).min(Duration::from_secs(10))
}

/// A [`Ledger`] in a PostgreSQL database, shared by every process that opens it.
pub struct PostgresLedger {
    url: String,
    pool: Pool,
    config: tokio_postgres::Config,
    // Dropped in this order: the writer finishes what is queued, then the lease stops renewing.
    writer: Writer,
    lease: Lease,
}

impl std::fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresLedger").field("url", &self.url).field("lease", self.lease.id()).finish_non_exhaustive()
    }
}

impl PostgresLedger {
    /// Connects to the database at `url` (a `postgres://` URL or `key=value` settings, without a
    /// password), migrates the schema and takes a lease. Refuses a database whose ledger schema
    /// this build cannot write.
    pub async fn open(url: &str, options: PostgresOptions) -> Result<PostgresLedger, OpenError> {
        let shown = redact(url);
        let fail = |problem: String| OpenError { path: shown.clone().into(), problem };
        let config = connect::pg_config(url, options.password.as_deref()).map_err(&fail)?;
        let lanes = options.lanes.max(1);
        let pool = pool_of(config.clone(), options.max_connections.saturating_sub(lanes).max(2)).map_err(&fail)?;
        let writes = pool_of(writer::session(&config), lanes).map_err(&fail)?;
        let mut client = pool.get().await.map_err(|e| {
            fail(format!(
                "cannot be reached ({}); check that PostgreSQL runs there, that the role may log in (and its password, \
                 from PGPASSWORD or [ledger] password_env), and [ledger] url",
                describe_pool(&e)
            ))
        })?;
        schema::migrate(&mut client).await.map_err(&fail)?;
        drop(client);
        let lease = Lease::acquire(&pool, options.lease_ttl).await.map_err(|e| fail(format!("cannot be used: {e}")))?;
        let writer = Writer::start(writes, Arc::clone(lease.id()), lanes, options.max_batch);
        Ok(PostgresLedger { url: shown, pool, config, writer, lease })
    }

    /// Opens the database `[ledger]` names (`kind = "postgres"`).
    pub async fn open_config(config: &LedgerConfig) -> Result<PostgresLedger, OpenError> {
        let url = config.url.as_deref().unwrap_or_default();
        let options = PostgresOptions::from_config(config).map_err(|problem| OpenError { path: redact(url).into(), problem })?;
        PostgresLedger::open(url, options).await
    }

    /// The server's URL, without any password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// This process's lease id: the owner recorded on the holds it reserves.
    pub fn lease_id(&self) -> &str {
        self.lease.id()
    }

    /// Whether this process still holds its lease. Once `false`, it stays `false`: the other
    /// processes may resolve its holds at any time, so it should stop admitting runs (its
    /// [`Ledger::reserve`] already refuses) and be restarted.
    pub fn lease_ok(&self) -> bool {
        self.lease.ok()
    }

    /// A receiver of the lease's state: `true` while held, `false` once lost (wait for the change
    /// with `changed()` or `wait_for(|held| !held)`).
    pub fn lease_watch(&self) -> watch::Receiver<bool> {
        self.lease.watch()
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, LedgerError> {
        self.pool.get().await.map_err(|e| LedgerError::Backend(format!("PostgreSQL: {}", describe_pool(&e))))
    }

    /// Runs `op` through the writer; `pick` takes the outcome of its kind.
    async fn call<T>(&self, op: Op, pick: fn(Outcome) -> Option<T>) -> Result<T, LedgerError> {
        let outcome = self.writer.call(op).await?;
        pick(outcome)
            .ok_or_else(|| LedgerError::Backend(format!("the ledger's writer answered {outcome:?} to another operation")))
    }
}

/// A pool of at most `size` connections made by `config`.
fn pool_of(config: tokio_postgres::Config, size: usize) -> Result<Pool, String> {
    let manager = Manager::from_config(config, tokio_postgres::NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(15)))
        .wait_timeout(Some(Duration::from_secs(30)))
        .build()
        .map_err(|e| format!("cannot be used: {e}"))
}

/// A database error, in words.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    match (error.as_db_error(), std::error::Error::source(error)) {
        (Some(db), _) => db.to_string(),
        (None, Some(source)) => format!("{error}: {source}"),
        (None, None) => error.to_string(),
    }
}

/// Why no connection could be had, in words.
pub(crate) fn describe_pool(error: &deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(e) => describe(e),
        other => other.to_string(),
    }
}

impl From<tokio_postgres::Error> for LedgerError {
    fn from(error: tokio_postgres::Error) -> Self {
        LedgerError::Backend(format!("PostgreSQL: {}", describe(&error)))
    }
}

/// A stored integer as credits: a negative one means the database was tampered with.
fn credits(value: i64) -> Result<u64, LedgerError> {
    u64::try_from(value)
        .map_err(|_| LedgerError::Backend(format!("the database holds a negative amount ({value}): it is damaged")))
}

/// Credits as a stored integer; every amount written was checked to fit.
fn stored(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[async_trait]
impl Ledger for PostgresLedger {
    async fn grant(&self, grant_id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError> {
        let op = Op::Grant { id: grant_id.into(), account: account.into(), amount };
        self.call(op, |o| if let Outcome::Granted(b) = o { Some(b) } else { None }).await
    }

    async fn reserve(&self, hold_id: &str, account: &str, amount: u64, ttl: Duration) -> Result<(), LedgerError> {
        if !self.lease.ok() {
            return Err(LedgerError::Backend(format!(
                "this process lost its ledger lease '{}' (it could not renew it in time), so it reserves nothing more; \
                 restart it",
                self.lease.id()
            )));
        }
        let op = Op::Reserve { hold: hold_id.into(), account: account.into(), amount, ttl_ms: ttl_ms(ttl) };
        self.call(op, |o| (o == Outcome::Reserved).then_some(())).await
    }

    async fn charge(&self, hold_id: &str, op_id: &str, amount: u64, reason: &str) -> Result<u64, LedgerError> {
        let op = Op::Charge { hold: hold_id.into(), op: op_id.into(), amount, reason: reason.into() };
        self.call(op, |o| if let Outcome::Charged(r) = o { Some(r) } else { None }).await
    }

    async fn settle(&self, hold_id: &str) -> Result<Settlement, LedgerError> {
        let op = Op::Close { hold: hold_id.into(), post: true, reason: reasons::SETTLE };
        self.call(op, |o| if let Outcome::Closed(s) = o { Some(s) } else { None }).await
    }

    async fn release(&self, hold_id: &str) -> Result<Settlement, LedgerError> {
        let op = Op::Close { hold: hold_id.into(), post: false, reason: reasons::RELEASE };
        self.call(op, |o| if let Outcome::Closed(s) = o { Some(s) } else { None }).await
    }

    async fn balance(&self, account: &str) -> Result<Balance, LedgerError> {
        reads::balance(&self.client().await?, account).await
    }

    async fn totals(&self) -> Result<LedgerTotals, LedgerError> {
        reads::totals(&self.client().await?).await
    }

    async fn history(&self, account: &str, query: &HistoryQuery) -> Result<Vec<Entry>, LedgerError> {
        reads::history(&self.client().await?, account, query).await
    }

    async fn recover(&self, policy: FailurePolicy) -> Result<Recovery, LedgerError> {
        let holds = reads::abandoned(&self.client().await?, now_ms()).await?;
        let recovery = if holds.is_empty() {
            Recovery::default()
        } else {
            let op = Op::Recover { holds, post: policy == FailurePolicy::PostCharged };
            self.call(op, |o| if let Outcome::Recovered(r) = o { Some(r) } else { None }).await?
        };
        reads::forget_lapsed_leases(&self.client().await?).await?;
        Ok(recovery)
    }

    async fn verify(&self) -> Result<Audit, LedgerError> {
        reads::verify(&mut self.client().await?).await
    }

    fn replica(&self) -> Option<Replica> {
        Some(Replica {
            pool: self.pool.clone(),
            config: self.config.clone(),
            lease: Arc::clone(self.lease.id()),
            held: self.lease.watch(),
        })
    }
}
