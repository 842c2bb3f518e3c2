//! Model-based test of the three ledger backends: random sequences of grant, reserve, charge,
//! settle, release and recovery, with repeated and conflicting ids, expired holds and bad
//! amounts, each checked after every step against a plain reference model: the outcome, every
//! balance, the totals and a full audit; and at the end, every account's journal, page by page.
//! PostgreSQL is a real server (see `common/postgres.rs`), a fresh database per case.

use std::collections::BTreeMap;
use std::time::Duration;

use genpipe::config::FailurePolicy;
use genpipe::state::ledger::{
    Balance, EntryKind, HistoryQuery, Ledger, LedgerError, LedgerTotals, MAX_CREDITS, MemoryLedger, PostgresLedger,
    PostgresOptions, Recovery, Settlement, SqliteLedger, SqliteOptions,
};
use proptest::prelude::*;

#[path = "common/postgres.rs"]
mod postgres;

const ACCOUNTS: [&str; 3] = ["ann", "bob", "cat"];
const LIVE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
enum Op {
    Grant { key: u8, account: usize, amount: u64 },
    Reserve { hold: u8, account: usize, amount: u64, expired: bool },
    Charge { hold: u8, op: u8, amount: u64, reason: u8 },
    Settle { hold: u8 },
    Release { hold: u8 },
    Recover { post_charged: bool },
}

fn op() -> impl Strategy<Value = Op> {
    let amount = |max: u64| prop_oneof![8 => 0..=max, 1 => Just(MAX_CREDITS), 1 => Just(u64::MAX)];
    prop_oneof![
        2 => (0..4u8, 0..3usize, amount(60)).prop_map(|(key, account, amount)| Op::Grant { key, account, amount }),
        3 => (0..6u8, 0..3usize, amount(50), prop::bool::weighted(0.15))
            .prop_map(|(hold, account, amount, expired)| Op::Reserve { hold, account, amount, expired }),
        5 => (0..6u8, 0..4u8, amount(25), 0..2u8).prop_map(|(hold, op, amount, reason)| Op::Charge { hold, op, amount, reason }),
        2 => (0..6u8).prop_map(|hold| Op::Settle { hold }),
        2 => (0..6u8).prop_map(|hold| Op::Release { hold }),
        1 => any::<bool>().prop_map(|post_charged| Op::Recover { post_charged }),
    ]
}

/// The outcome of one operation, comparable across the model and a backend.
#[derive(Debug, PartialEq)]
enum Outcome {
    Granted(Result<Balance, LedgerError>),
    Reserved(Result<(), LedgerError>),
    Charged(Result<u64, LedgerError>),
    Closed(Result<Settlement, LedgerError>),
    Recovered(Result<Recovery, LedgerError>),
}

#[derive(Debug)]
struct ModelHold {
    account: String,
    amount: u64,
    ttl: Duration,
    charged: u64,
    /// Charges by op id: amount, reason, what remained after.
    ops: BTreeMap<String, (u64, String, u64)>,
    /// Settled (true) or released, and how.
    closed: Option<(bool, Settlement)>,
}

/// The journal as the model sees it: kind, account, run, op, amount.
type ModelEntry = (EntryKind, String, Option<String>, Option<String>, u64);

/// The reference: plain maps, one obvious step at a time.
#[derive(Debug, Default)]
struct Model {
    accounts: BTreeMap<String, Balance>,
    grants: BTreeMap<String, (String, u64, Balance)>,
    holds: BTreeMap<String, ModelHold>,
    journal: Vec<ModelEntry>,
    totals: LedgerTotals,
}

impl Model {
    fn grant(&mut self, key: &str, account: &str, amount: u64) -> Result<Balance, LedgerError> {
        if let Some((to, granted, after)) = self.grants.get(key) {
            return if (to.as_str(), *granted) == (account, amount) {
                Ok(*after)
            } else {
                Err(LedgerError::Conflict(key.into()))
            };
        }
        if amount == 0 || u128::from(self.totals.granted) + u128::from(amount) > u128::from(MAX_CREDITS) {
            return Err(LedgerError::InvalidAmount(amount));
        }
        let balance = self.accounts.entry(account.into()).or_default();
        balance.balance += amount;
        let after = *balance;
        self.grants.insert(key.into(), (account.into(), amount, after));
        self.totals.granted += amount;
        self.totals.balances += amount;
        self.journal.push((EntryKind::Grant, account.into(), None, Some(key.into()), amount));
        Ok(after)
    }

    fn reserve(&mut self, hold: &str, account: &str, amount: u64, ttl: Duration) -> Result<(), LedgerError> {
        if let Some(h) = self.holds.get(hold) {
            return if (h.account.as_str(), h.amount, h.ttl) == (account, amount, ttl) {
                Ok(())
            } else {
                Err(LedgerError::Conflict(hold.into()))
            };
        }
        if amount == 0 {
            return Err(LedgerError::InvalidAmount(0));
        }
        let balance = self.accounts.get_mut(account).ok_or_else(|| LedgerError::UnknownAccount(account.into()))?;
        let available = balance.balance - balance.held;
        if available < amount {
            return Err(LedgerError::Insufficient { needed: amount, available });
        }
        balance.held += amount;
        self.totals.held += amount;
        self.totals.open_holds += 1;
        let h = ModelHold { account: account.into(), amount, ttl, charged: 0, ops: BTreeMap::new(), closed: None };
        self.holds.insert(hold.into(), h);
        self.journal.push((EntryKind::Hold, account.into(), Some(hold.into()), None, amount));
        Ok(())
    }

    fn charge(&mut self, hold: &str, op: &str, amount: u64, reason: &str) -> Result<u64, LedgerError> {
        let h = self.holds.get_mut(hold).ok_or_else(|| LedgerError::UnknownHold(hold.into()))?;
        if let Some((charged, charged_for, remaining)) = h.ops.get(op) {
            return if (*charged, charged_for.as_str()) == (amount, reason) {
                Ok(*remaining)
            } else {
                Err(LedgerError::Conflict(op.into()))
            };
        }
        if h.closed.is_some() {
            return Err(LedgerError::HoldClosed(hold.into()));
        }
        if h.ttl.is_zero() {
            return Err(LedgerError::HoldExpired(hold.into()));
        }
        if amount == 0 {
            return Err(LedgerError::InvalidAmount(0));
        }
        let remaining = h.amount - h.charged;
        if amount > remaining {
            return Err(LedgerError::ExceedsHold { amount, remaining });
        }
        h.charged += amount;
        h.ops.insert(op.into(), (amount, reason.into(), remaining - amount));
        self.journal.push((EntryKind::Charge, h.account.clone(), Some(hold.into()), Some(op.into()), amount));
        Ok(remaining - amount)
    }

    fn close(&mut self, hold: &str, post: bool) -> Result<Settlement, LedgerError> {
        let h = self.holds.get_mut(hold).ok_or_else(|| LedgerError::UnknownHold(hold.into()))?;
        if let Some((settled, settlement)) = h.closed {
            return if settled == post { Ok(settlement) } else { Err(LedgerError::HoldClosed(hold.into())) };
        }
        let posted = if post { h.charged } else { 0 };
        let settlement = Settlement { posted, released: h.amount - posted };
        h.closed = Some((post, settlement));
        let balance = self.accounts.get_mut(&h.account).expect("a hold's account exists");
        balance.held -= h.amount;
        balance.balance -= posted;
        let totals = &mut self.totals;
        totals.held -= h.amount;
        totals.balances -= posted;
        totals.posted += posted;
        totals.open_holds -= 1;
        if post {
            totals.settled_holds += 1;
            self.journal.push((EntryKind::Post, h.account.clone(), Some(hold.into()), None, posted));
        } else {
            totals.released_holds += 1;
        }
        if settlement.released > 0 {
            self.journal.push((EntryKind::Release, h.account.clone(), Some(hold.into()), None, settlement.released));
        }
        Ok(settlement)
    }

    /// Resolves the open expired holds, in id order.
    fn recover(&mut self, post_charged: bool) -> Result<Recovery, LedgerError> {
        let expired: Vec<String> =
            self.holds.iter().filter(|(_, h)| h.closed.is_none() && h.ttl.is_zero()).map(|(id, _)| id.clone()).collect();
        let mut recovery = Recovery::default();
        for id in expired {
            let settlement = self.close(&id, post_charged)?;
            recovery.holds += 1;
            recovery.posted += settlement.posted;
            recovery.released += settlement.released;
        }
        Ok(recovery)
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        match *op {
            Op::Grant { key, account, amount } => Outcome::Granted(self.grant(&format!("g{key}"), ACCOUNTS[account], amount)),
            Op::Reserve { hold, account, amount, expired } => {
                Outcome::Reserved(self.reserve(&format!("h{hold}"), ACCOUNTS[account], amount, ttl(expired)))
            }
            Op::Charge { hold, op, amount, reason } => {
                Outcome::Charged(self.charge(&format!("h{hold}"), &format!("s#{op}"), amount, REASONS[reason as usize]))
            }
            Op::Settle { hold } => Outcome::Closed(self.close(&format!("h{hold}"), true)),
            Op::Release { hold } => Outcome::Closed(self.close(&format!("h{hold}"), false)),
            Op::Recover { post_charged } => Outcome::Recovered(self.recover(post_charged)),
        }
    }
}

const REASONS: [&str; 2] = ["token", "image"];

fn ttl(expired: bool) -> Duration {
    if expired { Duration::ZERO } else { LIVE }
}

fn policy(post_charged: bool) -> FailurePolicy {
    if post_charged { FailurePolicy::PostCharged } else { FailurePolicy::Release }
}

async fn apply(ledger: &dyn Ledger, op: &Op) -> Outcome {
    match *op {
        Op::Grant { key, account, amount } => Outcome::Granted(ledger.grant(&format!("g{key}"), ACCOUNTS[account], amount).await),
        Op::Reserve { hold, account, amount, expired } => {
            Outcome::Reserved(ledger.reserve(&format!("h{hold}"), ACCOUNTS[account], amount, ttl(expired)).await)
        }
        Op::Charge { hold, op, amount, reason } => {
            Outcome::Charged(ledger.charge(&format!("h{hold}"), &format!("s#{op}"), amount, REASONS[reason as usize]).await)
        }
        Op::Settle { hold } => Outcome::Closed(ledger.settle(&format!("h{hold}")).await),
        Op::Release { hold } => Outcome::Closed(ledger.release(&format!("h{hold}")).await),
        Op::Recover { post_charged } => Outcome::Recovered(ledger.recover(policy(post_charged)).await),
    }
}

/// Runs `ops` on `ledger` and on the model, comparing after every step.
async fn check(ledger: &dyn Ledger, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        let expected = model.apply(op);
        let got = apply(ledger, op).await;
        prop_assert_eq!(&got, &expected, "step {}: {:?}", step, op);
        for account in ACCOUNTS {
            let expected = model.accounts.get(account).copied().ok_or_else(|| LedgerError::UnknownAccount(account.into()));
            prop_assert_eq!(ledger.balance(account).await, expected, "step {}: balance of {}", step, account);
        }
        prop_assert_eq!(ledger.totals().await, Ok(model.totals), "step {}: totals", step);
        let audit = ledger.verify().await.unwrap();
        prop_assert!(audit.is_ok(), "step {}: {:?}", step, audit.problems);
        prop_assert_eq!(audit.entries, model.journal.len() as u64);
    }
    for account in ACCOUNTS {
        let expected: Vec<_> = model.journal.iter().filter(|e| e.1 == account).cloned().collect();
        let mut got = Vec::new();
        let mut query = HistoryQuery { run: None, after: 0, limit: 3 };
        loop {
            let page = ledger.history(account, &query).await.unwrap();
            let Some(last) = page.last() else { break };
            query.after = last.id;
            for e in &page {
                // Every charge here is named `s#N`: the journal records its step, `s`.
                let step = if e.kind == EntryKind::Charge { Some("s") } else { None };
                prop_assert_eq!(e.step.as_deref(), step, "entry {} of {}", e.id, account);
            }
            got.extend(page.into_iter().map(|e| (e.kind, e.account, e.run, e.op, e.amount)));
        }
        prop_assert_eq!(&got, &expected, "journal of {}", account);
        let run = model.holds.iter().find(|(_, h)| h.account == account).map(|(id, _)| id.clone());
        if let Some(run) = run {
            let query = HistoryQuery { run: Some(run.clone()), after: 0, limit: 1000 };
            let got: Vec<_> = ledger.history(account, &query).await.unwrap().into_iter().map(|e| (e.kind, e.amount)).collect();
            let expected: Vec<_> = expected.iter().filter(|e| e.2.as_deref() == Some(&run)).map(|e| (e.0, e.4)).collect();
            prop_assert_eq!(got, expected, "journal of run {}", run);
        }
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn memory_ledger_follows_the_model(ops in prop::collection::vec(op(), 1..60)) {
        runtime().block_on(check(&MemoryLedger::new(), &ops))?;
    }
}

proptest! {
    // Every acknowledged write is an fsync'd commit: fewer, shorter cases.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_ledger_follows_the_model(ops in prop::collection::vec(op(), 1..40)) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let ledger = SqliteLedger::open(dir.path().join("ledger.db"), SqliteOptions::default()).await.unwrap();
            check(&ledger, &ops).await
        })?;
    }
}

proptest! {
    // A database per case, and every batch a durable commit: fewer cases.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn postgres_ledger_follows_the_model(ops in prop::collection::vec(op(), 1..40)) {
        runtime().block_on(async {
            let database = postgres::TestDatabase::create().await;
            let ledger = PostgresLedger::open(&database.url, PostgresOptions::default()).await.unwrap();
            check(&ledger, &ops).await
        })?;
    }
}
