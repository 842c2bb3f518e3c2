//! The in-memory ledger: exact while the process lives, for tests and benchmarks.
//!
//! Lock discipline: the whole ledger is one [`Book`] behind one mutex, taken once per operation
//! and never across an `.await` (the trait's async methods do their work synchronously), so every
//! operation and every read is atomic. The clock is read before the lock is taken, so the book
//! itself is deterministic; the loom model test at the bottom runs its operations from several
//! threads under loom's mutex. Nothing is ever removed: ids stay recognised for the process's
//! life, and the journal keeps every entry.

use std::collections::BTreeSet;
use std::collections::hash_map;
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
        self.with(|book| book.close(now, hold_id, true, Arc::clone(&book.own_reasons.settle)))
    }

    async fn release(&self, hold_id: &str) -> Result<Settlement, LedgerError> {
        let now = now_ms();
        self.with(|book| book.close(now, hold_id, false, Arc::clone(&book.own_reasons.release)))
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
    accounts: HashMap<Arc<str>, Account>,
    /// Boxed: as the map grows it moves pointers, not holds.
    holds: HashMap<Arc<str>, Box<Hold>>,
    grants: HashMap<Arc<str>, Grant>,
    /// Open holds by expiry, for recovery.
    open: BTreeSet<(u64, Arc<str>)>,
    journal: Journal,
    totals: LedgerTotals,
    own_reasons: OwnReasons,
}

/// The ledger's own reasons, allocated once and shared by every record that gives one.
#[derive(Debug)]
struct OwnReasons {
    grant: Arc<str>,
    reserve: Arc<str>,
    settle: Arc<str>,
    release: Arc<str>,
    expired: Arc<str>,
}

impl Default for OwnReasons {
    fn default() -> Self {
        OwnReasons {
            grant: reasons::GRANT.into(),
            reserve: reasons::RESERVE.into(),
            settle: reasons::SETTLE.into(),
            release: reasons::RELEASE.into(),
            expired: reasons::EXPIRED.into(),
        }
    }
}

/// Records per chunk of the [`Journal`].
const JOURNAL_CHUNK: usize = 1 << 16;

/// The journal, in chunks of fixed capacity: an append never moves what is written, so the lock
/// is never held to copy a buffer the size of the whole journal.
#[derive(Debug, Default)]
struct Journal {
    chunks: Vec<Vec<Record>>,
}

impl Journal {
    fn push(&mut self, record: Record) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < JOURNAL_CHUNK => chunk.push(record),
            _ => {
                let mut chunk = Vec::with_capacity(JOURNAL_CHUNK);
                chunk.push(record);
                self.chunks.push(chunk);
            }
        }
    }

    /// The records after the first `skip`, with their ids (positions from 1).
    fn after(&self, skip: usize) -> impl Iterator<Item = (u64, &Record)> {
        let first = skip / JOURNAL_CHUNK;
        self.chunks.iter().enumerate().skip(first).flat_map(move |(c, chunk)| {
            let start = if c == first { skip % JOURNAL_CHUNK } else { 0 };
            chunk.iter().enumerate().skip(start).map(move |(i, record)| ((c * JOURNAL_CHUNK + i) as u64 + 1, record))
        })
    }
}

#[derive(Debug)]
struct Account {
    id: Arc<str>,
    credits: Balance,
}

#[derive(Debug)]
struct Grant {
    account: Arc<str>,
    amount: u64,
    /// The account's credits right after the grant: what a repeat returns.
    after: Balance,
}

#[derive(Debug)]
struct Hold {
    id: Arc<str>,
    account: Arc<str>,
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
    kind: EntryKind,
    account: Arc<str>,
    run: Option<Arc<str>>,
    op: Option<Arc<str>>,
    amount: u64,
    reason: Arc<str>,
}

impl Book {
    fn grant(&mut self, now: u64, grant_id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError> {
        if let Some(grant) = self.grants.get(grant_id) {
            return if (&*grant.account, grant.amount) == (account, amount) {
                Ok(grant.after)
            } else {
                Err(LedgerError::Conflict(grant_id.into()))
            };
        }
        if amount == 0 || self.totals.granted.checked_add(amount).is_none_or(|total| total > MAX_CREDITS) {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let entry = self
            .accounts
            .entry(account.into())
            .or_insert_with_key(|id| Account { id: Arc::clone(id), credits: Balance::default() });
        entry.credits.balance += amount;
        let (after, account) = (entry.credits, Arc::clone(&entry.id));
        self.totals.granted += amount;
        self.totals.balances += amount;
        let grant_id: Arc<str> = grant_id.into();
        self.grants.insert(Arc::clone(&grant_id), Grant { account: Arc::clone(&account), amount, after });
        let reason = Arc::clone(&self.own_reasons.grant);
        self.journal.push(Record {
            time_ms: now,
            kind: EntryKind::Grant,
            account,
            run: None,
            op: Some(grant_id),
            amount,
            reason,
        });
        Ok(after)
    }

    fn reserve(&mut self, now: u64, hold_id: &str, account: &str, amount: u64, ttl_ms: u64) -> Result<(), LedgerError> {
        // One lookup for both the repeat check and the insertion: the map outgrows the cache.
        let slot = match self.holds.entry(hold_id.into()) {
            hash_map::Entry::Occupied(hold) => {
                let hold = hold.get();
                return if (&*hold.account, hold.amount, hold.ttl_ms) == (account, amount, ttl_ms) {
                    Ok(())
                } else {
                    Err(LedgerError::Conflict(hold_id.into()))
                };
            }
            hash_map::Entry::Vacant(slot) => slot,
        };
        if amount == 0 {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let entry = self.accounts.get_mut(account).ok_or_else(|| LedgerError::UnknownAccount(account.into()))?;
        let available = entry.credits.available();
        if available < amount {
            return Err(LedgerError::Insufficient { needed: amount, available });
        }
        entry.credits.held += amount;
        self.totals.held += amount;
        self.totals.open_holds += 1;
        let id = Arc::clone(slot.key());
        let expires_ms = now.saturating_add(ttl_ms);
        self.open.insert((expires_ms, Arc::clone(&id)));
        let hold = Hold {
            id: Arc::clone(&id),
            account: Arc::clone(&entry.id),
            amount,
            ttl_ms,
            expires_ms,
            charged: 0,
            ops: HashMap::default(),
            outcome: None,
        };
        let (account, run, reason) = (Arc::clone(&entry.id), Some(Arc::clone(&id)), Arc::clone(&self.own_reasons.reserve));
        self.journal.push(Record { time_ms: now, kind: EntryKind::Hold, account, run, op: None, amount, reason });
        slot.insert(Box::new(hold));
        Ok(())
    }

    fn charge(&mut self, now: u64, hold_id: &str, op_id: &str, amount: u64, reason: &str) -> Result<u64, LedgerError> {
        let hold = self.holds.get_mut(hold_id).ok_or_else(|| LedgerError::UnknownHold(hold_id.into()))?;
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
        let (account, run) = (Arc::clone(&hold.account), Some(Arc::clone(&hold.id)));
        self.journal.push(Record { time_ms: now, kind: EntryKind::Charge, account, run, op: Some(op), amount, reason });
        Ok(remaining - amount)
    }

    /// Settles (`post`) or releases the hold.
    fn close(&mut self, now: u64, hold_id: &str, post: bool, reason: Arc<str>) -> Result<Settlement, LedgerError> {
        let hold = self.holds.get_mut(hold_id).ok_or_else(|| LedgerError::UnknownHold(hold_id.into()))?;
        if let Some(closed) = hold.outcome {
            return match (closed, post) {
                (Closed::Settled(s), true) | (Closed::Released(s), false) => Ok(s),
                _ => Err(LedgerError::HoldClosed(hold_id.into())),
            };
        }
        let account = self.accounts.get_mut(&hold.account).ok_or_else(|| {
            LedgerError::Backend(format!("hold '{hold_id}' names account '{}', which does not exist", hold.account))
        })?;
        let posted = if post { hold.charged } else { 0 };
        let settlement = Settlement { posted, released: hold.amount - posted };
        hold.outcome = Some(if post { Closed::Settled(settlement) } else { Closed::Released(settlement) });
        self.open.remove(&(hold.expires_ms, Arc::clone(&hold.id)));
        account.credits.held -= hold.amount;
        account.credits.balance -= posted;
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
        let entry = |kind, amount| Record {
            time_ms: now,
            kind,
            account: Arc::clone(&hold.account),
            run: Some(Arc::clone(&hold.id)),
            op: None,
            amount,
            reason: Arc::clone(&reason),
        };
        if post {
            self.journal.push(entry(EntryKind::Post, posted));
        }
        if settlement.released > 0 {
            self.journal.push(entry(EntryKind::Release, settlement.released));
        }
        Ok(settlement)
    }

    fn recover(&mut self, now: u64, policy: FailurePolicy) -> Result<Recovery, LedgerError> {
        let mut expired: Vec<Arc<str>> =
            self.open.range(..(now.saturating_add(1), Arc::from(""))).map(|(_, id)| Arc::clone(id)).collect();
        // In id order, as the SQLite ledger does: the same journal for the same operations.
        expired.sort_unstable();
        let mut recovery = Recovery::default();
        for id in expired {
            let reason = Arc::clone(&self.own_reasons.expired);
            let settlement = self.close(now, &id, policy == FailurePolicy::PostCharged, reason)?;
            recovery.holds += 1;
            recovery.posted += settlement.posted;
            recovery.released += settlement.released;
        }
        Ok(recovery)
    }

    fn balance(&self, account: &str) -> Result<Balance, LedgerError> {
        self.accounts.get(account).map(|a| a.credits).ok_or_else(|| LedgerError::UnknownAccount(account.into()))
    }

    fn history(&self, account: &str, query: &HistoryQuery) -> Vec<Entry> {
        let after = usize::try_from(query.after).unwrap_or(usize::MAX);
        self.journal
            .after(after)
            .filter(|(_, r)| &*r.account == account && query.run.as_deref().is_none_or(|run| r.run.as_deref() == Some(run)))
            .take(query.limit)
            .map(|(id, r)| Entry {
                id,
                time_ms: r.time_ms,
                account: r.account.to_string(),
                run: r.run.as_deref().map(str::to_string),
                op: r.op.as_deref().map(str::to_string),
                step: entry_step(r.kind, r.op.as_deref()).map(str::to_string),
                kind: r.kind,
                amount: r.amount,
                reason: r.reason.to_string(),
            })
            .collect()
    }

    fn verify(&self) -> Audit {
        let mut fold = Fold::default();
        for (id, r) in self.journal.after(0) {
            fold.apply(id, r.kind, &r.account, r.run.as_deref(), r.amount);
        }
        let accounts = self.accounts.values().map(|a| (&*a.id, a.credits));
        let holds = self.holds.values().map(|h| {
            let state = match h.outcome {
                None => HoldState::Open,
                Some(Closed::Settled(s)) => HoldState::Settled { posted: s.posted },
                Some(Closed::Released(_)) => HoldState::Released,
            };
            (&*h.id, HoldRow { account: &h.account, amount: h.amount, charged: Some(h.charged), state })
        });
        fold.finish(accounts, holds, &self.totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_journal_numbers_its_records_across_chunks() {
        let (account, reason): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("r"));
        let mut journal = Journal::default();
        let total = 2 * JOURNAL_CHUNK + 3;
        for amount in 1..=total as u64 {
            let (account, reason) = (Arc::clone(&account), Arc::clone(&reason));
            journal.push(Record { time_ms: 0, kind: EntryKind::Grant, account, run: None, op: None, amount, reason });
        }
        assert_eq!(journal.chunks.len(), 3);
        // A record's id is its position from 1, and here also its amount.
        assert!(journal.after(0).all(|(id, r)| id == r.amount));
        assert_eq!(journal.after(0).count(), total);
        for skip in [1, JOURNAL_CHUNK - 1, JOURNAL_CHUNK, JOURNAL_CHUNK + 1, 2 * JOURNAL_CHUNK + 2] {
            let ids: Vec<u64> = journal.after(skip).map(|(id, _)| id).collect();
            assert_eq!(ids, (skip as u64 + 1..=total as u64).collect::<Vec<_>>(), "after {skip}");
        }
        assert_eq!(journal.after(total).count(), 0);
        assert_eq!(journal.after(usize::MAX).count(), 0);
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
                    let closed = book.lock().unwrap().close(0, "run", post, "end".into());
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
            let hold = &book.holds["run"];
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
