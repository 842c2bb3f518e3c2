//! The journal: one entry per change, appended and never altered. Balances and holds are its
//! fold; [`Fold`] recomputes them from the entries, checking every invariant on the way, and
//! compares the result with what a backend keeps.

use std::collections::HashMap;
use std::fmt;

use super::{Balance, LedgerError, LedgerTotals, Settlement};

/// What an entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// `amount` credits added to the account's balance; `op` is the grant's id.
    Grant,
    /// `amount` of the account's available credits reserved by the run's hold.
    Hold,
    /// `amount` charged against the run's hold; `op` is the charge's id. Balances move only when
    /// the hold is settled.
    Charge,
    /// The hold was settled: `amount` (all that was charged, possibly 0) left the balance for good.
    Post,
    /// `amount` of the hold, what was not posted, returned to the available credits.
    Release,
}

impl EntryKind {
    /// The kind's name in the journal and in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Hold => "hold",
            EntryKind::Charge => "charge",
            EntryKind::Post => "post",
            EntryKind::Release => "release",
        }
    }

    /// The kind named `text`.
    pub fn parse(text: &str) -> Option<EntryKind> {
        [EntryKind::Grant, EntryKind::Hold, EntryKind::Charge, EntryKind::Post, EntryKind::Release]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change to the ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Entry {
    /// Position in the journal: increasing, from 1.
    pub id: u64,
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The account it changed.
    pub account: String,
    /// The hold it is about, named by its run's id (none for grants).
    pub run: Option<String>,
    /// The operation's id: a grant's key, or a charge's id (`STEP#N` for a step's charges).
    pub op: Option<String>,
    /// The step that made the charge (charges named `STEP#N` only).
    pub step: Option<String>,
    /// What it did.
    pub kind: EntryKind,
    /// Credits it moved.
    pub amount: u64,
    /// Why: the charge's reason as the plugin gave it, or what the ledger did.
    pub reason: String,
}

/// The op id of a step's `n`th charge in its run: `STEP#N`. The journal records `STEP` as the
/// charge's step; step ids hold no `#` (the configuration refuses them).
pub fn charge_id(step: &str, n: u64) -> String {
    format!("{step}#{n}")
}

/// The step a charge's op id names: `STEP` of `STEP#N`, or `None` for an op id of another form.
fn step_of(op_id: &str) -> Option<&str> {
    let (step, n) = op_id.split_once('#')?;
    (!step.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(step)
}

/// The step an entry records, the same in every backend: a charge's, from its op id `STEP#N`;
/// none for other kinds of entry.
pub(super) fn entry_step(kind: EntryKind, op: Option<&str>) -> Option<&str> {
    op.filter(|_| kind == EntryKind::Charge).and_then(step_of)
}

/// Which of an account's entries [`super::Ledger::history`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only the entries of this run's hold.
    pub run: Option<String>,
    /// Only entries with a greater id: the last id of the previous page, 0 for the first.
    pub after: u64,
    /// At most this many entries.
    pub limit: usize,
}

impl Default for HistoryQuery {
    fn default() -> Self {
        HistoryQuery { run: None, after: 0, limit: 100 }
    }
}

/// The result of re-folding the journal ([`super::Ledger::verify`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Audit {
    /// Journal entries folded.
    pub entries: u64,
    /// Accounts.
    pub accounts: u64,
    /// Holds ever reserved.
    pub holds: u64,
    /// Holds still open.
    pub open_holds: u64,
    /// Sum of every grant.
    pub granted: u64,
    /// Sum of every balance the ledger keeps.
    pub balances: u64,
    /// Sum of every account's held credits, as the ledger keeps them.
    pub held: u64,
    /// Sum of every posted charge.
    pub posted: u64,
    /// Every invariant that failed, in words; empty when the ledger is sound.
    pub problems: Vec<String>,
}

impl Audit {
    /// Whether every invariant holds.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The checks every backend makes before charging `amount` against a hold that exists and has
/// no prior charge with this op id; returns what remains of the hold before the charge.
pub(super) fn check_charge(
    hold_id: &str,
    open: bool,
    now: u64,
    expires_ms: u64,
    amount: u64,
    hold_amount: u64,
    charged: u64,
) -> Result<u64, LedgerError> {
    if !open {
        return Err(LedgerError::HoldClosed(hold_id.into()));
    }
    if now >= expires_ms {
        return Err(LedgerError::HoldExpired(hold_id.into()));
    }
    if amount == 0 {
        return Err(LedgerError::InvalidAmount(amount));
    }
    let remaining = hold_amount - charged;
    if amount > remaining {
        return Err(LedgerError::ExceedsHold { amount, remaining });
    }
    Ok(remaining)
}

/// The checks every backend that keeps a hold's state makes before closing it (settling it when
/// `post`, releasing it otherwise): `None` for an open hold, to be closed now; the first outcome
/// for a repeat of the same close; an error for the other close of a closed hold.
pub(super) fn check_close(
    hold_id: &str,
    state: HoldState,
    post: bool,
    hold_amount: u64,
) -> Result<Option<Settlement>, LedgerError> {
    match (state, post) {
        (HoldState::Open, _) => Ok(None),
        (HoldState::Settled { posted }, true) => Ok(Some(Settlement { posted, released: hold_amount - posted })),
        (HoldState::Released, false) => Ok(Some(Settlement { posted: 0, released: hold_amount })),
        _ => Err(LedgerError::HoldClosed(hold_id.into())),
    }
}

/// How a hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HoldState {
    /// Charges may still come.
    Open,
    /// Settled, posting `posted`.
    Settled {
        /// What the settlement posted.
        posted: u64,
    },
    /// Released, posting nothing.
    Released,
}

/// A hold as a backend keeps it, to compare with the fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HoldRow<'a> {
    pub(super) account: &'a str,
    pub(super) amount: u64,
    /// What the backend keeps as charged; `None` where it keeps no running total (an open hold
    /// in the SQLite ledger, whose charges are only in the journal).
    pub(super) charged: Option<u64>,
    pub(super) state: HoldState,
}

/// Problems an audit lists in full; beyond, it counts them.
const MAX_PROBLEMS: usize = 50;

/// The journal folded so far.
#[derive(Debug, Default)]
pub(super) struct Fold {
    accounts: HashMap<String, Balance>,
    holds: HashMap<String, FoldedHold>,
    last_id: u64,
    audit: Audit,
    more_problems: u64,
}

#[derive(Debug)]
struct FoldedHold {
    account: String,
    amount: u64,
    charged: u64,
    posted: Option<u64>,
    released: Option<u64>,
}

impl FoldedHold {
    fn state(&self) -> HoldState {
        match (self.posted, self.released) {
            (Some(posted), _) => HoldState::Settled { posted },
            (None, Some(_)) => HoldState::Released,
            (None, None) => HoldState::Open,
        }
    }

    fn is_open(&self) -> bool {
        self.posted.is_none() && self.released.is_none()
    }
}

impl Fold {
    fn problem(&mut self, message: String) {
        if self.audit.problems.len() < MAX_PROBLEMS {
            self.audit.problems.push(message);
        } else {
            self.more_problems += 1;
        }
    }

    /// Applies the next entry, checking it against everything before it. An entry that breaks
    /// an invariant is reported and not applied.
    pub(super) fn apply(&mut self, id: u64, kind: EntryKind, account: &str, run: Option<&str>, amount: u64) {
        self.audit.entries += 1;
        if id <= self.last_id {
            self.problem(format!("entry {id} comes after entry {}: journal ids must increase", self.last_id));
        }
        self.last_id = self.last_id.max(id);
        if let Err(message) = self.try_apply(kind, account, run, amount) {
            self.problem(format!("entry {id} ({kind} of {amount} on account '{account}'): {message}"));
            return;
        }
        if let Some(balance) = self.accounts.get(account)
            && balance.held > balance.balance
        {
            let message =
                format!("after entry {id}, account '{account}' holds {} of its {} credits", balance.held, balance.balance);
            self.problem(message);
        }
    }

    fn try_apply(&mut self, kind: EntryKind, account: &str, run: Option<&str>, amount: u64) -> Result<(), String> {
        if amount == 0 && kind != EntryKind::Post {
            return Err("moves no credits".into());
        }
        if kind == EntryKind::Grant {
            let balance = self.accounts.entry(account.to_string()).or_default();
            balance.balance = balance.balance.checked_add(amount).ok_or("the balance overflows")?;
            self.audit.granted = self.audit.granted.checked_add(amount).ok_or("the sum of grants overflows")?;
            return Ok(());
        }
        let run = run.ok_or("names no run")?;
        let balance = self.accounts.get_mut(account).ok_or("the account was never granted credits")?;
        if kind == EntryKind::Hold {
            if self.holds.contains_key(run) {
                return Err(format!("run '{run}' already has a hold"));
            }
            if balance.available() < amount {
                return Err(format!("only {} credits were available", balance.available()));
            }
            balance.held += amount;
            let hold = FoldedHold { account: account.to_string(), amount, charged: 0, posted: None, released: None };
            self.holds.insert(run.to_string(), hold);
            return Ok(());
        }
        let hold = self.holds.get_mut(run).ok_or_else(|| format!("run '{run}' has no hold"))?;
        if hold.account != account {
            return Err(format!("the hold of run '{run}' belongs to account '{}'", hold.account));
        }
        match kind {
            EntryKind::Charge => {
                if !hold.is_open() {
                    return Err(format!("the hold of run '{run}' was already closed"));
                }
                if hold.charged + amount > hold.amount {
                    return Err(format!(
                        "the hold of run '{run}' had only {} of {} left",
                        hold.amount - hold.charged,
                        hold.amount
                    ));
                }
                hold.charged += amount;
            }
            EntryKind::Post => {
                if !hold.is_open() {
                    return Err(format!("the hold of run '{run}' was already closed"));
                }
                if amount != hold.charged {
                    return Err(format!("the hold of run '{run}' was charged {}, not what it posts", hold.charged));
                }
                balance.balance -= amount;
                balance.held -= amount;
                hold.posted = Some(amount);
                self.audit.posted += amount;
            }
            EntryKind::Release => {
                if hold.released.is_some() {
                    return Err(format!("the hold of run '{run}' was already released"));
                }
                let rest = hold.amount - hold.posted.unwrap_or(0);
                if amount != rest {
                    return Err(format!("the hold of run '{run}' had {rest} credits to release"));
                }
                balance.held -= amount;
                hold.released = Some(amount);
            }
            EntryKind::Grant | EntryKind::Hold => unreachable!("handled above"),
        }
        Ok(())
    }

    /// Ends the fold: checks what it computed against the backend's `accounts`, `holds` and
    /// `totals`.
    pub(super) fn finish<'a>(
        mut self,
        accounts: impl IntoIterator<Item = (&'a str, Balance)>,
        holds: impl IntoIterator<Item = (&'a str, HoldRow<'a>)>,
        totals: &LedgerTotals,
    ) -> Audit {
        let mut open_held: HashMap<&str, u64> = HashMap::new();
        let mut problems = Vec::new();
        for (run, hold) in &self.holds {
            if hold.is_open() {
                *open_held.entry(hold.account.as_str()).or_default() += hold.amount;
            } else if hold.posted.is_some_and(|posted| posted < hold.amount) && hold.released.is_none() {
                problems.push(format!("the hold of run '{run}' was settled but the rest was never released"));
            }
        }
        for (id, balance) in &self.accounts {
            let open = open_held.get(id.as_str()).copied().unwrap_or(0);
            if balance.held != open {
                problems.push(format!("account '{id}' holds {} but its open holds add up to {open}", balance.held));
            }
        }
        let (mut seen, mut balances, mut held) = (0, 0u64, 0u64);
        for (id, kept) in accounts {
            seen += 1;
            balances = balances.saturating_add(kept.balance);
            held = held.saturating_add(kept.held);
            match self.accounts.get(id) {
                Some(folded) if *folded == kept => {}
                Some(folded) => problems.push(format!(
                    "account '{id}' has balance {} and held {}, but its journal adds up to balance {} and held {}",
                    kept.balance, kept.held, folded.balance, folded.held
                )),
                None => problems.push(format!("account '{id}' has no journal entry")),
            }
        }
        if seen != self.accounts.len() {
            problems.push(format!("the journal names {} accounts, the ledger keeps {seen}", self.accounts.len()));
        }
        let mut seen = 0;
        for (run, kept) in holds {
            seen += 1;
            match self.holds.get(run) {
                Some(folded) => {
                    let folded_row = HoldRow {
                        account: &folded.account,
                        amount: folded.amount,
                        charged: kept.charged.and(Some(folded.charged)),
                        state: folded.state(),
                    };
                    if folded_row != kept {
                        problems
                            .push(format!("the hold of run '{run}' is kept as {kept:?}, but its journal says {folded_row:?}"));
                    }
                }
                None => problems.push(format!("the hold of run '{run}' has no journal entry")),
            }
        }
        if seen != self.holds.len() {
            problems.push(format!("the journal names {} holds, the ledger keeps {seen}", self.holds.len()));
        }
        let count = |state: fn(&HoldState) -> bool| self.holds.values().filter(|h| state(&h.state())).count() as u64;
        let folded = LedgerTotals {
            granted: self.audit.granted,
            balances,
            held,
            posted: self.audit.posted,
            open_holds: count(|s| *s == HoldState::Open),
            settled_holds: count(|s| matches!(s, HoldState::Settled { .. })),
            released_holds: count(|s| *s == HoldState::Released),
        };
        if folded != *totals {
            problems.push(format!("the ledger's totals are {totals:?}, but its journal and accounts add up to {folded:?}"));
        }
        for problem in problems {
            self.problem(problem);
        }

        let audit = &mut self.audit;
        audit.accounts = self.accounts.len() as u64;
        audit.holds = self.holds.len() as u64;
        audit.open_holds = self.holds.values().filter(|h| h.is_open()).count() as u64;
        audit.balances = balances;
        audit.held = held;
        if u128::from(audit.balances) + u128::from(audit.posted) != u128::from(audit.granted) {
            let message =
                format!("conservation fails: balances {} + posted {} != granted {}", audit.balances, audit.posted, audit.granted);
            self.problem(message);
        }
        if self.more_problems > 0 {
            let more = self.more_problems;
            self.audit.problems.push(format!("... and {more} more problems"));
        }
        self.audit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(account: &str, amount: u64, charged: u64, state: HoldState) -> HoldRow<'_> {
        HoldRow { account, amount, charged: Some(charged), state }
    }

    #[test]
    fn a_charge_id_names_its_step() {
        assert_eq!(charge_id("text", 3), "text#3");
        assert_eq!(step_of(&charge_id("image-2", 12)), Some("image-2"));
        for other in ["plain", "#3", "text#", "text#x", "text#3a"] {
            assert_eq!(step_of(other), None, "{other}");
        }
        assert_eq!(entry_step(EntryKind::Charge, Some("text#3")), Some("text"));
        assert_eq!(entry_step(EntryKind::Grant, Some("text#3")), None, "only charges record a step");
    }

    #[test]
    fn a_hold_kept_without_its_charged_total_is_checked_on_the_rest() {
        let audit = |kept: HoldRow<'static>| {
            let mut fold = Fold::default();
            fold.apply(1, EntryKind::Grant, "a", None, 100);
            fold.apply(2, EntryKind::Hold, "a", Some("r1"), 40);
            fold.apply(3, EntryKind::Charge, "a", Some("r1"), 15);
            let totals = LedgerTotals { granted: 100, balances: 100, held: 40, open_holds: 1, ..LedgerTotals::default() };
            fold.finish([("a", Balance { balance: 100, held: 40 })], [("r1", kept)], &totals)
        };
        let open = HoldRow { account: "a", amount: 40, charged: None, state: HoldState::Open };
        assert!(audit(open).is_ok(), "{:?}", audit(open).problems);
        assert!(!audit(HoldRow { amount: 41, ..open }).is_ok());
        assert!(!audit(HoldRow { charged: Some(14), ..open }).is_ok(), "a total kept is compared");
    }

    #[test]
    fn a_sound_journal_folds_to_its_balances() {
        let mut fold = Fold::default();
        fold.apply(1, EntryKind::Grant, "a", None, 100);
        fold.apply(2, EntryKind::Hold, "a", Some("r1"), 40);
        fold.apply(3, EntryKind::Charge, "a", Some("r1"), 15);
        fold.apply(4, EntryKind::Post, "a", Some("r1"), 15);
        fold.apply(5, EntryKind::Release, "a", Some("r1"), 25);
        fold.apply(6, EntryKind::Hold, "a", Some("r2"), 10);
        let audit = fold.finish(
            [("a", Balance { balance: 85, held: 10 })],
            [("r1", row("a", 40, 15, HoldState::Settled { posted: 15 })), ("r2", row("a", 10, 0, HoldState::Open))],
            &LedgerTotals {
                granted: 100,
                balances: 85,
                held: 10,
                posted: 15,
                open_holds: 1,
                settled_holds: 1,
                released_holds: 0,
            },
        );
        assert!(audit.is_ok(), "{:?}", audit.problems);
        assert_eq!((audit.granted, audit.balances, audit.posted, audit.open_holds), (100, 85, 15, 1));
    }

    #[test]
    fn every_broken_invariant_is_reported() {
        let mut fold = Fold::default();
        fold.apply(1, EntryKind::Grant, "a", None, 10);
        fold.apply(2, EntryKind::Hold, "a", Some("r1"), 20);
        fold.apply(3, EntryKind::Hold, "a", Some("r2"), 10);
        fold.apply(4, EntryKind::Charge, "a", Some("r2"), 11);
        fold.apply(4, EntryKind::Release, "a", Some("r2"), 10);
        fold.apply(6, EntryKind::Release, "a", Some("r2"), 10);
        let kept = LedgerTotals { granted: 10, balances: 9, ..LedgerTotals::default() };
        let audit = fold.finish([("a", Balance { balance: 9, held: 0 })], [("r2", row("a", 10, 0, HoldState::Open))], &kept);
        let problems = audit.problems.join("\n");
        for expected in [
            "entry 2 (hold of 20 on account 'a'): only 10 credits were available",
            "entry 4 (charge of 11 on account 'a'): the hold of run 'r2' had only 10 of 10 left",
            "entry 4 comes after entry 4",
            "entry 6 (release of 10 on account 'a'): the hold of run 'r2' was already released",
            "account 'a' has balance 9 and held 0, but its journal adds up to balance 10 and held 0",
            "the hold of run 'r2' is kept as",
            "conservation fails: balances 9 + posted 0 != granted 10",
            "the ledger's totals are",
        ] {
            assert!(problems.contains(expected), "missing '{expected}' in:\n{problems}");
        }
    }
}
