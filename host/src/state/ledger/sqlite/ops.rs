//! The SQL of each ledger operation. Writes run on the writer's connection inside a
//! transaction (see `writer`), reads on the reader's; every write checks everything before it
//! changes anything, so a refused operation writes nothing.

use rusqlite::{Connection, OptionalExtension, params};

use super::super::journal::{Fold, HoldRow, HoldState, check_charge, check_close, entry_step};
use super::super::{Audit, Balance, EntryKind, LedgerError, LedgerTotals, MAX_CREDITS, Recovery, Settlement, reasons};
use super::known::{Known, OpenHold};
use super::listing;
use super::prepared::Prepared;
use crate::config::FailurePolicy;

/// A stored integer as credits: a negative one means the file was tampered with.
pub(super) fn credits(value: i64) -> Result<u64, LedgerError> {
    u64::try_from(value)
        .map_err(|_| LedgerError::Backend(format!("the database holds a negative amount ({value}): it is damaged")))
}

/// Credits as a stored integer; every amount written was checked to fit.
pub(super) fn stored(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn insert_entry(
    conn: &Prepared<'_>,
    now: u64,
    kind: EntryKind,
    account: &str,
    (run, op): (Option<&str>, Option<&str>),
    amount: u64,
    reason: &str,
) -> Result<(), LedgerError> {
    let step = entry_step(kind, op);
    conn.get(
        "INSERT INTO journal (time_ms, account, run, op, step, kind, amount, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![stored(now), account, run, op, step, kind.as_str(), stored(amount), reason])?;
    Ok(())
}

pub(super) fn grant(
    conn: &Prepared<'_>,
    known: &mut Known,
    now: u64,
    grant_id: &str,
    account: &str,
    amount: u64,
) -> Result<Balance, LedgerError> {
    let prior: Option<(String, i64, i64, i64)> = conn
        .get("SELECT account, amount, balance, held FROM grants WHERE id = ?1")?
        .query_row([grant_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    if let Some((granted_to, granted, balance, held)) = prior {
        if (granted_to.as_str(), credits(granted)?) != (account, amount) {
            return Err(LedgerError::Conflict(grant_id.into()));
        }
        return Ok(Balance { balance: credits(balance)?, held: credits(held)? });
    }
    let total: i64 = conn.get("SELECT granted FROM totals")?.query_row([], |r| r.get(0))?;
    if amount == 0 || credits(total)?.checked_add(amount).is_none_or(|total| total > MAX_CREDITS) {
        return Err(LedgerError::InvalidAmount(amount));
    }
    conn.get(
        "INSERT INTO accounts (id, balance, held) VALUES (?1, ?2, 0) \
         ON CONFLICT (id) DO UPDATE SET balance = balance + excluded.balance",
    )?
    .execute(params![account, stored(amount)])?;
    conn.get("UPDATE totals SET granted = granted + ?1")?.execute([stored(amount)])?;
    insert_entry(conn, now, EntryKind::Grant, account, (None, Some(grant_id)), amount, reasons::GRANT)?;
    let after = with_pending(known, account, balance(conn, account)?)?;
    conn.get("INSERT INTO grants (id, account, amount, balance, held) VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![
        grant_id,
        account,
        stored(amount),
        stored(after.balance),
        stored(after.held)
    ])?;
    known.granted(account, amount);
    Ok(after)
}

pub(super) fn reserve(
    conn: &Prepared<'_>,
    known: &mut Known,
    now: u64,
    owner: &str,
    (hold_id, account): (&str, &str),
    amount: u64,
    ttl_ms: u64,
) -> Result<(), LedgerError> {
    // A repeat: the first outcome stands, or the arguments conflict.
    let repeat = |(held_by, held, ttl): (String, u64, u64)| {
        if (held_by.as_str(), held, ttl) == (account, amount, ttl_ms) {
            Ok(())
        } else {
            Err(LedgerError::Conflict(hold_id.into()))
        }
    };
    if let Some(open) = known.hold(hold_id) {
        return repeat((open.account.clone(), open.amount, open.ttl_ms));
    }
    // A new hold is the common case: its row is looked for only when the reservation would be
    // refused, or when inserting it finds one.
    let refused = if amount == 0 {
        Some(LedgerError::InvalidAmount(amount))
    } else {
        match known.balance(account).map_or_else(|| read_balance(conn, known, account), Ok) {
            Ok(credits_now) if credits_now.available() >= amount => None,
            Ok(credits_now) => Some(LedgerError::Insufficient { needed: amount, available: credits_now.available() }),
            Err(unknown @ LedgerError::UnknownAccount(_)) => Some(unknown),
            Err(e) => return Err(e),
        }
    };
    if let Some(refused) = refused {
        return prior_hold(conn, hold_id)?.map_or(Err(refused), repeat);
    }
    let expires_ms = now.saturating_add(ttl_ms);
    let inserted = conn
        .get(
            "INSERT INTO holds (id, account, amount, charged, ttl_ms, expires_ms, owner, state, posted) \
             VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, 'open', 0) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![hold_id, account, stored(amount), stored(ttl_ms), stored(expires_ms), owner])?;
    if inserted == 0 {
        let damaged = || LedgerError::Backend(format!("hold '{hold_id}' is both in the database and not: it is damaged"));
        return repeat(prior_hold(conn, hold_id)?.ok_or_else(damaged)?);
    }
    insert_entry(conn, now, EntryKind::Hold, account, (Some(hold_id), None), amount, reasons::RESERVE)?;
    let charge_ops = Some(Default::default());
    known.reserved(hold_id, OpenHold { account: account.into(), amount, charged: 0, ttl_ms, expires_ms, charge_ops });
    Ok(())
}

/// An account's row as read, with the batch's pending changes, and then known.
fn read_balance(conn: &Prepared<'_>, known: &mut Known, account: &str) -> Result<Balance, LedgerError> {
    let read = with_pending(known, account, balance(conn, account)?)?;
    known.learn_balance(account, read);
    Ok(read)
}

/// The account, amount and time to live of the hold reserved with this id, if any.
fn prior_hold(conn: &Prepared<'_>, hold_id: &str) -> Result<Option<(String, u64, u64)>, LedgerError> {
    let row: Option<(String, i64, i64)> = conn
        .get("SELECT account, amount, ttl_ms FROM holds WHERE id = ?1")?
        .query_row([hold_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    row.map(|(account, amount, ttl)| Ok((account, credits(amount)?, credits(ttl)?))).transpose()
}

/// A hold's row.
struct Hold {
    account: String,
    amount: u64,
    charged: u64,
    state: HoldState,
    expires_ms: u64,
}

/// What an open hold was charged so far: the sum of its charge entries. Its row's `charged` is
/// written when it closes (schema version 5), which saves an update per charge.
fn open_hold_charged(conn: &Prepared<'_>, hold_id: &str) -> Result<i64, LedgerError> {
    let mut sum = conn.get("SELECT COALESCE(SUM(amount), 0) FROM journal WHERE kind = 'charge' AND run = ?1")?;
    Ok(sum.query_row([hold_id], |r| r.get(0))?)
}

/// The hold, as the writer knows it or as read (and then known, if open).
fn hold(conn: &Prepared<'_>, known: &mut Known, hold_id: &str) -> Result<Hold, LedgerError> {
    if let Some(open) = known.hold(hold_id) {
        let (account, amount, charged, expires_ms) = (open.account.clone(), open.amount, open.charged, open.expires_ms);
        return Ok(Hold { account, amount, charged, state: HoldState::Open, expires_ms });
    }
    let row: Option<(String, i64, i64, String, i64, i64, i64)> = conn
        .get("SELECT account, amount, charged, state, posted, expires_ms, ttl_ms FROM holds WHERE id = ?1")?
        .query_row([hold_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
        .optional()?;
    let (account, amount, charged, state, posted, expires_ms, ttl_ms) =
        row.ok_or_else(|| LedgerError::UnknownHold(hold_id.into()))?;
    let (state, charged) = match state.as_str() {
        "open" => (HoldState::Open, open_hold_charged(conn, hold_id)?),
        "settled" => (HoldState::Settled { posted: credits(posted)? }, charged),
        "released" => (HoldState::Released, charged),
        other => return Err(LedgerError::Backend(format!("hold '{hold_id}' has the unknown state '{other}'"))),
    };
    let hold = Hold { account, amount: credits(amount)?, charged: credits(charged)?, state, expires_ms: credits(expires_ms)? };
    if state == HoldState::Open {
        let (account, amount, charged, expires_ms) = (hold.account.clone(), hold.amount, hold.charged, hold.expires_ms);
        let ttl_ms = credits(ttl_ms)?;
        known.learn_hold(hold_id, OpenHold { account, amount, charged, ttl_ms, expires_ms, charge_ops: None });
    }
    Ok(hold)
}

pub(super) fn charge(
    conn: &Prepared<'_>,
    known: &mut Known,
    now: u64,
    (hold_id, op_id): (&str, &str),
    amount: u64,
    reason: &str,
) -> Result<u64, LedgerError> {
    let hold = hold(conn, known, hold_id)?;
    let prior: Option<(i64, i64, String)> = if known.new_charge(hold_id, op_id) {
        None
    } else {
        conn.get("SELECT id, amount, reason FROM journal WHERE kind = 'charge' AND run = ?1 AND op = ?2")?
            .query_row([hold_id, op_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?
    };
    if let Some((entry, charged, charged_for)) = prior {
        if (credits(charged)?, charged_for.as_str()) != (amount, reason) {
            return Err(LedgerError::Conflict(op_id.into()));
        }
        // What remained right after it: the hold minus the charges up to it.
        let upto: i64 = conn
            .get("SELECT SUM(amount) FROM journal WHERE kind = 'charge' AND run = ?1 AND id <= ?2")?
            .query_row(params![hold_id, entry], |r| r.get(0))?;
        return Ok(hold.amount.saturating_sub(credits(upto)?));
    }
    let remaining =
        check_charge(hold_id, hold.state == HoldState::Open, now, hold.expires_ms, amount, hold.amount, hold.charged)?;
    insert_entry(conn, now, EntryKind::Charge, &hold.account, (Some(hold_id), Some(op_id)), amount, reason)?;
    known.charged(hold_id, op_id, amount);
    Ok(remaining - amount)
}

/// Settles (`post`) or releases the hold.
pub(super) fn close(
    conn: &Prepared<'_>,
    known: &mut Known,
    now: u64,
    hold_id: &str,
    post: bool,
    reason: &str,
) -> Result<Settlement, LedgerError> {
    let hold = hold(conn, known, hold_id)?;
    if let Some(repeated) = check_close(hold_id, hold.state, post, hold.amount)? {
        return Ok(repeated);
    }
    let posted = if post { hold.charged } else { 0 };
    let released = hold.amount - posted;
    conn.get("UPDATE holds SET state = ?2, charged = ?3, posted = ?4 WHERE id = ?1")?.execute(params![
        hold_id,
        if post { "settled" } else { "released" },
        stored(hold.charged),
        stored(posted)
    ])?;
    if post {
        insert_entry(conn, now, EntryKind::Post, &hold.account, (Some(hold_id), None), posted, reason)?;
    }
    if released > 0 {
        insert_entry(conn, now, EntryKind::Release, &hold.account, (Some(hold_id), None), released, reason)?;
    }
    known.closed(hold_id, &hold.account, hold.amount, (post, posted));
    Ok(Settlement { posted, released })
}

/// An account's row as read, with the changes of the batch not written yet.
fn with_pending(known: &Known, account: &str, read: Balance) -> Result<Balance, LedgerError> {
    known.with_pending(account, read).ok_or_else(|| {
        LedgerError::Backend(format!("account '{account}' would go negative: the ledger's pending changes are inconsistent"))
    })
}

/// Writes the batch's pending changes to accounts and totals (see `known`), before it commits.
pub(super) fn write_pending(conn: &Prepared<'_>, known: &mut Known) -> rusqlite::Result<()> {
    let pending = known.take_pending();
    for (account, balance, held) in pending.accounts {
        conn.get("UPDATE accounts SET balance = balance + ?2, held = held + ?3 WHERE id = ?1")?
            .execute(params![account, balance, held])?;
    }
    if pending.totals != (0, 0, 0) {
        let (posted, settled, released) = pending.totals;
        conn.get("UPDATE totals SET posted = posted + ?1, settled = settled + ?2, released = released + ?3")?
            .execute(params![posted, settled, released])?;
    }
    Ok(())
}

/// The owners of open holds.
pub(super) fn open_hold_owners(conn: &Connection) -> Result<Vec<String>, LedgerError> {
    let mut statement =
        conn.prepare_cached("SELECT DISTINCT owner FROM holds INDEXED BY holds_open_by_expiry WHERE state = 'open'")?;
    let owners = statement.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(owners)
}

/// Resolves the open holds of the `dead` owners and those expired at `now`.
pub(super) fn recover(
    conn: &Prepared<'_>,
    known: &mut Known,
    now: u64,
    dead: &[String],
    policy: FailurePolicy,
) -> Result<Recovery, LedgerError> {
    // Only the open holds, through their index: the table keeps every hold ever reserved.
    let mut statement = conn.prepare_cached(
        "SELECT id, owner, expires_ms FROM holds INDEXED BY holds_open_by_expiry WHERE state = 'open' ORDER BY id",
    )?;
    let mut abandoned = Vec::new();
    for row in statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))? {
        let (hold, owner, expires_ms) = row?;
        if dead.contains(&owner) {
            abandoned.push((hold, reasons::ABANDONED));
        } else if credits(expires_ms)? <= now {
            abandoned.push((hold, reasons::EXPIRED));
        }
    }
    let mut recovery = Recovery::default();
    for (hold, reason) in abandoned {
        if let HoldState::Open = self::hold(conn, known, &hold)?.state {
            let settlement = close(conn, known, now, &hold, policy == FailurePolicy::PostCharged, reason)?;
            recovery.holds += 1;
            recovery.posted += settlement.posted;
            recovery.released += settlement.released;
        }
    }
    Ok(recovery)
}

pub(super) fn balance(conn: &Connection, account: &str) -> Result<Balance, LedgerError> {
    let row: Option<(i64, i64)> = conn
        .prepare_cached("SELECT balance, held FROM accounts WHERE id = ?1")?
        .query_row([account], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (balance, held) = row.ok_or_else(|| LedgerError::UnknownAccount(account.into()))?;
    let credits = Balance { balance: credits(balance)?, held: credits(held)? };
    if credits.held > credits.balance {
        return Err(LedgerError::Backend(format!("account '{account}' holds more than it has: the database is damaged")));
    }
    Ok(credits)
}

/// Sums over the ledger; the caller runs this in one read transaction.
pub(super) fn totals(conn: &Connection) -> Result<LedgerTotals, LedgerError> {
    let (granted, posted, settled, released): (i64, i64, i64, i64) = conn
        .prepare_cached("SELECT granted, posted, settled, released FROM totals")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    let (balances, held): (i64, i64) = conn
        .prepare_cached("SELECT COALESCE(SUM(balance), 0), COALESCE(SUM(held), 0) FROM accounts")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let open: i64 = conn.prepare_cached("SELECT COUNT(*) FROM holds WHERE state = 'open'")?.query_row([], |r| r.get(0))?;
    Ok(LedgerTotals {
        granted: credits(granted)?,
        balances: credits(balances)?,
        held: credits(held)?,
        posted: credits(posted)?,
        open_holds: credits(open)?,
        settled_holds: credits(settled)?,
        released_holds: credits(released)?,
    })
}

/// Re-folds the journal against the accounts and holds; the caller runs this in one read
/// transaction.
pub(super) fn verify(conn: &Connection) -> Result<Audit, LedgerError> {
    let mut fold = Fold::default();
    let mut problems = Vec::new();
    let mut statement = conn.prepare("SELECT id, kind, account, run, amount FROM journal ORDER BY id")?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        let (id, kind, account, run, amount): (i64, String, String, Option<String>, i64) =
            (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?);
        match (EntryKind::parse(&kind), credits(id), credits(amount)) {
            (Some(kind), Ok(id), Ok(amount)) => fold.apply(id, kind, &account, run.as_deref(), amount),
            _ => problems.push(format!("journal entry {id} is malformed (kind '{kind}', amount {amount})")),
        }
    }
    let mut statement = conn.prepare("SELECT id, balance, held FROM accounts")?;
    let mut rows = statement.query([])?;
    let mut accounts = Vec::new();
    while let Some(row) = rows.next()? {
        accounts.push((row.get::<_, String>(0)?, Balance { balance: credits(row.get(1)?)?, held: credits(row.get(2)?)? }));
    }
    let mut statement = conn.prepare("SELECT id, account, amount, charged, state, posted FROM holds")?;
    let mut rows = statement.query([])?;
    let mut holds = Vec::new();
    while let Some(row) = rows.next()? {
        let state = match row.get::<_, String>(4)?.as_str() {
            "open" => HoldState::Open,
            "settled" => HoldState::Settled { posted: credits(row.get(5)?)? },
            _ => HoldState::Released,
        };
        let (id, account): (String, String) = (row.get(0)?, row.get(1)?);
        holds.push((id, account, credits(row.get(2)?)?, credits(row.get(3)?)?, state));
    }
    let balances = accounts.iter().map(|(id, balance)| (id.as_str(), *balance));
    let rows = holds.iter().map(|(id, account, amount, charged, state)| {
        // An open hold's row does not keep what it was charged (see `open_hold_charged`).
        let charged = (*state != HoldState::Open).then_some(*charged);
        (id.as_str(), HoldRow { account, amount: *amount, charged, state: *state })
    });
    let mut audit = fold.finish(balances, rows, &totals(conn)?);
    let granted: i64 = conn.query_row("SELECT COALESCE(SUM(amount), 0) FROM grants", [], |r| r.get(0))?;
    if credits(granted)? != audit.granted {
        problems.push(format!("the grants add up to {granted}, but the journal's grant entries to {}", audit.granted));
    }
    problems.extend(listing::check(conn)?);
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        problems.push(format!("SQLite's quick_check reports damage: {check}"));
    }
    audit.problems.extend(problems);
    Ok(audit)
}
