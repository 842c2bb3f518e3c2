//! One batch's operations, applied in order to the rows the batch locked and read, by the same
//! rules as the memory ledger; what changed becomes the batch's writes.
//!
//! The writer (see `writer`) locks every row a batch may change before reading it, so nothing
//! here can be changed by anyone else until the batch commits: checking in Rust and then
//! writing is exact. Rows the batch creates (accounts by a grant, holds, grants, charges) are
//! new ids, which their unique constraints keep from being created twice.

use std::collections::HashMap;

use super::super::journal::{HoldState, check_charge, check_close, entry_step};
use super::super::{Balance, EntryKind, LedgerError, MAX_CREDITS, Recovery, Settlement, reasons};

/// One ledger operation, as queued for the writer.
#[derive(Debug, Clone)]
pub(super) enum Op {
    Grant {
        id: String,
        account: String,
        amount: u64,
    },
    Reserve {
        hold: String,
        account: String,
        amount: u64,
        ttl_ms: u64,
    },
    Charge {
        hold: String,
        op: String,
        amount: u64,
        reason: String,
    },
    Close {
        hold: String,
        post: bool,
        reason: &'static str,
    },
    /// Resolves those of `holds` still open, with their reasons.
    Recover {
        holds: Vec<(String, &'static str)>,
        post: bool,
    },
}

/// What an operation returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Granted(Balance),
    Reserved,
    Charged(u64),
    Closed(Settlement),
    Recovered(Recovery),
}

/// An account's row.
#[derive(Debug, Clone)]
pub(super) struct Account {
    /// As the batch's operations left it.
    pub(super) credits: Balance,
    /// As read (zero for a row the batch creates): the batch writes the difference.
    pub(super) read: Balance,
    /// The most available credits the batch used up at any point, from what was read: the row
    /// must have at least this much available when the batch writes it.
    pub(super) need: u64,
    /// Whether the row exists in the database (else a grant of this batch creates it).
    pub(super) stored: bool,
    pub(super) changed: bool,
}

/// A hold's row.
#[derive(Debug, Clone)]
pub(super) struct Hold {
    pub(super) account: String,
    pub(super) amount: u64,
    pub(super) charged: u64,
    pub(super) ttl_ms: u64,
    pub(super) expires_ms: u64,
    pub(super) owner: String,
    pub(super) state: HoldState,
    pub(super) stored: bool,
    pub(super) changed: bool,
}

/// A grant's row: what a repeat returns.
#[derive(Debug, Clone)]
pub(super) struct Grant {
    pub(super) account: String,
    pub(super) amount: u64,
    pub(super) after: Balance,
    pub(super) stored: bool,
}

/// A charge already made: what a repeat returns.
#[derive(Debug, Clone)]
pub(super) struct Charge {
    pub(super) amount: u64,
    pub(super) reason: String,
    /// What remained of the hold right after it.
    pub(super) remaining: u64,
}

/// A journal entry to append.
#[derive(Debug, Clone)]
pub(super) struct NewEntry {
    pub(super) kind: EntryKind,
    pub(super) account: String,
    pub(super) run: Option<String>,
    pub(super) op: Option<String>,
    pub(super) amount: u64,
    pub(super) reason: String,
}

impl NewEntry {
    /// The step the journal records (a charge's, from its op id).
    pub(super) fn step(&self) -> Option<&str> {
        entry_step(self.kind, self.op.as_deref())
    }
}

/// Changes to the writer's row of `totals`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TotalsDelta {
    pub(super) granted: u64,
    pub(super) posted: u64,
    pub(super) settled: u64,
    pub(super) released: u64,
}

/// The rows a batch locked and read, changed as its operations apply.
#[derive(Debug, Default)]
pub(super) struct Book {
    pub(super) now: u64,
    /// The lease id recorded as the owner of new holds.
    pub(super) owner: String,
    pub(super) accounts: HashMap<String, Account>,
    pub(super) holds: HashMap<String, Hold>,
    pub(super) grants: HashMap<String, Grant>,
    /// Charges already made, by (hold, op id), among those the batch names.
    pub(super) charges: HashMap<(String, String), Charge>,
    /// The sum of every grant, read when the batch has grants.
    pub(super) granted: Option<u64>,
    pub(super) journal: Vec<NewEntry>,
    pub(super) totals: TotalsDelta,
}

impl Book {
    /// Applies `op`; a refused operation changes nothing.
    pub(super) fn apply(&mut self, op: &Op) -> Result<Outcome, LedgerError> {
        match op {
            Op::Grant { id, account, amount } => self.grant(id, account, *amount).map(Outcome::Granted),
            Op::Reserve { hold, account, amount, ttl_ms } => {
                self.reserve(hold, account, *amount, *ttl_ms).map(|()| Outcome::Reserved)
            }
            Op::Charge { hold, op, amount, reason } => self.charge(hold, op, *amount, reason).map(Outcome::Charged),
            Op::Close { hold, post, reason } => self.close(hold, *post, reason).map(Outcome::Closed),
            Op::Recover { holds, post } => self.recover(holds, *post).map(Outcome::Recovered),
        }
    }

    fn grant(&mut self, id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError> {
        if let Some(grant) = self.grants.get(id) {
            return if (grant.account.as_str(), grant.amount) == (account, amount) {
                Ok(grant.after)
            } else {
                Err(LedgerError::Conflict(id.into()))
            };
        }
        let granted = self.granted.ok_or_else(|| LedgerError::Backend("the batch did not read the sum of grants".into()))?;
        if amount == 0 || granted.checked_add(amount).is_none_or(|total| total > MAX_CREDITS) {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let row = self.accounts.entry(account.to_string()).or_insert(Account {
            credits: Balance::default(),
            read: Balance::default(),
            need: 0,
            stored: false,
            changed: true,
        });
        row.credits.balance += amount;
        row.changed = true;
        let after = row.credits;
        self.granted = Some(granted + amount);
        self.totals.granted += amount;
        self.grants.insert(id.into(), Grant { account: account.into(), amount, after, stored: false });
        self.entry(EntryKind::Grant, account, None, Some(id), amount, reasons::GRANT);
        Ok(after)
    }

    fn reserve(&mut self, hold_id: &str, account: &str, amount: u64, ttl_ms: u64) -> Result<(), LedgerError> {
        if let Some(hold) = self.holds.get(hold_id) {
            return if (hold.account.as_str(), hold.amount, hold.ttl_ms) == (account, amount, ttl_ms) {
                Ok(())
            } else {
                Err(LedgerError::Conflict(hold_id.into()))
            };
        }
        if amount == 0 {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let row = self.accounts.get_mut(account).ok_or_else(|| LedgerError::UnknownAccount(account.into()))?;
        let available = row.credits.available();
        if available < amount {
            return Err(LedgerError::Insufficient { needed: amount, available });
        }
        row.credits.held += amount;
        row.need = row.need.max(row.read.available().saturating_sub(row.credits.available()));
        row.changed = true;
        let hold = Hold {
            account: account.into(),
            amount,
            charged: 0,
            ttl_ms,
            expires_ms: self.now.saturating_add(ttl_ms),
            owner: self.owner.clone(),
            state: HoldState::Open,
            stored: false,
            changed: true,
        };
        self.holds.insert(hold_id.into(), hold);
        self.entry(EntryKind::Hold, account, Some(hold_id), None, amount, reasons::RESERVE);
        Ok(())
    }

    fn charge(&mut self, hold_id: &str, op_id: &str, amount: u64, reason: &str) -> Result<u64, LedgerError> {
        let hold = self.holds.get_mut(hold_id).ok_or_else(|| LedgerError::UnknownHold(hold_id.into()))?;
        let key = (hold_id.to_string(), op_id.to_string());
        if let Some(charge) = self.charges.get(&key) {
            return if (charge.amount, charge.reason.as_str()) == (amount, reason) {
                Ok(charge.remaining)
            } else {
                Err(LedgerError::Conflict(op_id.into()))
            };
        }
        let open = hold.state == HoldState::Open;
        let remaining = check_charge(hold_id, open, self.now, hold.expires_ms, amount, hold.amount, hold.charged)?;
        hold.charged += amount;
        hold.changed = true;
        let account = hold.account.clone();
        self.charges.insert(key, Charge { amount, reason: reason.into(), remaining: remaining - amount });
        self.entry(EntryKind::Charge, &account, Some(hold_id), Some(op_id), amount, reason);
        Ok(remaining - amount)
    }

    /// Settles (`post`) or releases the hold.
    fn close(&mut self, hold_id: &str, post: bool, reason: &str) -> Result<Settlement, LedgerError> {
        let hold = self.holds.get_mut(hold_id).ok_or_else(|| LedgerError::UnknownHold(hold_id.into()))?;
        if let Some(repeated) = check_close(hold_id, hold.state, post, hold.amount)? {
            return Ok(repeated);
        }
        let row = self.accounts.get_mut(&hold.account).ok_or_else(|| {
            LedgerError::Backend(format!("hold '{hold_id}' names account '{}', which does not exist", hold.account))
        })?;
        let posted = if post { hold.charged } else { 0 };
        let settlement = Settlement { posted, released: hold.amount - posted };
        hold.state = if post { HoldState::Settled { posted } } else { HoldState::Released };
        hold.changed = true;
        row.credits.held -= hold.amount;
        row.credits.balance -= posted;
        row.changed = true;
        let account = hold.account.clone();
        self.totals.posted += posted;
        if post {
            self.totals.settled += 1;
            self.entry(EntryKind::Post, &account, Some(hold_id), None, posted, reason);
        } else {
            self.totals.released += 1;
        }
        if settlement.released > 0 {
            self.entry(EntryKind::Release, &account, Some(hold_id), None, settlement.released, reason);
        }
        Ok(settlement)
    }

    /// Resolves those of `holds` still open, in the order given (by id).
    fn recover(&mut self, holds: &[(String, &'static str)], post: bool) -> Result<Recovery, LedgerError> {
        let mut recovery = Recovery::default();
        for (hold, reason) in holds {
            if self.holds.get(hold).is_some_and(|h| h.state == HoldState::Open) {
                let settlement = self.close(hold, post, reason)?;
                recovery.holds += 1;
                recovery.posted += settlement.posted;
                recovery.released += settlement.released;
            }
        }
        Ok(recovery)
    }

    fn entry(&mut self, kind: EntryKind, account: &str, run: Option<&str>, op: Option<&str>, amount: u64, reason: &str) {
        self.journal.push(NewEntry {
            kind,
            account: account.into(),
            run: run.map(str::to_string),
            op: op.map(str::to_string),
            amount,
            reason: reason.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> Book {
        Book { now: 1_000, owner: "me".into(), granted: Some(0), ..Book::default() }
    }

    #[test]
    fn operations_in_one_batch_see_each_other() {
        let mut book = book();
        assert_eq!(
            book.apply(&Op::Grant { id: "g".into(), account: "a".into(), amount: 10 }),
            Ok(Outcome::Granted(Balance { balance: 10, held: 0 }))
        );
        let reserve = Op::Reserve { hold: "h".into(), account: "a".into(), amount: 6, ttl_ms: 50 };
        assert_eq!(book.apply(&reserve), Ok(Outcome::Reserved));
        assert_eq!(book.apply(&reserve), Ok(Outcome::Reserved), "a repeat");
        let other = Op::Reserve { hold: "h2".into(), account: "a".into(), amount: 5, ttl_ms: 50 };
        assert_eq!(book.apply(&other), Err(LedgerError::Insufficient { needed: 5, available: 4 }));
        let charge = Op::Charge { hold: "h".into(), op: "s#1".into(), amount: 4, reason: "token".into() };
        assert_eq!(book.apply(&charge), Ok(Outcome::Charged(2)));
        assert_eq!(book.apply(&charge), Ok(Outcome::Charged(2)), "a retry is charged once");
        let recover = Op::Recover { holds: vec![("h".into(), reasons::EXPIRED)], post: true };
        assert_eq!(book.apply(&recover), Ok(Outcome::Recovered(Recovery { holds: 1, posted: 4, released: 2 })));
        assert_eq!(book.apply(&recover), Ok(Outcome::Recovered(Recovery::default())), "resolved once");
        assert_eq!(book.accounts["a"].credits, Balance { balance: 6, held: 0 });
        assert_eq!(book.totals, TotalsDelta { granted: 10, posted: 4, settled: 1, released: 0 });
        let kinds: Vec<_> = book.journal.iter().map(|e| (e.kind, e.amount, e.step())).collect();
        assert_eq!(
            kinds,
            [
                (EntryKind::Grant, 10, None),
                (EntryKind::Hold, 6, None),
                (EntryKind::Charge, 4, Some("s")),
                (EntryKind::Post, 4, None),
                (EntryKind::Release, 2, None)
            ]
        );
    }

    #[test]
    fn a_batch_needs_the_most_it_took_from_what_it_read() {
        let read = Balance { balance: 100, held: 30 };
        let mut book = book();
        book.accounts.insert("a".into(), Account { credits: read, read, need: 0, stored: true, changed: false });
        let hold = |amount| Hold {
            account: "a".into(),
            amount,
            charged: 0,
            ttl_ms: 50,
            expires_ms: 5_000,
            owner: "me".into(),
            state: HoldState::Open,
            stored: true,
            changed: false,
        };
        book.holds.insert("old".into(), hold(30));
        let reserve = |hold: &str, amount| Op::Reserve { hold: hold.into(), account: "a".into(), amount, ttl_ms: 50 };
        assert_eq!(book.apply(&reserve("h1", 50)), Ok(Outcome::Reserved));
        assert_eq!(book.accounts["a"].need, 50);
        let release = Op::Close { hold: "old".into(), post: false, reason: reasons::RELEASE };
        assert_eq!(book.apply(&release), Ok(Outcome::Closed(Settlement { posted: 0, released: 30 })));
        assert_eq!(book.apply(&reserve("h2", 40)), Ok(Outcome::Reserved));
        assert_eq!(book.accounts["a"].need, 60, "70 available were read; 10 were left at the lowest");
        let account = &book.accounts["a"];
        assert_eq!((account.credits, account.read), (Balance { balance: 100, held: 90 }, read));
    }

    #[test]
    fn a_grant_needs_the_sum_of_grants() {
        let mut book = Book { granted: None, ..book() };
        let grant = Op::Grant { id: "g".into(), account: "a".into(), amount: 1 };
        assert!(matches!(book.apply(&grant), Err(LedgerError::Backend(_))));
        assert!(book.journal.is_empty() && book.accounts.is_empty());
    }
}
