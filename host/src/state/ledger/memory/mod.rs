//! The in-memory ledger: exact while the process lives, for tests and benchmarks.
//!
//! Lock discipline: the whole ledger is one [`Book`] behind one mutex, taken once per operation
//! and never across an `.await` (the trait's async methods do their work synchronously), so every
//! operation and every read is atomic. The clock is read before the lock is taken, so the book
//! itself is deterministic; the loom model test at the bottom runs its operations from several
//! threads under loom's mutex. Nothing is ever removed: ids stay recognised for the process's
//! life, and the journal keeps every entry.
//!
//! Layout: accounts and holds are numbered in the order they came, and the journal refers to
//! them by number, so a record is a few numbers and an operation touches little memory; only
//! the texts a caller gave (ids, op ids, charge reasons) are allocated, once each. Holds are
//! found by id through a [`HoldIndex`], which keeps the run ids that come in order in a list;
//! the open ones, which charges and closes look for, also through a map as small as the runs in
//! flight.

mod hold_index;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use foldhash::HashMap;

use super::journal::{Fold, HoldRow, HoldState, check_charge, entry_step};
use super::{
    Audit, Balance, Entry, EntryKind, HistoryQuery, Ledger, LedgerError, LedgerTotals, MAX_CREDITS, Recovery, Settlement, now_ms,
    reasons, ttl_ms,
};
use crate::config::FailurePolicy;
use hold_index::HoldIndex;

/// A [`Ledger`] kept in memory behind one mutex.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    book: Mutex<Book>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, operation: impl FnOnce(&mut Book) -> R) -> R {
        // A panic while holding the lock cannot leave a half-applied operation: every operation
        // checks first and mutates after, with no fallible step in between.
        operation(&mut self.book.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn grant(&self, grant_id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError> {
        let now = now_ms();
        self.with(|book| book.grant(now, grant_id, account, amount))
    }

    async fn reserve(&self, hold_id: &str, account: &str, amount: u64, ttl: Duration) -> Result<(), LedgerError> {
        let now = now_ms();
        self.with(|book| book.reserve(now, hold_id, account, amount, ttl_ms(ttl)))
    }

    async fn charge(&self, hold_id: &str, op_id: &str, amount: u64, reason: &str) -> Result<u64, LedgerError> {
        let now = now_ms();
        self.with(|book| book.charge(now, hold_id, op_id, amount, reason))
    }

    async fn settle(&self, hold_id: &str) -> Result<Settlement, LedgerError> {
        let now = now_ms();
        self.with(|book| book.close(now, hold_id, true, OwnReason::Settle))
    }

    async fn release(&self, hold_id: &str) -> Result<Settlement, LedgerError> {
        let now = now_ms();
        self.with(|book| book.close(now, hold_id, false, OwnReason::Release))
    }

    async fn balance(&self, account: &str) -> Result<Balance, LedgerError> {
        self.with(|book| book.balance(account))
    }

    async fn totals(&self) -> Result<LedgerTotals, LedgerError> {
        Ok(self.with(|book| book.totals))
    }

    async fn history(&self, account: &str, query: &HistoryQuery) -> Result<Vec<Entry>, LedgerError> {
        Ok(self.with(|book| book.history(account, query)))
    }

    async fn recover(&self, policy: FailurePolicy) -> Result<Recovery, LedgerError> {
        // Every hold here belongs to this process, which is alive: only expiry resolves holds.
        let now = now_ms();
        self.with(|book| book.recover(now, policy))
    }

    async fn verify(&self) -> Result<Audit, LedgerError> {
        Ok(self.with(|book| book.verify()))
    }
}

/// Every account, hold and journal entry; each method is one whole operation.
#[derive(Debug, Default)]
struct Book {
    /// Accounts by number.
    accounts: Vec<Account>,
    account_numbers: HashMap<Arc<str>, u32>,
    /// Holds by number.
    holds: Chunks<Hold>,
    hold_index: HoldIndex,
    grants: HashMap<Arc<str>, Grant>,
    /// The open holds' numbers by id: the holds that are charged and closed, and that recovery
    /// looks at.
    open: HashMap<Arc<str>, u32>,
    journal: Chunks<Record>,
    totals: LedgerTotals,
}

/// Items per chunk of [`Chunks`].
const CHUNK: usize = 1 << 12;

/// An append-only list in chunks of fixed capacity: an append never moves what is written, so
/// the lock is never held to copy a buffer the size of the whole list.
#[derive(Debug)]
struct Chunks<T> {
    chunks: Vec<Vec<T>>,
}

impl<T> Default for Chunks<T> {
    fn default() -> Self {
        Chunks { chunks: Vec::new() }
    }
}

impl<T> Chunks<T> {
    fn len(&self) -> usize {
        self.chunks.last().map_or(0, |last| (self.chunks.len() - 1) * CHUNK + last.len())
    }

    fn push(&mut self, item: T) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(item),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(item);
                self.chunks.push(chunk);
            }
        }
    }

    /// The item at `position` (from 0), which exists.
    fn get(&self, position: u32) -> &T {
        let position = position as usize;
        &self.chunks[position / CHUNK][position % CHUNK]
    }

    /// The item at `position` (from 0), which exists.
    fn get_mut(&mut self, position: u32) -> &mut T {
        let position = position as usize;
        &mut self.chunks[position / CHUNK][position % CHUNK]
    }

    /// The items after the first `skip`, with their positions (from 0).
    fn after(&self, skip: usize) -> impl Iterator<Item = (usize, &T)> {
        let first = skip / CHUNK;
        self.chunks.iter().enumerate().skip(first).flat_map(move |(c, chunk)| {
            let start = if c == first { skip % CHUNK } else { 0 };
            chunk.iter().enumerate().skip(start).map(move |(i, item)| (c * CHUNK + i, item))
        })
    }
}

/// The number the next of `count` accounts or holds gets: numbers are `u32`s.
fn next_number(count: usize, what: &str) -> Result<u32, LedgerError> {
    u32::try_from(count).map_err(|_| LedgerError::Backend(format!("the in-memory ledger holds its maximum of {count} {what}")))
}

#[derive(Debug)]
struct Account {
    id: Arc<str>,
    credits: Balance,
}

#[derive(Debug)]
struct Grant {
    account: u32,
    amount: u64,
    /// The account's credits right after the grant: what a repeat returns.
    after: Balance,
}

#[derive(Debug)]
struct Hold {
    id: Arc<str>,
    account: u32,
    amount: u64,
    ttl_ms: u64,
    expires_ms: u64,
    charged: u64,
    ops: HashMap<Arc<str>, Charge>,
    outcome: Option<Closed>,
}

#[derive(Debug)]
struct Charge {
    amount: u64,
    reason: Arc<str>,
    /// What remained of the hold after it: what a repeat returns.
    remaining: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Closed {
    Settled(Settlement),
    Released(Settlement),
}

/// A journal entry; its id is its position plus one.
#[derive(Debug)]
struct Record {
    time_ms: u64,
    amount: u64,
    kind: EntryKind,
    account: u32,
    hold: Option<u32>,
    op: Option<Arc<str>>,
    reason: Reason,
}

/// Why a record was written: one of the ledger's own reasons, or the one a charge gave.
#[derive(Debug)]
enum Reason {
    Own(OwnReason),
    Given(Arc<str>),
}

#[derive(Debug, Clone, Copy)]
enum OwnReason {
    Grant,
    Reserve,
    Settle,
    Release,
    Expired,
}

impl Reason {
    fn text(&self) -> &str {
        match self {
            Reason::Own(OwnReason::Grant) => reasons::GRANT,
            Reason::Own(OwnReason::Reserve) => reasons::RESERVE,
            Reason::Own(OwnReason::Settle) => reasons::SETTLE,
            Reason::Own(OwnReason::Release) => reasons::RELEASE,
            Reason::Own(OwnReason::Expired) => reasons::EXPIRED,
            Reason::Given(reason) => reason,
        }
    }
}

impl Book {
    fn grant(&mut self, now: u64, grant_id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError> {
        if let Some(grant) = self.grants.get(grant_id) {
            return if (&*self.accounts[grant.account as usize].id, grant.amount) == (account, amount) {
                Ok(grant.after)
            } else {
                Err(LedgerError::Conflict(grant_id.into()))
            };
        }
        if amount == 0 || self.totals.granted.checked_add(amount).is_none_or(|total| total > MAX_CREDITS) {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let number = match self.account_numbers.get(account) {
            Some(&number) => number,
            None => {
                let number = next_number(self.accounts.len(), "accounts")?;
                let id: Arc<str> = account.into();
                self.account_numbers.insert(Arc::clone(&id), number);
                self.accounts.push(Account { id, credits: Balance::default() });
                number
            }
        };
        let credits = &mut self.accounts[number as usize].credits;
        credits.balance += amount;
        let after = *credits;
        self.totals.granted += amount;
        self.totals.balances += amount;
        let grant_id: Arc<str> = grant_id.into();
        self.grants.insert(Arc::clone(&grant_id), Grant { account: number, amount, after });
        self.journal.push(Record {
            time_ms: now,
            amount,
            kind: EntryKind::Grant,
            account: number,
            hold: None,
            op: Some(grant_id),
            reason: Reason::Own(OwnReason::Grant),
        });
        Ok(after)
    }

    /// The number of hold `hold_id`: an open hold's from the small map of open ones.
    fn hold_number(&self, hold_id: &str) -> Option<u32> {
        self.open.get(hold_id).copied().or_else(|| self.hold_index.find(hold_id))
    }

    fn reserve(&mut self, now: u64, hold_id: &str, account: &str, amount: u64, ttl_ms: u64) -> Result<(), LedgerError> {
        if let Some(number) = self.hold_index.find(hold_id) {
            let hold = self.holds.get(number);
            let same = (&*self.accounts[hold.account as usize].id, hold.amount, hold.ttl_ms) == (account, amount, ttl_ms);
            return if same { Ok(()) } else { Err(LedgerError::Conflict(hold_id.into())) };
        }
        if amount == 0 {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let &account_number = self.account_numbers.get(account).ok_or_else(|| LedgerError::UnknownAccount(account.into()))?;
        let credits = &mut self.accounts[account_number as usize].credits;
        let available = credits.available();
        if available < amount {
            return Err(LedgerError::Insufficient { needed: amount, available });
        }
        let number = next_number(self.holds.len(), "holds")?;
        credits.held += amount;
        self.totals.held += amount;
        self.totals.open_holds += 1;
        let id: Arc<str> = hold_id.into();
        self.hold_index.insert(&id, number);
        self.open.insert(Arc::clone(&id), number);
        let expires_ms = now.saturating_add(ttl_ms);
        let ops = HashMap::default();
        self.holds.push(Hold { id, account: account_number, amount, ttl_ms, expires_ms, charged: 0, ops, outcome: None });
        self.journal.push(Record {
            time_ms: now,
            amount,
            kind: EntryKind::Hold,
            account: account_number,
            hold: Some(number),
            op: None,
            reason: Reason::Own(OwnReason::Reserve),
        });
        Ok(())
    }

    fn charge(&mut self, now: u64, hold_id: &str, op_id: &str, amount: u64, reason: &str) -> Result<u64, LedgerError> {
        let number = self.hold_number(hold_id).ok_or_else(|| LedgerError::UnknownHold(hold_id.into()))?;
        let hold = self.holds.get_mut(number);
        if let Some(charge) = hold.ops.get(op_id) {
            return if (charge.amount, &*charge.reason) == (amount, reason) {
                Ok(charge.remaining)
            } else {
                Err(LedgerError::Conflict(op_id.into()))
            };
        }
        let remaining = check_charge(hold_id, hold.outcome.is_none(), now, hold.expires_ms, amount, hold.amount, hold.charged)?;
        hold.charged += amount;
        let (op, reason): (Arc<str>, Arc<str>) = (op_id.into(), reason.into());
        hold.ops.insert(Arc::clone(&op), Charge { amount, reason: Arc::clone(&reason), remaining: remaining - amount });
        self.journal.push(Record {
            time_ms: now,
            amount,
            kind: EntryKind::Charge,
            account: hold.account,
            hold: Some(number),
            op: Some(op),
            reason: Reason::Given(reason),
        });
        Ok(remaining - amount)
    }

    /// Settles (`post`) or releases the hold.
    fn close(&mut self, now: u64, hold_id: &str, post: bool, reason: OwnReason) -> Result<Settlement, LedgerError> {
        let number = self.hold_number(hold_id).ok_or_else(|| LedgerError::UnknownHold(hold_id.into()))?;
        match self.holds.get(number).outcome {
            Some(Closed::Settled(s)) if post => Ok(s),
            Some(Closed::Released(s)) if !post => Ok(s),
            Some(_) => Err(LedgerError::HoldClosed(hold_id.into())),
            None => Ok(self.close_open(now, number, post, reason)),
        }
    }

    /// Settles (`post`) or releases hold `number`, which is open.
    fn close_open(&mut self, now: u64, number: u32, post: bool, reason: OwnReason) -> Settlement {
        let hold = self.holds.get_mut(number);
        let posted = if post { hold.charged } else { 0 };
        let settlement = Settlement { posted, released: hold.amount - posted };
        hold.outcome = Some(if post { Closed::Settled(settlement) } else { Closed::Released(settlement) });
        self.open.remove(&hold.id);
        let credits = &mut self.accounts[hold.account as usize].credits;
        credits.held -= hold.amount;
        credits.balance -= posted;
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
        let account = hold.account;
        let entry = |kind, amount| Record {
            time_ms: now,
            amount,
            kind,
            account,
            hold: Some(number),
            op: None,
            reason: Reason::Own(reason),
        };
        if post {
            self.journal.push(entry(EntryKind::Post, posted));
        }
        if settlement.released > 0 {
            self.journal.push(entry(EntryKind::Release, settlement.released));
        }
        settlement
    }

    fn recover(&mut self, now: u64, policy: FailurePolicy) -> Result<Recovery, LedgerError> {
        let mut expired: Vec<u32> =
            self.open.values().copied().filter(|&number| self.holds.get(number).expires_ms <= now).collect();
        // In id order, as the SQLite ledger does: the same journal for the same operations.
        expired.sort_unstable_by(|a, b| self.holds.get(*a).id.cmp(&self.holds.get(*b).id));
        let mut recovery = Recovery::default();
        for number in expired {
            let settlement = self.close_open(now, number, policy == FailurePolicy::PostCharged, OwnReason::Expired);
            recovery.holds += 1;
            recovery.posted += settlement.posted;
            recovery.released += settlement.released;
        }
        Ok(recovery)
    }

    fn balance(&self, account: &str) -> Result<Balance, LedgerError> {
        let number = self.account_numbers.get(account).ok_or_else(|| LedgerError::UnknownAccount(account.into()))?;
        Ok(self.accounts[*number as usize].credits)
    }

    fn history(&self, account: &str, query: &HistoryQuery) -> Vec<Entry> {
        let Some(&account_number) = self.account_numbers.get(account) else {
            return Vec::new();
        };
        let hold = match query.run.as_deref().map(|run| self.hold_number(run)) {
            Some(None) => return Vec::new(),
            Some(Some(number)) => Some(number),
            None => None,
        };
        let after = usize::try_from(query.after).unwrap_or(usize::MAX);
        self.journal
            .after(after)
            .filter(|(_, r)| r.account == account_number && hold.is_none_or(|hold| r.hold == Some(hold)))
            .take(query.limit)
            .map(|(position, r)| Entry {
                id: position as u64 + 1,
                time_ms: r.time_ms,
                account: account.to_string(),
                run: r.hold.map(|hold| self.holds.get(hold).id.to_string()),
                op: r.op.as_deref().map(str::to_string),
                step: entry_step(r.kind, r.op.as_deref()).map(str::to_string),
                kind: r.kind,
                amount: r.amount,
                reason: r.reason.text().to_string(),
            })
            .collect()
    }

    fn verify(&self) -> Audit {
        let mut fold = Fold::default();
        for (position, r) in self.journal.after(0) {
            let run = r.hold.map(|hold| &*self.holds.get(hold).id);
            fold.apply(position as u64 + 1, r.kind, &self.accounts[r.account as usize].id, run, r.amount);
        }
        let accounts = self.accounts.iter().map(|a| (&*a.id, a.credits));
        let holds = self.holds.after(0).map(|(_, h)| {
            let state = match h.outcome {
                None => HoldState::Open,
                Some(Closed::Settled(s)) => HoldState::Settled { posted: s.posted },
                Some(Closed::Released(_)) => HoldState::Released,
            };
            let account = &self.accounts[h.account as usize].id;
            (&*h.id, HoldRow { account, amount: h.amount, charged: Some(h.charged), state })
        });
        fold.finish(accounts, holds, &self.totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn chunks_number_their_items_across_chunks() {
        let mut list = Chunks::default();
        let total = 2 * CHUNK + 3;
        for item in 0..total {
            assert_eq!(list.len(), item);
            list.push(item);
        }
        assert_eq!(list.chunks.len(), 3);
        // Here an item is its position.
        assert!(list.after(0).all(|(position, &item)| position == item));
        assert_eq!((*list.get(CHUNK as u32), *list.get(total as u32 - 1)), (CHUNK, total - 1));
        for skip in [1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 2] {
            let positions: Vec<usize> = list.after(skip).map(|(position, _)| position).collect();
            assert_eq!(positions, (skip..total).collect::<Vec<_>>(), "after {skip}");
        }
        assert_eq!(list.after(total).count(), 0);
        assert_eq!(list.after(usize::MAX).count(), 0);
    }

    #[test]
    fn a_record_fits_in_a_cache_line() {
        // The journal keeps every record for the process's life.
        assert!(size_of::<Record>() <= 64, "{} bytes", size_of::<Record>());
    }

    #[tokio::test]
    async fn hold_lifecycle_and_idempotency() {
        let ledger = MemoryLedger::new();
        let granted = Balance { balance: 100, held: 0 };
        assert_eq!(ledger.grant("g1", "acme", 100).await, Ok(granted));
        ledger.reserve("h0", "acme", 1, HOUR).await.unwrap();
        assert_eq!(ledger.grant("g1", "acme", 100).await, Ok(granted), "a repeated grant returns its first outcome");
        ledger.release("h0").await.unwrap();
        assert_eq!(ledger.grant("g1", "acme", 5).await, Err(LedgerError::Conflict("g1".into())));

        ledger.reserve("h1", "acme", 60, HOUR).await.unwrap();
        ledger.reserve("h1", "acme", 60, HOUR).await.unwrap();
        assert_eq!(ledger.reserve("h1", "acme", 60, HOUR * 2).await, Err(LedgerError::Conflict("h1".into())));
        assert_eq!(ledger.reserve("h2", "acme", 41, HOUR).await, Err(LedgerError::Insufficient { needed: 41, available: 40 }));

        assert_eq!(ledger.charge("h1", "c1", 25, "token").await, Ok(35));
        assert_eq!(ledger.charge("h1", "c1", 25, "token").await, Ok(35), "a retried charge is not charged twice");
        assert_eq!(ledger.charge("h1", "c1", 25, "other").await, Err(LedgerError::Conflict("c1".into())));
        assert_eq!(ledger.charge("h1", "c2", 36, "token").await, Err(LedgerError::ExceedsHold { amount: 36, remaining: 35 }));

        let settled = Settlement { posted: 25, released: 35 };
        assert_eq!(ledger.settle("h1").await, Ok(settled));
        assert_eq!(ledger.settle("h1").await, Ok(settled), "settling twice returns the first outcome");
        assert_eq!(ledger.release("h1").await, Err(LedgerError::HoldClosed("h1".into())));
        assert_eq!(ledger.charge("h1", "c3", 1, "late").await, Err(LedgerError::HoldClosed("h1".into())));
        assert_eq!(ledger.charge("h1", "c1", 25, "token").await, Ok(35), "a retry after the settlement still gets its outcome");
        assert_eq!(ledger.balance("acme").await, Ok(Balance { balance: 75, held: 0 }));

        let totals = ledger.totals().await.unwrap();
        assert_eq!(totals.balances + totals.posted, totals.granted);
        assert_eq!((totals.open_holds, totals.settled_holds, totals.released_holds), (0, 1, 1));
        let audit = ledger.verify().await.unwrap();
        assert!(audit.is_ok(), "{:?}", audit.problems);
        assert_eq!((audit.entries, audit.posted, audit.balances), (7, 25, 75));
    }

    #[tokio::test]
    async fn expired_holds_take_no_charges_and_recovery_applies_the_policy() {
        let ledger = MemoryLedger::new();
        ledger.grant("g", "acme", 100).await.unwrap();
        ledger.reserve("live", "acme", 10, HOUR).await.unwrap();
        ledger.reserve("old", "acme", 30, Duration::ZERO).await.unwrap();
        assert_eq!(ledger.charge("old", "c", 1, "late").await, Err(LedgerError::HoldExpired("old".into())));
        assert_eq!(ledger.recover(FailurePolicy::Release).await, Ok(Recovery { holds: 1, posted: 0, released: 30 }));
        assert_eq!(ledger.recover(FailurePolicy::Release).await, Ok(Recovery::default()), "each hold is resolved once");
        assert_eq!(ledger.release("old").await, Ok(Settlement { posted: 0, released: 30 }));
        assert_eq!(ledger.balance("acme").await, Ok(Balance { balance: 100, held: 10 }));

        ledger.charge("live", "c", 4, "token").await.unwrap();
        let history = ledger.history("acme", &HistoryQuery { run: Some("old".into()), ..HistoryQuery::default() }).await.unwrap();
        let kinds: Vec<_> = history.iter().map(|e| (e.kind, e.amount, e.reason.as_str())).collect();
        assert_eq!(kinds, [(EntryKind::Hold, 30, reasons::RESERVE), (EntryKind::Release, 30, reasons::EXPIRED)]);
        let page = ledger.history("acme", &HistoryQuery { after: history[0].id, limit: 2, ..HistoryQuery::default() }).await;
        assert_eq!(page.unwrap().iter().map(|e| e.kind).collect::<Vec<_>>(), [EntryKind::Release, EntryKind::Charge]);
        assert!(ledger.verify().await.unwrap().is_ok());
    }

    #[test]
    fn grants_keep_the_total_within_max_credits() {
        let mut book = Book::default();
        assert_eq!(book.grant(0, "g0", "a", 0), Err(LedgerError::InvalidAmount(0)));
        book.grant(0, "g1", "a", MAX_CREDITS - 1).unwrap();
        assert_eq!(book.grant(0, "g2", "b", 2), Err(LedgerError::InvalidAmount(2)));
        assert_eq!(book.grant(0, "g3", "b", 1).map(|b| b.balance), Ok(1));
        assert!(book.verify().is_ok());
    }

    /// The locking core under loom: every interleaving of two steps of one run charging,
    /// retrying, settling and releasing against one hold while a reader watches the totals.
    #[test]
    fn loom_one_lock_per_operation_keeps_holds_exact() {
        use loom::sync::{Arc, Mutex};

        loom::model(|| {
            let book = Arc::new(Mutex::new(Book::default()));
            {
                let mut book = book.lock().unwrap();
                book.grant(0, "g", "acme", 10).unwrap();
                book.reserve(0, "run", "acme", 6, u64::MAX).unwrap();
            }
            let step = |charge: &'static str, amount: u64, post: bool| {
                let book = Arc::clone(&book);
                loom::thread::spawn(move || {
                    let charged = book.lock().unwrap().charge(0, "run", charge, amount, "token");
                    let retried = book.lock().unwrap().charge(0, "run", charge, amount, "token");
                    assert!(charged.is_err() || retried == charged, "a retry returns the first outcome");
                    let reason = if post { OwnReason::Settle } else { OwnReason::Release };
                    let closed = book.lock().unwrap().close(0, "run", post, reason);
                    (charged, closed)
                })
            };
            let settler = step("a#1", 4, true);
            let releaser = step("b#1", 3, false);
            let totals = book.lock().unwrap().totals;
            assert_eq!(totals.balances + totals.posted, totals.granted, "conservation at every read");
            assert!(totals.held <= totals.balances);

            let (charged_a, settled) = settler.join().unwrap();
            let (charged_b, released) = releaser.join().unwrap();
            assert!(settled.is_ok() != released.is_ok(), "exactly one of settle and release wins: {settled:?} {released:?}");
            assert!(charged_a.is_ok() || charged_b.is_ok(), "the first charge always fits");
            assert!(charged_a.is_err() || charged_b.is_err(), "4 + 3 never fits in a hold of 6");
            let book = book.lock().unwrap();
            let hold = book.holds.get(book.hold_number("run").unwrap());
            assert!(hold.charged <= hold.amount);
            let posted = settled.as_ref().map_or(0, |s| s.posted);
            if settled.is_ok() {
                assert_eq!(posted, hold.charged, "a settlement posts every charge made before it");
            }
            assert_eq!(book.totals.posted, posted);
            assert_eq!((book.totals.open_holds, book.totals.held), (0, 0));
            assert!(book.verify().is_ok());
        });
    }
}
