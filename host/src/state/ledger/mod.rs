//! Credits: accounts with a balance and holds, behind the [`Ledger`] trait.
//!
//! A run reserves a hold for the most it may cost, steps charge against the hold, and the run
//! settles it (posting what was charged, releasing the rest) or releases it (posting nothing).
//! Every operation carries an id; repeating it with the same arguments returns the first outcome
//! and changes nothing, repeating it with other arguments is [`LedgerError::Conflict`].
//!
//! Amounts are integers. `balance` counts credits not yet posted, `held` the part of it that open
//! holds reserve, so `balance - held` is what a new hold may take. Conservation: the sum of
//! balances plus the sum of posted charges equals the sum of grants, at every instant.

mod memory;

pub use memory::MemoryLedger;

use async_trait::async_trait;

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
    /// The id was used before with other arguments.
    #[error("id '{0}' was already used with different arguments")]
    Conflict(String),
    /// An amount of zero, or a sum that would overflow.
    #[error("invalid amount {0}")]
    InvalidAmount(u64),
    /// The backend failed (I/O, database).
    #[error("ledger backend failed: {0}")]
    Backend(String),
}

/// A credit ledger. Implementations are safe to call from many tasks at once, and each
/// operation is atomic: a reader never sees it half done.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Adds `amount` credits to `account`, creating it if needed; idempotent by `grant_id`.
    async fn grant(&self, grant_id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError>;

    /// Reserves `amount` of `account`'s available credits under `hold_id`.
    async fn reserve(&self, hold_id: &str, account: &str, amount: u64) -> Result<(), LedgerError>;

    /// Charges `amount` against the hold; idempotent by `op_id`. Returns what remains of the hold.
    async fn charge(&self, hold_id: &str, op_id: &str, amount: u64, reason: &str) -> Result<u64, LedgerError>;

    /// Posts what was charged against the hold and releases the rest.
    async fn settle(&self, hold_id: &str) -> Result<Settlement, LedgerError>;

    /// Releases the whole hold, posting nothing.
    async fn release(&self, hold_id: &str) -> Result<Settlement, LedgerError>;

    /// The account's credits.
    async fn balance(&self, account: &str) -> Result<Balance, LedgerError>;

    /// Sums over every account and hold, read atomically.
    async fn totals(&self) -> Result<LedgerTotals, LedgerError>;
}
