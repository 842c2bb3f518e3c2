//! Reads (balances, totals, history, the audit), the search for holds to recover, and the
//! tidying of lapsed leases. Each read is one statement or one REPEATABLE READ transaction: it
//! sees one committed state.

use deadpool_postgres::GenericClient;
use futures::TryStreamExt;
use tokio_postgres::IsolationLevel;

use super::super::journal::{Fold, HoldRow, HoldState};
use super::super::{Audit, Balance, Entry, EntryKind, HistoryQuery, LedgerError, LedgerTotals, reasons};
use super::{credits, stored};

pub(super) async fn balance(client: &impl GenericClient, account: &str) -> Result<Balance, LedgerError> {
    let row = client
        .query_opt(&client.prepare_cached("SELECT balance, held FROM ledger.accounts WHERE id = $1").await?, &[&account])
        .await?;
    let row = row.ok_or_else(|| LedgerError::UnknownAccount(account.into()))?;
    Ok(Balance { balance: credits(row.get(0))?, held: credits(row.get(1))? })
}

/// Sums over the ledger, in one statement.
pub(super) async fn totals(client: &impl GenericClient) -> Result<LedgerTotals, LedgerError> {
    let statement = client
        .prepare_cached(
            "SELECT t.granted, t.posted, t.settled, t.released, a.balances, a.held, \
                 (SELECT COUNT(*) FROM ledger.holds WHERE state = 'open') \
             FROM (SELECT COALESCE(SUM(granted), 0)::bigint AS granted, COALESCE(SUM(posted), 0)::bigint AS posted, \
                          COALESCE(SUM(settled), 0)::bigint AS settled, COALESCE(SUM(released), 0)::bigint AS released \
                   FROM ledger.totals) AS t, \
                  (SELECT COALESCE(SUM(balance), 0)::bigint AS balances, COALESCE(SUM(held), 0)::bigint AS held \
                   FROM ledger.accounts) AS a",
        )
        .await?;
    let row = client.query_one(&statement, &[]).await?;
    Ok(LedgerTotals {
        granted: credits(row.get(0))?,
        posted: credits(row.get(1))?,
        settled_holds: credits(row.get(2))?,
        released_holds: credits(row.get(3))?,
        balances: credits(row.get(4))?,
        held: credits(row.get(5))?,
        open_holds: credits(row.get(6))?,
    })
}

pub(super) async fn history(client: &impl GenericClient, account: &str, query: &HistoryQuery) -> Result<Vec<Entry>, LedgerError> {
    let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
    let statement = client
        .prepare_cached(
            "SELECT id, time_ms, account, run, op, step, kind, amount, reason FROM ledger.journal \
             WHERE account = $1 AND id > $2 AND ($3::text IS NULL OR run = $3) ORDER BY id LIMIT $4",
        )
        .await?;
    let rows = client.query(&statement, &[&account, &stored(query.after), &query.run, &limit]).await?;
    rows.iter()
        .map(|row| {
            let kind: &str = row.get(6);
            Ok(Entry {
                id: credits(row.get(0))?,
                time_ms: credits(row.get(1))?,
                account: row.get(2),
                run: row.get(3),
                op: row.get(4),
                step: row.get(5),
                kind: EntryKind::parse(kind)
                    .ok_or_else(|| LedgerError::Backend(format!("a journal entry has the unknown kind '{kind}'")))?,
                amount: credits(row.get(7))?,
                reason: row.get(8),
            })
        })
        .collect()
}

/// The open holds to resolve at `now`: those whose owner's lease lapsed (or is gone), and those
/// past their time to live, by id, with the reason recorded for each.
pub(super) async fn abandoned(client: &impl GenericClient, now: u64) -> Result<Vec<(String, &'static str)>, LedgerError> {
    let statement = client
        .prepare_cached(
            "SELECT h.id, l.id IS NOT NULL, h.expires_ms <= $1 FROM ledger.holds AS h \
             LEFT JOIN ledger.leases AS l ON l.id = h.owner AND l.expires_at > now() \
             WHERE h.state = 'open' ORDER BY h.id",
        )
        .await?;
    let rows = client.query(&statement, &[&stored(now)]).await?;
    Ok(rows
        .iter()
        .filter_map(|row| match (row.get::<_, bool>(1), row.get::<_, bool>(2)) {
            (false, _) => Some((row.get(0), reasons::ABANDONED)),
            (true, true) => Some((row.get(0), reasons::EXPIRED)),
            (true, false) => None,
        })
        .collect())
}

/// Forgets the leases that lapsed and own no open hold, folding their writers' rows of
/// `totals` into the row ('', 0) in the same statement. `DELETE ... RETURNING` returns the rows
/// as deleted, so a late write to one of them by a process that outlived its lease (it waits
/// for the delete, then inserts a fresh row) is never lost.
pub(super) async fn forget_lapsed_leases(client: &impl GenericClient) -> Result<(), LedgerError> {
    client
        .execute(
            "WITH lapsed AS ( \
                 DELETE FROM ledger.leases AS l WHERE l.expires_at < now() \
                 AND NOT EXISTS (SELECT 1 FROM ledger.holds AS h WHERE h.owner = l.id AND h.state = 'open') \
                 RETURNING l.id), \
             gone AS ( \
                 DELETE FROM ledger.totals AS t WHERE t.owner <> '' \
                 AND (t.owner IN (SELECT id FROM lapsed) OR NOT EXISTS (SELECT 1 FROM ledger.leases AS l WHERE l.id = t.owner)) \
                 RETURNING t.granted, t.posted, t.settled, t.released) \
             UPDATE ledger.totals SET granted = granted + (SELECT COALESCE(SUM(granted), 0) FROM gone), \
                 posted = posted + (SELECT COALESCE(SUM(posted), 0) FROM gone), \
                 settled = settled + (SELECT COALESCE(SUM(settled), 0) FROM gone), \
                 released = released + (SELECT COALESCE(SUM(released), 0) FROM gone) \
             WHERE owner = '' AND lane = 0",
            &[],
        )
        .await?;
    Ok(())
}

/// Re-folds the journal against the accounts, holds and totals, in one snapshot.
pub(super) async fn verify(client: &mut deadpool_postgres::Object) -> Result<Audit, LedgerError> {
    let tx = client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    let mut fold = Fold::default();
    let mut problems = Vec::new();
    let journal =
        tx.query_raw("SELECT id, kind, account, run, amount FROM ledger.journal ORDER BY id", std::iter::empty::<&str>()).await?;
    futures::pin_mut!(journal);
    while let Some(row) = journal.try_next().await? {
        let (id, kind, amount): (i64, &str, i64) = (row.get(0), row.get(1), row.get(4));
        match (EntryKind::parse(kind), credits(id), credits(amount)) {
            (Some(kind), Ok(id), Ok(amount)) => fold.apply(id, kind, row.get(2), row.get(3), amount),
            _ => problems.push(format!("journal entry {id} is malformed (kind '{kind}', amount {amount})")),
        }
    }
    let mut accounts = Vec::new();
    for row in tx.query("SELECT id, balance, held FROM ledger.accounts", &[]).await? {
        accounts.push((row.get::<_, String>(0), Balance { balance: credits(row.get(1))?, held: credits(row.get(2))? }));
    }
    let mut holds = Vec::new();
    for row in tx.query("SELECT id, account, amount, charged, state, posted FROM ledger.holds", &[]).await? {
        let state = match row.get::<_, &str>(4) {
            "open" => HoldState::Open,
            "settled" => HoldState::Settled { posted: credits(row.get(5))? },
            _ => HoldState::Released,
        };
        let (id, account): (String, String) = (row.get(0), row.get(1));
        holds.push((id, account, credits(row.get(2))?, credits(row.get(3))?, state));
    }
    let totals = totals(&tx).await?;
    let granted: i64 = tx.query_one("SELECT COALESCE(SUM(amount), 0)::bigint FROM ledger.grants", &[]).await?.get(0);
    let balances = accounts.iter().map(|(id, balance)| (id.as_str(), *balance));
    let rows = holds.iter().map(|(id, account, amount, charged, state)| {
        (id.as_str(), HoldRow { account, amount: *amount, charged: Some(*charged), state: *state })
    });
    let mut audit = fold.finish(balances, rows, &totals);
    if credits(granted)? != audit.granted {
        problems.push(format!("the grants add up to {granted}, but the journal's grant entries to {}", audit.granted));
    }
    audit.problems.extend(problems);
    Ok(audit)
}
