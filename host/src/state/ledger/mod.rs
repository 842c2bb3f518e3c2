//! Credits: accounts with a balance and holds, behind the [`Ledger`] trait, and the append-only
//! journal that records every change.
//!
//! A run reserves a hold for the most it may cost, steps charge against the hold, and the run
//! settles it (posting what was charged, releasing the rest) or releases it (posting nothing).
//! Every operation carries an id; repeating it with the same arguments returns the first outcome
//! and changes nothing, repeating it with other arguments is [`LedgerError::Conflict`]. An
//! operation that fails changes nothing.
//!
//! Amounts are integers. `balance` counts credits not yet posted, `held` the part of it that open
//! holds reserve, so `balance - held` is what a new hold may take. Conservation: the sum of
//! balances plus the sum of posted charges equals the sum of grants, at every instant.
//!
//! Every change is an [`Entry`] of the journal, and balances and holds are its fold:
//! [`Ledger::verify`] re-folds it and checks every invariant. A hold has a time to live: once it
//! has expired it takes no more charges, and [`Ledger::recover`] (at startup and periodically)
//! resolves it, as it resolves the holds of a process that died. Backends: [`MemoryLedger`]
//! (tests, benchmarks), [`SqliteLedger`] (durable, the default) and [`PostgresLedger`] (shared by
//! several replicas); [`open`] picks one from the `[ledger]` configuration.

mod journal;
mod memory;
mod postgres;
mod sqlite;

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

pub use journal::{Audit, Entry, EntryKind, HistoryQuery, charge_id};
pub use memory::MemoryLedger;
pub use postgres::{PostgresLedger, PostgresOptions, Replica, lease_renewal as postgres_lease_renewal};
pub(crate) use postgres::{describe as describe_postgres, describe_pool as describe_postgres_pool};
pub use sqlite::{Commit, OpenError, SqliteLedger, SqliteOptions};

use crate::config::{FailurePolicy, LedgerConfig, LedgerKind};

/// The most credits the ledger holds: the sum of all grants stays at or under it (SQLite
/// integers are signed 64-bit).
pub const MAX_CREDITS: u64 = i64::MAX as u64;

/// An account's credits as a reader sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Balance {
    /// Credits the account has (nothing posted against them yet).
    pub balance: u64,
    /// The part of `balance` reserved by open holds.
    pub held: u64,
}

impl Balance {
    /// What a new hold may still reserve.
    pub fn available(&self) -> u64 {
        self.balance - self.held
    }
}

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Settlement {
    /// Credits posted (taken from the balance for good).
    pub posted: u64,
    /// Credits returned to the available balance.
    pub released: u64,
}

/// Sums over the whole ledger, for audits and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerTotals {
    /// Sum of every grant.
    pub granted: u64,
    /// Sum of every account's balance.
    pub balances: u64,
    /// Sum of every account's held credits.
    pub held: u64,
    /// Sum of every posted charge.
    pub posted: u64,
    /// Holds still open.
    pub open_holds: u64,
    /// Holds settled.
    pub settled_holds: u64,
    /// Holds released.
    pub released_holds: u64,
}

/// What one [`Ledger::recover`] pass resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Holds resolved (their process died, or they expired).
    pub holds: u64,
    /// Credits they posted (what was charged, under [`FailurePolicy::PostCharged`]).
    pub posted: u64,
    /// Credits they released.
    pub released: u64,
}

/// Why a ledger operation was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// No such account.
    #[error("no account '{0}'")]
    UnknownAccount(String),
    /// No such hold.
    #[error("no hold '{0}'")]
    UnknownHold(String),
    /// The account cannot cover the hold.
    #[error("not enough credits: {needed} needed, {available} available")]
    Insufficient {
        /// Credits asked for.
        needed: u64,
        /// Credits the account could reserve.
        available: u64,
    },
    /// The charge would exceed what remains of the hold.
    #[error("the charge of {amount} exceeds the {remaining} credits left in the hold")]
    ExceedsHold {
        /// Credits asked for.
        amount: u64,
        /// Credits left in the hold.
        remaining: u64,
    },
    /// The hold was already settled or released.
    #[error("hold '{0}' is closed")]
    HoldClosed(String),
    /// The hold outlived its time to live: it takes no more charges, and recovery resolves it.
    #[error("hold '{0}' has expired; raise [ledger] hold_ttl_secs if runs take longer")]
    HoldExpired(String),
    /// The id was used before with other arguments.
    #[error("id '{0}' was already used with different arguments")]
    Conflict(String),
    /// An amount of zero, or a grant that would take the ledger's total past [`MAX_CREDITS`].
    #[error("invalid amount {0}")]
    InvalidAmount(u64),
    /// The backend failed (I/O, database). Nothing changed.
    #[error("ledger backend failed: {0}")]
    Backend(String),
}

/// A credit ledger. Implementations are safe to call from many tasks at once, each operation is
/// atomic (a reader never sees it half done), and a write is acknowledged only once durable (for
/// the backends that are).
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Adds `amount` credits to `account`, creating it if needed; idempotent by `grant_id`.
    /// Returns the account's credits right after this grant.
    async fn grant(&self, grant_id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError>;

    /// Reserves `amount` of `account`'s available credits under `hold_id`, for at most `ttl`.
    async fn reserve(&self, hold_id: &str, account: &str, amount: u64, ttl: Duration) -> Result<(), LedgerError>;

    /// Charges `amount` against the hold; idempotent by `op_id` within the hold. Returns what
    /// remains of the hold.
    async fn charge(&self, hold_id: &str, op_id: &str, amount: u64, reason: &str) -> Result<u64, LedgerError>;

    /// Posts what was charged against the hold and releases the rest.
    async fn settle(&self, hold_id: &str) -> Result<Settlement, LedgerError>;

    /// Releases the whole hold, posting nothing.
    async fn release(&self, hold_id: &str) -> Result<Settlement, LedgerError>;

    /// The account's credits.
    async fn balance(&self, account: &str) -> Result<Balance, LedgerError>;

    /// Sums over every account and hold, read atomically.
    async fn totals(&self) -> Result<LedgerTotals, LedgerError>;

    /// `account`'s journal entries in order, a page at a time.
    async fn history(&self, account: &str, query: &HistoryQuery) -> Result<Vec<Entry>, LedgerError>;

    /// Resolves every open hold whose process died or whose time to live ran out: what was
    /// charged is posted or released as `policy` says, the rest is released.
    async fn recover(&self, policy: FailurePolicy) -> Result<Recovery, LedgerError>;

    /// Re-folds the whole journal and checks it against the balances and holds.
    async fn verify(&self) -> Result<Audit, LedgerError>;

    /// The database and lease replicas share, for a ledger several processes share (PostgreSQL).
    fn replica(&self) -> Option<Replica> {
        None
    }
}

/// Opens the ledger `config` describes; a relative SQLite path is resolved against `base_dir`
/// (the config file's folder). The SQLite file and its folder, or the PostgreSQL schema, are
/// created on first use.
pub async fn open(config: &LedgerConfig, base_dir: &Path) -> Result<Arc<dyn Ledger>, OpenError> {
    match config.kind {
        LedgerKind::Memory => Ok(Arc::new(MemoryLedger::new())),
        LedgerKind::Sqlite => {
            let path = base_dir.join(config.path());
            let ledger = SqliteLedger::open(path, SqliteOptions::default()).await?;
            Ok(Arc::new(ledger))
        }
        LedgerKind::Postgres => Ok(Arc::new(PostgresLedger::open_config(config).await?)),
    }
}

/// Where the ledger `config` describes lives, for messages (a PostgreSQL URL without any
/// password), and the config key that names it.
pub fn location(config: &LedgerConfig, base_dir: &Path) -> (String, &'static str) {
    match config.kind {
        LedgerKind::Postgres => (postgres::redact(config.url.as_deref().unwrap_or_default()), "ledger.url"),
        LedgerKind::Sqlite | LedgerKind::Memory => (base_dir.join(config.path()).display().to_string(), "ledger.path"),
    }
}

/// Runs [`Ledger::recover`] every `every` until the ledger is dropped (it holds only a weak
/// reference), logging what it resolved and what failed.
pub fn spawn_sweeper(ledger: &Arc<dyn Ledger>, policy: FailurePolicy, every: Duration) -> tokio::task::JoinHandle<()> {
    let ledger: Weak<dyn Ledger> = Arc::downgrade(ledger);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(ledger) = ledger.upgrade() else { break };
            match ledger.recover(policy).await {
                Ok(recovery) if recovery.holds > 0 => tracing::warn!(
                    holds = recovery.holds,
                    posted = recovery.posted,
                    released = recovery.released,
                    "resolved holds left by ended processes or past their time to live"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!("sweeping the ledger's abandoned holds failed: {e}"),
            }
        }
    })
}

/// Milliseconds since the Unix epoch: journal times and hold expiries.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis().min(u128::from(MAX_CREDITS)) as u64)
}

/// A time to live in milliseconds, capped so that an expiry still fits in the database.
fn ttl_ms(ttl: Duration) -> u64 {
    ttl.as_millis().min(u128::from(MAX_CREDITS)) as u64
}

/// Journal reasons the ledger writes itself.
mod reasons {
    pub(super) const GRANT: &str = "grant";
    pub(super) const RESERVE: &str = "reserve";
    pub(super) const SETTLE: &str = "settle";
    pub(super) const RELEASE: &str = "release";
    pub(super) const EXPIRED: &str = "recovery: the hold outlived its time to live";
    pub(super) const ABANDONED: &str = "recovery: the process that reserved the hold ended";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_resolves_expired_holds_until_the_ledger_is_dropped() {
        let memory = Arc::new(MemoryLedger::new());
        memory.grant("g", "acme", 10).await.unwrap();
        memory.reserve("stale", "acme", 4, Duration::ZERO).await.unwrap();
        let ledger: Arc<dyn Ledger> = memory.clone();
        let sweeper = spawn_sweeper(&ledger, FailurePolicy::Release, Duration::from_secs(30));
        drop(ledger);

        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(memory.balance("acme").await, Ok(Balance { balance: 10, held: 4 }), "not swept before its period");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(memory.balance("acme").await, Ok(Balance { balance: 10, held: 0 }), "swept after it");

        drop(memory);
        tokio::time::timeout(Duration::from_secs(31), sweeper).await.expect("the sweeper ends with its ledger").unwrap();
    }
}
