//! The in-memory ledger: exact while the process lives, for tests, benchmarks and the CLI.
//!
//! Lock discipline: one mutex guards all accounts and holds, taken once per operation, never
//! across an `.await` (the trait's async methods do their work synchronously), so every
//! operation and every [`Ledger::totals`] read is atomic.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Balance, Ledger, LedgerError, LedgerTotals, Settlement};

/// A [`Ledger`] kept in memory behind one mutex.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    accounts: HashMap<String, Balance>,
    holds: HashMap<String, Hold>,
    grants: HashMap<String, (String, u64)>,
    totals: LedgerTotals,
}

#[derive(Debug)]
struct Hold {
    account: String,
    amount: u64,
    charged: u64,
    /// Charges by op id: (amount, what remained of the hold after it).
    ops: HashMap<String, (u64, u64)>,
    outcome: Option<Closed>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Closed {
    Settled(Settlement),
    Released(Settlement),
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied operation: every operation
        // checks first and mutates after, with no fallible step in between.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn close(&mut self, hold_id: &str, post: bool) -> Result<Settlement, LedgerError> {
        let hold = self.holds.get_mut(hold_id).ok_or_else(|| LedgerError::UnknownHold(hold_id.into()))?;
        if let Some(closed) = hold.outcome {
            return match (closed, post) {
                (Closed::Settled(s), true) | (Closed::Released(s), false) => Ok(s),
                _ => Err(LedgerError::HoldClosed(hold_id.into())),
            };
        }
        let posted = if post { hold.charged } else { 0 };
        let settlement = Settlement { posted, released: hold.amount - posted };
        hold.outcome = Some(if post { Closed::Settled(settlement) } else { Closed::Released(settlement) });
        let account = self.accounts.get_mut(&hold.account).expect("a hold's account exists");
        account.held -= hold.amount;
        account.balance -= posted;
        let totals = &mut self.totals;
        totals.held -= hold.amount;
        totals.balances -= posted;
        totals.posted += posted;
        totals.open_holds -= 1;
        if post {
            totals.settled_holds += 1;
        } else {
            totals.released_holds += 1;
        }
        Ok(settlement)
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn grant(&self, grant_id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError> {
        let mut inner = self.lock();
        if let Some((granted_to, granted)) = inner.grants.get(grant_id) {
            if (granted_to.as_str(), *granted) != (account, amount) {
                return Err(LedgerError::Conflict(grant_id.into()));
            }
            return Ok(inner.accounts[account]);
        }
        if amount == 0 || inner.totals.granted.checked_add(amount).is_none() {
            return Err(LedgerError::InvalidAmount(amount));
        }
        inner.grants.insert(grant_id.into(), (account.into(), amount));
        inner.totals.granted += amount;
        inner.totals.balances += amount;
        let balance = inner.accounts.entry(account.into()).or_default();
        balance.balance += amount;
        Ok(*balance)
    }

    async fn reserve(&self, hold_id: &str, account: &str, amount: u64) -> Result<(), LedgerError> {
        let mut inner = self.lock();
        if let Some(hold) = inner.holds.get(hold_id) {
            return if (hold.account.as_str(), hold.amount) == (account, amount) {
                Ok(())
            } else {
                Err(LedgerError::Conflict(hold_id.into()))
            };
        }
        if amount == 0 {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let balance = inner.accounts.get_mut(account).ok_or_else(|| LedgerError::UnknownAccount(account.into()))?;
        if balance.available() < amount {
            return Err(LedgerError::Insufficient { needed: amount, available: balance.available() });
        }
        balance.held += amount;
        inner.totals.held += amount;
        inner.totals.open_holds += 1;
        let hold = Hold { account: account.into(), amount, charged: 0, ops: HashMap::new(), outcome: None };
        inner.holds.insert(hold_id.into(), hold);
        Ok(())
    }

    async fn charge(&self, hold_id: &str, op_id: &str, amount: u64, _reason: &str) -> Result<u64, LedgerError> {
        let mut inner = self.lock();
        let hold = inner.holds.get_mut(hold_id).ok_or_else(|| LedgerError::UnknownHold(hold_id.into()))?;
        if let Some(&(charged, remaining)) = hold.ops.get(op_id) {
            return if charged == amount { Ok(remaining) } else { Err(LedgerError::Conflict(op_id.into())) };
        }
        if hold.outcome.is_some() {
            return Err(LedgerError::HoldClosed(hold_id.into()));
        }
        if amount == 0 {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let remaining = hold.amount - hold.charged;
        if amount > remaining {
            return Err(LedgerError::ExceedsHold { amount, remaining });
        }
        hold.charged += amount;
        hold.ops.insert(op_id.into(), (amount, remaining - amount));
        Ok(remaining - amount)
    }

    async fn settle(&self, hold_id: &str) -> Result<Settlement, LedgerError> {
        self.lock().close(hold_id, true)
    }

    async fn release(&self, hold_id: &str) -> Result<Settlement, LedgerError> {
        self.lock().close(hold_id, false)
    }

    async fn balance(&self, account: &str) -> Result<Balance, LedgerError> {
        self.lock().accounts.get(account).copied().ok_or_else(|| LedgerError::UnknownAccount(account.into()))
    }

    async fn totals(&self) -> Result<LedgerTotals, LedgerError> {
        Ok(self.lock().totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hold_lifecycle_and_idempotency() {
        let ledger = MemoryLedger::new();
        ledger.grant("g1", "acme", 100).await.unwrap();
        assert_eq!(ledger.grant("g1", "acme", 100).await.unwrap().balance, 100, "a repeated grant changes nothing");
        assert_eq!(ledger.grant("g1", "acme", 5).await, Err(LedgerError::Conflict("g1".into())));

        ledger.reserve("h1", "acme", 60).await.unwrap();
        ledger.reserve("h1", "acme", 60).await.unwrap();
        assert_eq!(ledger.reserve("h2", "acme", 41).await, Err(LedgerError::Insufficient { needed: 41, available: 40 }));

        assert_eq!(ledger.charge("h1", "c1", 25, "token").await, Ok(35));
        assert_eq!(ledger.charge("h1", "c1", 25, "token").await, Ok(35), "a retried charge is not charged twice");
        assert_eq!(ledger.charge("h1", "c2", 36, "token").await, Err(LedgerError::ExceedsHold { amount: 36, remaining: 35 }));

        let settled = Settlement { posted: 25, released: 35 };
        assert_eq!(ledger.settle("h1").await, Ok(settled));
        assert_eq!(ledger.settle("h1").await, Ok(settled), "settling twice returns the first outcome");
        assert_eq!(ledger.release("h1").await, Err(LedgerError::HoldClosed("h1".into())));
        assert_eq!(ledger.charge("h1", "c3", 1, "late").await, Err(LedgerError::HoldClosed("h1".into())));
        assert_eq!(ledger.balance("acme").await, Ok(Balance { balance: 75, held: 0 }));

        let totals = ledger.totals().await.unwrap();
        assert_eq!(totals.balances + totals.posted, totals.granted);
        assert_eq!((totals.open_holds, totals.settled_holds), (0, 1));
    }
}
