//! What the writer knows of the rows it reads most: open holds and account balances, so that an
//! operation need not read back what the writer itself wrote.
//!
//! Rules, which keep every row known equal to the database's:
//! - an operation tells what it changed only once all its statements succeeded;
//! - the writer forgets everything when a batch fails (its rollback undoes changes told here),
//!   and when another connection committed since its last batch (`PRAGMA data_version`), which
//!   it checks once it holds the write lock, before the batch's first operation;
//! - only open holds are kept; a hold is forgotten when it closes;
//! - a hold reserved by this writer also has the op ids of its charges, complete (so that a new
//!   charge need not look for an earlier one with its id) up to [`MOST_CHARGES`] of them;
//! - each map is cleared when it would pass [`MOST_KNOWN`] rows;
//! - what reservations and settlements change in `accounts` and `totals` is kept as pending
//!   deltas and written once per account and once for the totals when the batch commits
//!   ([`Known::take_pending`]): with one hot account, one statement instead of one per
//!   operation. Reads of those rows within the batch add the pending deltas.

// Hashed with foldhash, as the memory ledger: hold, op and account ids are the host's or its
// operators', not a client's choice.
use foldhash::{HashMap, HashSet};

use super::ops::stored;
use crate::state::ledger::Balance;

/// The most holds, and the most accounts, known at once.
const MOST_KNOWN: usize = 65_536;

/// The most op ids of charges known for one hold.
const MOST_CHARGES: usize = 256;

/// An open hold's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OpenHold {
    pub(super) account: String,
    pub(super) amount: u64,
    pub(super) charged: u64,
    pub(super) ttl_ms: u64,
    pub(super) expires_ms: u64,
    /// The op ids of every charge on the hold, when known to be complete.
    pub(super) charge_ops: Option<HashSet<String>>,
}

/// Rows the writer knows (see the module's rules).
#[derive(Debug, Default)]
pub(super) struct Known {
    holds: HashMap<String, OpenHold>,
    accounts: HashMap<String, Balance>,
    /// `PRAGMA data_version` at the writer's last batch.
    data_version: Option<i64>,
    /// Changes to accounts not written yet: (balance, held) deltas.
    pending_accounts: HashMap<String, (i64, i64)>,
    /// Changes to the totals not written yet: (posted, settled, released) deltas.
    pending_totals: (i64, i64, i64),
}

/// The deltas a batch has to write before it commits.
pub(super) struct Pending {
    pub(super) accounts: Vec<(String, i64, i64)>,
    pub(super) totals: (i64, i64, i64),
}

impl Known {
    /// Forgets every row.
    pub(super) fn forget(&mut self) {
        self.holds.clear();
        self.accounts.clear();
        self.pending_accounts.clear();
        self.pending_totals = (0, 0, 0);
    }

    /// `read`, an account's row as the database has it, with the batch's pending changes.
    pub(super) fn with_pending(&self, account: &str, read: Balance) -> Option<Balance> {
        let (balance, held) = self.pending_accounts.get(account).copied().unwrap_or_default();
        let add = |value: u64, delta: i64| u64::try_from(i128::from(value) + i128::from(delta)).ok();
        Some(Balance { balance: add(read.balance, balance)?, held: add(read.held, held)? })
    }

    /// The pending changes, to write now; they are no longer pending.
    pub(super) fn take_pending(&mut self) -> Pending {
        let mut accounts: Vec<_> =
            self.pending_accounts.drain().map(|(account, (balance, held))| (account, balance, held)).collect();
        accounts.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Pending { accounts, totals: std::mem::take(&mut self.pending_totals) }
    }

    fn pend(&mut self, account: &str, balance: i64, held: i64) {
        let delta = match self.pending_accounts.get_mut(account) {
            Some(delta) => delta,
            None => self.pending_accounts.entry(account.to_string()).or_default(),
        };
        delta.0 += balance;
        delta.1 += held;
    }

    /// Notes the database's `data_version` at the start of a batch, forgetting every row if
    /// another connection committed since the last.
    pub(super) fn batch_starts(&mut self, data_version: i64) {
        if self.data_version.replace(data_version) != Some(data_version) {
            self.forget();
        }
    }

    pub(super) fn hold(&self, hold_id: &str) -> Option<&OpenHold> {
        self.holds.get(hold_id)
    }

    pub(super) fn balance(&self, account: &str) -> Option<Balance> {
        self.accounts.get(account).copied()
    }

    /// Learns an open hold's row, as read or as reserved.
    pub(super) fn learn_hold(&mut self, hold_id: &str, hold: OpenHold) {
        learn(&mut self.holds, hold_id, hold);
    }

    /// Learns an account's row, as read.
    pub(super) fn learn_balance(&mut self, account: &str, balance: Balance) {
        learn(&mut self.accounts, account, balance);
    }

    /// A hold was reserved: the account holds `amount` more.
    pub(super) fn reserved(&mut self, hold_id: &str, hold: OpenHold) {
        if let Some(balance) = self.accounts.get_mut(&hold.account) {
            balance.held += hold.amount;
        }
        self.pend(&hold.account, 0, stored(hold.amount));
        self.learn_hold(hold_id, hold);
    }

    /// Whether the hold surely has no charge with this op id yet.
    pub(super) fn new_charge(&self, hold_id: &str, op_id: &str) -> bool {
        self.holds.get(hold_id).and_then(|hold| hold.charge_ops.as_ref()).is_some_and(|ops| !ops.contains(op_id))
    }

    /// A hold was charged `amount` with a new op id.
    pub(super) fn charged(&mut self, hold_id: &str, op_id: &str, amount: u64) {
        if let Some(hold) = self.holds.get_mut(hold_id) {
            hold.charged += amount;
            if hold.charge_ops.as_ref().is_some_and(|ops| ops.len() >= MOST_CHARGES) {
                hold.charge_ops = None;
            }
            if let Some(ops) = &mut hold.charge_ops {
                ops.insert(op_id.to_string());
            }
        }
    }

    /// A hold of `amount` on `account` closed, settled (`post`, posting `posted`) or released.
    pub(super) fn closed(&mut self, hold_id: &str, account: &str, amount: u64, (post, posted): (bool, u64)) {
        self.holds.remove(hold_id);
        if let Some(balance) = self.accounts.get_mut(account) {
            balance.balance -= posted;
            balance.held -= amount;
        }
        self.pend(account, -stored(posted), -stored(amount));
        let totals = &mut self.pending_totals;
        *totals = (totals.0 + stored(posted), totals.1 + i64::from(post), totals.2 + i64::from(!post));
    }

    /// `account` was granted `amount`.
    pub(super) fn granted(&mut self, account: &str, amount: u64) {
        if let Some(balance) = self.accounts.get_mut(account) {
            balance.balance += amount;
        }
    }
}

fn learn<V>(rows: &mut HashMap<String, V>, key: &str, row: V) {
    if rows.len() >= MOST_KNOWN && !rows.contains_key(key) {
        rows.clear();
    }
    rows.insert(key.to_string(), row);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(account: &str, amount: u64) -> OpenHold {
        OpenHold {
            account: account.into(),
            amount,
            charged: 0,
            ttl_ms: 1000,
            expires_ms: 5000,
            charge_ops: Some(HashSet::default()),
        }
    }

    #[test]
    fn changes_apply_to_known_rows_only() {
        let mut known = Known::default();
        known.learn_balance("a", Balance { balance: 100, held: 0 });
        known.reserved("h1", hold("a", 30));
        known.reserved("h2", hold("b", 5));
        assert_eq!(known.balance("a"), Some(Balance { balance: 100, held: 30 }));
        // Never read: stays unknown rather than guessed.
        assert_eq!(known.balance("b"), None);
        known.charged("h1", "text#1", 7);
        known.charged("unknown", "text#1", 7);
        assert_eq!(known.hold("h1").map(|h| h.charged), Some(7));
        known.closed("h1", "a", 30, (true, 7));
        assert_eq!(known.hold("h1"), None);
        assert_eq!(known.balance("a"), Some(Balance { balance: 93, held: 0 }));
        known.granted("a", 7);
        known.granted("b", 7);
        assert_eq!((known.balance("a"), known.balance("b")), (Some(Balance { balance: 100, held: 0 }), None));
    }

    #[test]
    fn a_charge_is_known_new_only_while_the_holds_op_ids_are_complete() {
        let mut known = Known::default();
        known.reserved("h", hold("a", 1000));
        known.learn_hold("read", OpenHold { charge_ops: None, ..hold("a", 10) });
        assert!(known.new_charge("h", "text#1"));
        assert!(!known.new_charge("read", "text#1"), "read back: its charges are not known");
        assert!(!known.new_charge("unknown", "text#1"));
        for n in 0..MOST_CHARGES {
            known.charged("h", &format!("text#{n}"), 1);
        }
        assert!(!known.new_charge("h", "text#0") && known.new_charge("h", "image#0"));
        known.charged("h", "image#0", 1);
        assert!(!known.new_charge("h", "image#1"), "past the most op ids kept, each charge looks");
        assert_eq!(known.hold("h").map(|h| h.charged), Some(MOST_CHARGES as u64 + 1));
    }

    #[test]
    fn reservations_and_settlements_pend_until_written_once() {
        let mut known = Known::default();
        known.reserved("h1", hold("a", 30));
        known.reserved("h2", hold("a", 5));
        known.closed("h1", "a", 30, (true, 7));
        known.closed("h2", "a", 5, (false, 0));
        // The row as it was before the batch.
        let read = Balance { balance: 100, held: 0 };
        assert_eq!(known.with_pending("a", read), Some(Balance { balance: 93, held: 0 }));
        assert_eq!(known.with_pending("b", read), Some(read));
        assert_eq!(known.with_pending("a", Balance { balance: 3, held: 0 }), None, "never negative");
        let pending = known.take_pending();
        assert_eq!((pending.accounts, pending.totals), (vec![("a".to_string(), -7, 0)], (7, 1, 1)));
        let written = known.take_pending();
        assert!(written.accounts.is_empty() && written.totals == (0, 0, 0), "written once");
        known.reserved("h3", hold("a", 1));
        known.forget();
        assert!(known.take_pending().accounts.is_empty(), "a rollback drops them");
    }

    #[test]
    fn another_connections_commit_forgets_everything() {
        let mut known = Known::default();
        known.batch_starts(1);
        known.reserved("h", hold("a", 1));
        known.learn_balance("a", Balance { balance: 1, held: 1 });
        known.batch_starts(1);
        assert!(known.hold("h").is_some() && known.balance("a").is_some());
        known.batch_starts(2);
        assert!(known.hold("h").is_none() && known.balance("a").is_none());
    }

    #[test]
    fn a_full_map_starts_over() {
        let mut known = Known::default();
        for n in 0..MOST_KNOWN {
            known.learn_hold(&format!("h{n}"), hold("a", 1));
        }
        known.learn_hold("h0", hold("a", 2));
        assert_eq!(known.holds.len(), MOST_KNOWN);
        known.learn_hold("one more", hold("a", 1));
        assert_eq!(known.holds.len(), 1);
        assert!(known.hold("one more").is_some());
    }
}
